//! `ldm bench`, run as users run it: the kernel table as JSON (filtered to one cheap SD 1.5
//! case) and the end-to-end benchmark on the shipped model at a tiny size. These check that the
//! benchmark runs and reports sane numbers, not how fast anything is.

use std::process::Command;

use serde_json::Value;

fn ldm_json(args: &[&str]) -> Value {
    let o = Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(args)
        .env_remove("LDM_ADAPTER")
        .output()
        .expect("run ldm");
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

fn positive(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x.is_finite() && x > 0.0, "{what} = {x}");
    x
}

#[test]
fn kernel_table_as_json() {
    let doc = ldm_json(&[
        "bench",
        "--json",
        "--quick",
        "--reps",
        "1",
        "--filter",
        "8x8.mid.proj_in,unet.mid.proj_in",
    ]);
    positive(&doc["peaks"]["fma_gflops"], "FMA peak");
    positive(&doc["peaks"]["copy_gbs"], "copy peak");
    let rows = doc["kernels"].as_array().expect("kernels");
    assert!(!rows.is_empty(), "no case matched the filter");
    for row in rows {
        let shape = row["shape"].as_str().unwrap();
        assert!(
            shape.contains("8x8.mid.proj_in") || shape.contains("unet.mid.proj_in"),
            "{shape} does not match the filter"
        );
        positive(&row["ms"], "ms");
        positive(&row["gflops"], "GFLOP/s");
        positive(&row["percent_of_peak"], "% of peak");
    }
    // Each filtered shape has exactly one path marked as the default.
    let mut shapes: Vec<&str> = rows.iter().map(|r| r["shape"].as_str().unwrap()).collect();
    shapes.dedup();
    for shape in shapes {
        let defaults = rows
            .iter()
            .filter(|r| r["shape"] == shape && r["default"] == true)
            .count();
        assert_eq!(defaults, 1, "{shape}: {defaults} default paths");
    }
}

#[test]
fn end_to_end_on_the_shipped_model() {
    let model = ldm_wgpu::pipeline::default_model_dir();
    let doc = ldm_json(&[
        "bench",
        "--json",
        "-m",
        model.to_str().unwrap(),
        "--size",
        "64",
        "-s",
        "2",
        "--images",
        "1",
    ]);
    for key in [
        "cold_start_s",
        "warm_start_s",
        "seconds_per_image",
        "unet_its",
        "step_ms",
        "vae_decode_s",
        "peak_pool_mib",
    ] {
        positive(&doc[key], key);
    }
    assert_eq!(doc["size"], 64);
    assert_eq!(doc["steps"], 2);
    let p = &doc["profiled"];
    let wall = positive(&p["wall_s"], "profiled wall");
    let kernels = positive(&p["kernel_sum_s"], "summed kernel time");
    assert!(
        kernels <= wall * 1.05,
        "kernels {kernels} s > wall {wall} s"
    );
    let list = p["kernels"].as_array().expect("kernel list");
    assert!(list.iter().any(|k| k["kernel"] == "conv2d"), "{list:?}");
}

/// `ldm bench --shapes sdxl`: the SDXL base 1024² table (kernels::sdxl), filtered to cheap
/// cases of each kind (a linear of the bigG encoder, a cross-attention, a LayerNorm); the
/// default table has none of its rows.
#[test]
fn sdxl_kernel_table_as_json() {
    let doc = ldm_json(&[
        "bench",
        "--json",
        "--quick",
        "--reps",
        "1",
        "--shapes",
        "sdxl",
        "--filter",
        "xl.clip_g.q,xl.cross 32x32,xl.clip_g_ln",
    ]);
    assert_eq!(doc["shapes"], "sdxl");
    let rows = doc["kernels"].as_array().expect("kernels");
    for want in ["xl.clip_g.q", "xl.cross 32x32", "xl.clip_g_ln"] {
        assert!(
            rows.iter()
                .any(|r| r["shape"].as_str().unwrap().contains(want)),
            "no row for {want}: {rows:?}"
        );
    }
    for row in rows {
        positive(&row["ms"], "ms");
        positive(&row["percent_of_peak"], "% of peak");
    }
    let sd15 = ldm_json(&[
        "bench", "--json", "--quick", "--reps", "1", "--filter", "xl.",
    ]);
    assert_eq!(sd15["shapes"], "sd15");
    assert!(sd15["kernels"].as_array().unwrap().is_empty());
}

/// The SDXL tables are self-consistent: distinct names, every U-Net convolution at one of the
/// three latent levels of 1024² (128, 64, 32), every attention at 64² or 32² with 64-wide heads
/// (SDXL's head_dim), cross-attention against 77 tokens.
#[test]
fn sdxl_tables_are_consistent() {
    use ldm_wgpu::kernels::sdxl;
    let mut names: Vec<&str> = sdxl::MATMUL.iter().map(|c| c.0).collect();
    names.extend(sdxl::CONV.iter().map(|c| c.0));
    names.extend(sdxl::ATTENTION.iter().map(|c| c.0));
    names.extend(sdxl::NORM.iter().map(|c| c.name));
    let n = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), n, "duplicate case names");
    for &(name, b, h, w, ..) in sdxl::CONV {
        if name.starts_with("xl.unet") {
            assert_eq!(b, 2, "{name}");
            assert!([128, 64, 32].contains(&h) && h == w, "{name}");
        }
    }
    for &(name, _, heads, nq, nk, d) in sdxl::ATTENTION {
        assert_eq!(d, 64, "{name}");
        assert!([4096, 1024].contains(&nq), "{name}");
        assert_eq!(heads * d, if nq == 4096 { 640 } else { 1280 }, "{name}");
        assert!(nk == nq || nk == 77, "{name}");
    }
}
