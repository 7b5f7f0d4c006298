//! The `ldm` binary's command line, on paths that load no model and open no GPU: parse errors,
//! help, completions, flag aliases (checked by failing validation before anything is loaded)
//! and `ldm samplers`.

use std::process::{Command, Output};

fn ldm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(args)
        .env_remove("LDM_ADAPTER")
        .output()
        .expect("run ldm")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn unknown_flags_are_refused_by_name() {
    for args in [
        &["generate", "-p", "x", "--bogus"][..],
        &["gen", "--no-such-flag", "1"],
        &["info", "--bogus"],
    ] {
        let o = ldm(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = stderr(&o);
        assert!(err.contains("error:"), "{args:?}: {err}");
        assert!(
            err.contains(
                args.iter()
                    .find(|a| a.starts_with("--b") || a.starts_with("--n"))
                    .unwrap()
            ),
            "{args:?}: the flag is not named: {err}"
        );
    }
    let o = ldm(&["frobnicate"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("frobnicate"), "{}", stderr(&o));
}

#[test]
fn help_lists_the_commands_and_the_main_flags() {
    let o = ldm(&["--help"]);
    assert!(o.status.success());
    let top = stdout(&o);
    for cmd in [
        "generate",
        "info",
        "inspect",
        "samplers",
        "bench",
        "completions",
    ] {
        assert!(top.contains(cmd), "`{cmd}` missing from ldm --help:\n{top}");
    }
    // No arguments at all: the same overview, successfully.
    let bare = ldm(&[]);
    assert!(bare.status.success());
    assert!(stdout(&bare).contains("generate"));

    for args in [
        &["generate", "--help"][..],
        &["help", "generate"],
        &["gen", "-h"],
    ] {
        let o = ldm(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let help = stdout(&o);
        for flag in [
            "--prompt",
            "--negative-prompt",
            "--model",
            "--width",
            "--height",
            "--steps",
            "--guidance",
            "--cfg-scale",
            "--sampler",
            "--seed",
            "--output",
            "--batch-size",
            "--batch-count",
            "--init-image",
            "--mask",
            "--karras",
        ] {
            assert!(help.contains(flag), "{args:?}: `{flag}` missing:\n{help}");
        }
        for short in [
            "-p,", "-n,", "-m,", "-W,", "-H,", "-s,", "-g,", "-o,", "-b,", "-i,", "-q,",
        ] {
            assert!(help.contains(short), "{args:?}: `{short}` missing:\n{help}");
        }
    }
}

#[test]
fn completions_print_a_script() {
    let o = ldm(&["completions", "bash"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let script = stdout(&o);
    assert!(
        script.contains("complete") && script.contains("_ldm"),
        "{script}"
    );
    assert!(script.contains("--cfg-scale") && script.contains("--sampler"));
    for shell in ["zsh", "fish"] {
        let o = ldm(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        assert!(stdout(&o).contains("generate"), "{shell}");
    }
    assert!(!ldm(&["completions", "cmd.exe"]).status.success());
}

/// Every spelling of a flag is accepted: the request then fails on its invalid size, before any
/// model is loaded, with our error output and exit code 1.
#[test]
fn flag_aliases_reach_validation() {
    for args in [
        &["generate", "-p", "x", "-g", "5", "-W", "30"][..],
        &["generate", "-p", "x", "--guidance", "5", "-W", "30"],
        &["gen", "-p", "x", "--cfg-scale", "5", "-W", "30"],
        &["txt2img", "-p", "x", "--cfg-scale=5", "--width", "30"],
        &["generate", "-p", "x", "--sampler", "euler", "-W", "30"],
        &[
            "generate",
            "-p",
            "x",
            "--scheduler",
            "euler",
            "--karras",
            "-W",
            "30",
        ],
        // Repeated flags: the last one counts, as before.
        &["generate", "-p", "x", "-W", "64", "-W", "30", "-q", "-q"],
        &[
            "generate",
            "-p",
            "-a prompt starting with a dash",
            "-W",
            "30",
        ],
    ] {
        let o = ldm(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("error: invalid input: width and height"),
            "{args:?}: {err}"
        );
        assert!(err.contains("30"), "{args:?}: {err}");
    }
}

#[test]
fn our_errors_keep_their_form() {
    // No prompt, unknown sampler, steps 0: checked before loading, `error:` line, exit code 1.
    for (args, needle) in [
        (&["generate", "-W", "64"][..], "give a prompt"),
        (
            &["generate", "-p", "x", "--sampler", "nope"],
            "unknown sampler `nope`",
        ),
        (
            &["generate", "-p", "x", "-s", "0"],
            "--steps must be at least 1",
        ),
        (
            &["generate", "-p", "x", "--seed-mode", "odd"],
            "--seed-mode `odd`",
        ),
        (
            &["generate", "-p", "x", "--timestep-spacing", "sideways"],
            "--timestep-spacing `sideways`",
        ),
        (
            &["generate", "-p", "x", "--embeddings", "/no/such/dir"],
            "not a directory",
        ),
    ] {
        let o = ldm(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn samplers_output_is_unchanged() {
    let o = ldm(&["samplers"]);
    assert!(o.status.success());
    assert_eq!(
        stdout(&o),
        "\
--sampler        A1111 name          diffusers class
ddim             DDIM                DDIMScheduler
pndm             PLMS                PNDMScheduler (PLMS, skip_prk_steps)
euler            Euler               EulerDiscreteScheduler
euler_a          Euler a             EulerAncestralDiscreteScheduler, stochastic
dpmpp_2m         DPM++ 2M            DPMSolverMultistepScheduler (dpmsolver++, order 2)
dpmpp_2m_karras  DPM++ 2M Karras     DPMSolverMultistepScheduler + use_karras_sigmas
dpmpp_sde        DPM++ 2M SDE        DPMSolverMultistepScheduler (sde-dpmsolver++, order 2), stochastic
dpmpp_sde_karras DPM++ 2M SDE Karras DPMSolverMultistepScheduler (sde-dpmsolver++) + use_karras_sigmas, stochastic
lms              LMS                 LMSDiscreteScheduler
lms_karras       LMS Karras          LMSDiscreteScheduler + use_karras_sigmas
euler_karras     Euler Karras        EulerDiscreteScheduler + use_karras_sigmas
heun             Heun                HeunDiscreteScheduler
ddpm             DDPM                DDPMScheduler, stochastic
lcm              LCM                 LCMScheduler (LCM models and LCM-LoRA, 2-8 steps), stochastic
tcd              TCD                 TCDScheduler (gamma = --eta, 0.3 suggested)
unipc            UniPC               UniPCMultistepScheduler (bh2, order 2)
unipc_bh1        UniPC bh1           UniPCMultistepScheduler (bh1, order 2)
unipc_karras     UniPC Karras        UniPCMultistepScheduler + use_karras_sigmas
deis             DEIS                DEISMultistepScheduler (log-rho, order 2)
kdpm2            DPM2                KDPM2DiscreteScheduler
kdpm2_karras     DPM2 Karras         KDPM2DiscreteScheduler + use_karras_sigmas
kdpm2_a          DPM2 a              KDPM2AncestralDiscreteScheduler, stochastic
kdpm2_a_karras   DPM2 a Karras       KDPM2AncestralDiscreteScheduler + use_karras_sigmas, stochastic
"
    );
}

/// LoRA arguments are checked before anything loads: a missing `--lora` file, a malformed
/// `<lora:…>` tag, a tag whose file is not in the LoRA folder.
#[test]
fn lora_arguments_fail_early() {
    let empty = std::env::temp_dir().join(format!("ldm-cli-loras-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let dir = empty.to_str().unwrap();
    for (args, want) in [
        (
            &[
                "generate",
                "-p",
                "x",
                "--lora",
                "/no/such/style.safetensors:0.5",
            ][..],
            "no file /no/such/style.safetensors",
        ),
        (
            &["generate", "-p", "x <lora:a:nan>", "--lora-dir", dir],
            "not a finite number",
        ),
        (
            &["generate", "-p", "x <lora:missing:0.7>", "--lora-dir", dir],
            "missing.safetensors",
        ),
    ] {
        let o = ldm(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = stderr(&o);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("adapter:"), "{args:?} opened the GPU: {err}");
    }
    std::fs::remove_dir_all(&empty).ok();
}

/// SDXL's size/crop flags take two comma-separated numbers; anything else is refused by name
/// before a model is loaded.
#[test]
fn sdxl_size_flags_are_checked() {
    for flag in ["--original-size", "--crop-top-left", "--target-size"] {
        let o = ldm(&["generate", "-p", "x", flag, "1024x1024"]);
        assert!(!o.status.success(), "{flag} 1024x1024 was accepted");
        let err = stderr(&o);
        assert!(
            err.contains(flag) && err.contains("1024x1024"),
            "{flag}: {err}"
        );
    }
}
