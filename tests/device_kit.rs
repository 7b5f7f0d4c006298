//! The GPU kit's rehearsal: `DRY_RUN=1 bash tools/device_call.sh firstlight` on this machine's
//! driver (the debug `ldm` and one test binary of this checkout, the shipped tiny model, tiny
//! sizes, no diffusers, no nvidia-smi), so that a lent GPU's one short run never finds a renamed
//! flag, a missing file or a broken step. Checks every file the real run brings back.

use std::process::Command;

#[test]
fn firstlight_rehearsal_runs_every_step() {
    let out = std::env::temp_dir().join(format!("ldm-kit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    // The kit finds the binaries where cargo put them (it links target/debug/ldm and the newest
    // test binaries from target/debug/deps).
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_ldm"));
    let target = exe.parent().unwrap().parent().unwrap();
    let o = Command::new("bash")
        .args(["tools/device_call.sh", "firstlight"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DRY_RUN", "1")
        .env("OUT", &out)
        .env("CARGO_TARGET_DIR", target)
        .env_remove("LDM_ADAPTER")
        .output()
        .expect("run bash");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{log}");
    let read = |name: &str| {
        std::fs::read_to_string(out.join(name))
            .unwrap_or_else(|e| panic!("{name} was not written ({e}):\n{log}"))
    };
    let gpu = read("gpu.txt");
    assert!(gpu.contains("chosen:"), "ldm info missing:\n{gpu}");
    let tests = read("tests.txt");
    assert!(
        tests.contains("test_kernels_tiling") && tests.contains("test result: ok"),
        "{tests}"
    );
    let kernels = read("kernels_f16.txt");
    assert!(
        kernels.contains("measured peaks") && kernels.contains("8x8.mid.proj_in"),
        "{kernels}"
    );
    let pipeline = read("pipeline_sd15.txt");
    for needle in ["cold start", "U-Net it/s", "peak pool memory", "ldm done"] {
        assert!(pipeline.contains(needle), "`{needle}` missing:\n{pipeline}");
    }
    read("diffusers_sd15.txt");
    read("make_sd15.txt");
    std::fs::remove_dir_all(&out).ok();
}
