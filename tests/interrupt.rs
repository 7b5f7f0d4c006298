//! Ctrl-C during `ldm generate`: the run stops after the current step with exit status 130, and
//! the output path holds nothing (no partial PNG, no temporary file).

#[cfg(unix)]
#[test]
fn sigint_stops_after_the_current_step_and_writes_nothing() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let dir = std::env::temp_dir().join(format!("ldm-interrupt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out.png");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args([
            "generate",
            "-p",
            "a red square",
            "--seed",
            "1",
            "-W",
            "64",
            "-H",
            "64",
        ])
        .args(["--steps", "900", "--sampler", "euler", "-o"])
        .arg(&out)
        .env("XDG_CACHE_HOME", &dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ldm");
    let pid = child.id();
    // Wait for the denoising loop to start (plain progress lines when stderr is not a terminal).
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && line.starts_with("step 3/") {
                let status = Command::new("kill")
                    .args(["-INT", &pid.to_string()])
                    .status();
                assert!(status.is_ok_and(|s| s.success()), "kill -INT failed");
                sent = true;
            }
            lines.push(line);
        }
        (sent, lines)
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "ldm did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let (sent, lines) = reader.join().unwrap();
    assert!(sent, "the loop never started: {lines:?}");
    assert_eq!(status.code(), Some(130), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("interrupted")), "{lines:?}");
    let steps = lines.iter().filter(|l| l.starts_with("step ")).count();
    assert!(steps < 900, "it ran to the end");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".png") || n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    std::fs::remove_dir_all(&dir).ok();
}
