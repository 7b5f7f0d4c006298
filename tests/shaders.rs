//! Every shader, in every dtype it is used with, must validate with naga and translate to
//! SPIR-V (Vulkan), MSL (Metal) and HLSL (DX12). Needs no adapter: a shader that would break on
//! any back end fails CI on any machine.

use std::collections::BTreeSet;

use ldm_wgpu::shaders::{specialised_source, validate, ShaderId};

#[test]
fn every_shader_file_is_registered() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/shaders");
    let files: BTreeSet<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "wgsl").then(|| p.file_stem().unwrap().to_string_lossy().to_string())
        })
        .collect();
    let registered: BTreeSet<String> = ShaderId::FILES
        .iter()
        .map(|s| s.name().to_string())
        .collect();
    assert_eq!(files, registered, "shaders/ and src/shaders.rs disagree");
}

#[test]
fn every_shader_validates_and_translates_to_spirv_msl_hlsl() {
    let mut failures = Vec::new();
    for name in ShaderId::ALL {
        for &dtype in name.dtypes() {
            let src = specialised_source(name, dtype);
            let what = format!("{name} ({})", dtype.name());
            let (module, info) = match validate(&src) {
                Ok(v) => v,
                Err(e) => {
                    failures.push(format!("{what}: {e}"));
                    continue;
                }
            };
            // naga can panic while evaluating overrides too: name the shader.
            let processed = std::panic::catch_unwind(|| {
                naga::back::pipeline_constants::process_overrides(
                    &module,
                    &info,
                    None,
                    &Default::default(),
                )
                .map(|(m, i)| (m.into_owned(), i.into_owned()))
                .map_err(|e| e.to_string())
            });
            let (module, info) = match processed {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    failures.push(format!("{what}: overrides: {e}"));
                    continue;
                }
                Err(_) => {
                    failures.push(format!("{what}: overrides: naga panicked"));
                    continue;
                }
            };
            // naga has internal panics on some inputs (e.g. coopStore with compound pointer
            // expressions): catch them so the failure names the shader.
            let spv = std::panic::catch_unwind(|| {
                naga::back::spv::write_vec(
                    &module,
                    &info,
                    &naga::back::spv::Options::default(),
                    None,
                )
            });
            match spv {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => failures.push(format!("{what}: SPIR-V: {e}")),
                Err(_) => failures.push(format!("{what}: SPIR-V: naga panicked")),
            }
            let msl_options = naga::back::msl::Options {
                lang_version: (2, 4),
                ..Default::default()
            };
            if let Err(e) = naga::back::msl::write_string(
                &module,
                &info,
                &msl_options,
                &naga::back::msl::PipelineOptions::default(),
            ) {
                failures.push(format!("{what}: MSL: {e}"));
            }
            // Cooperative matrices have no HLSL translation in naga (and wgpu offers the feature
            // only on Vulkan and Metal): the tensor-core kernels are selected at run time only
            // where the adapter reports them, so DX12 never sees them.
            if src.contains("enable wgpu_cooperative_matrix") {
                continue;
            }
            let hlsl_options = naga::back::hlsl::Options {
                shader_model: naga::back::hlsl::ShaderModel::V6_2,
                ..Default::default()
            };
            let mut hlsl = String::new();
            let pipeline_options = naga::back::hlsl::PipelineOptions::default();
            let mut writer =
                naga::back::hlsl::Writer::new(&mut hlsl, &hlsl_options, &pipeline_options);
            if let Err(e) = writer.write(&module, &info, None) {
                failures.push(format!("{what}: HLSL: {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "shader failures:\n{}",
        failures.join("\n")
    );
}

#[test]
fn a_broken_shader_is_reported_with_its_location() {
    let err = validate("@compute @workgroup_size(1) fn main() { let x: f32 = 1u; }").unwrap_err();
    assert!(err.contains("error"), "{err}");
}

/// Every entry point of every shader and variant, as SPIR-V for Vulkan 1.3 (naga with default
/// override values: the 16×16 tensor-core variants at 32-wide subgroups, as NVIDIA runs them),
/// passes the Khronos validator. naga validating its own input says nothing about the SPIR-V it
/// writes, and the 16×16 variants cannot execute on any machine we test on. Runs where
/// `LDM_SPIRV_VAL` names a `spirv-val` command (CI unpacks one with tools/lavapipe_coop.py).
#[test]
fn every_entry_point_passes_spirv_val_where_available() {
    let Ok(cmd) = std::env::var("LDM_SPIRV_VAL") else {
        eprintln!("LDM_SPIRV_VAL not set: SPIR-V not validated here (CI sets it)");
        return;
    };
    let cmd: Vec<&str> = cmd.split_whitespace().collect();
    let dir = std::env::temp_dir().join(format!("ldm-spirv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (mut checked, mut failures) = (0, Vec::new());
    for name in ShaderId::ALL {
        for &dtype in name.dtypes() {
            let src = specialised_source(name, dtype);
            let (module, info) = validate(&src).unwrap();
            let (module, info) = naga::back::pipeline_constants::process_overrides(
                &module,
                &info,
                None,
                &Default::default(),
            )
            .unwrap();
            for ep in &module.entry_points {
                let options = naga::back::spv::Options {
                    lang_version: (1, 3),
                    ..Default::default()
                };
                let pipeline = naga::back::spv::PipelineOptions {
                    shader_stage: naga::ShaderStage::Compute,
                    entry_point: ep.name.clone(),
                };
                let words =
                    naga::back::spv::write_vec(&module, &info, &options, Some(&pipeline)).unwrap();
                let path = dir.join(format!("{name}.{}.{}.spv", dtype.name(), ep.name));
                let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                std::fs::write(&path, bytes).unwrap();
                let out = std::process::Command::new(cmd[0])
                    .args(&cmd[1..])
                    .args(["--target-env", "vulkan1.3"])
                    .arg(&path)
                    .output()
                    .expect("LDM_SPIRV_VAL runs");
                if !out.status.success() {
                    failures.push(format!(
                        "{name} ({}) {}: {}",
                        dtype.name(),
                        ep.name,
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                checked += 1;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("spirv-val: {checked} entry points checked");
    assert!(checked > 50, "only {checked} entry points found");
    assert!(
        failures.is_empty(),
        "spirv-val failures:\n{}",
        failures.join("\n")
    );
}
