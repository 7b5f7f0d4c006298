//! The `ldm` command line.

use std::process::ExitCode;

use ldm_wgpu::{Error, GpuOptions};

const USAGE: &str = "\
ldm — latent diffusion on wgpu

USAGE:
    ldm info [--adapter NAME|INDEX]
    ldm generate -p PROMPT [options]      (see `ldm generate --help`)

GLOBAL OPTIONS:
    --adapter NAME|INDEX   choose the GPU adapter (also LDM_ADAPTER)
    --profile              print per-kernel GPU times (needs TIMESTAMP_QUERY)
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            if let Some(h) = e.hint() {
                eprintln!("hint: {h}");
            }
            ExitCode::from(1)
        }
    }
}

fn run(args: &[String]) -> Result<(), Error> {
    let Some(command) = args.first() else {
        print!("{USAGE}");
        return Ok(());
    };
    let rest = &args[1..];
    match command.as_str() {
        "info" => {
            let mut options = GpuOptions::default();
            let mut it = rest.iter();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--adapter" => options.adapter = Some(value(&mut it, a)?),
                    _ => return Err(Error::InvalidInput(format!("unknown option `{a}` for `ldm info`"))),
                }
            }
            print!("{}", ldm_wgpu::info::report(&options)?);
            Ok(())
        }
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => Err(Error::InvalidInput(format!("unknown command `{other}`; try `ldm --help`"))),
    }
}

fn value<'a>(it: &mut impl Iterator<Item = &'a String>, flag: &str) -> Result<String, Error> {
    it.next().cloned().ok_or_else(|| Error::InvalidInput(format!("{flag} needs a value")))
}
