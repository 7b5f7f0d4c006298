//! `ldm serve` over real HTTP: the built binary on a free port with the shipped tiny model, at
//! 32² / 64² and a few steps. Two server start-ups: one for the API and its failure modes, one
//! for credentials.

#![cfg(feature = "server")]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::env::temp_dir().join(format!("ldm-serve-test-{port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_ldm"))
            .args(["serve", "--port", &port.to_string()])
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start ldm serve");
        let server = Server { child, port };
        let started = Instant::now();
        while get(&server.url("/health")).0 != 200 {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "no 200 from /health; log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

fn answer(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Value) {
    match r {
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            let text = resp
                .body_mut()
                .with_config()
                .limit(64 << 20)
                .read_to_string()
                .unwrap_or_default();
            (status, serde_json::from_str(&text).unwrap_or(Value::Null))
        }
        // The server is not up yet (or refused the connection).
        Err(_) => (0, Value::Null),
    }
}

fn get(url: &str) -> (u16, Value) {
    answer(agent().get(url).call())
}

fn post(url: &str, body: &Value) -> (u16, Value) {
    answer(agent().post(url).send_json(body))
}

fn post_raw(url: &str, body: &[u8]) -> (u16, Value) {
    answer(
        agent()
            .post(url)
            .header("Content-Type", "application/json")
            .send(body),
    )
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(text.as_str().expect("a base64 string"))
        .expect("base64")
}

fn info(body: &Value) -> Value {
    serde_json::from_str(body["info"].as_str().expect("info")).expect("info is JSON")
}

/// The running job's (sampling_step, progress), or None when idle.
fn progress(server: &Server) -> Option<(u64, f64, Value)> {
    let (status, p) = get(&server.url("/sdapi/v1/progress"));
    assert_eq!(status, 200);
    let steps = p["state"]["sampling_steps"].as_u64()?;
    (steps > 0).then(|| {
        (
            p["state"]["sampling_step"].as_u64().unwrap(),
            p["progress"].as_f64().unwrap(),
            p["current_image"].clone(),
        )
    })
}

fn wait_until(what: &str, seconds: u64, mut f: impl FnMut() -> bool) {
    let started = Instant::now();
    while !f() {
        assert!(
            started.elapsed() < Duration::from_secs(seconds),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metric(server: &Server, name: &str) -> f64 {
    let text = agent()
        .get(&server.url("/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// A txt2img body at 32² that runs for a long time unless stopped.
fn long_job(seed: u64) -> Value {
    json!({"prompt": "a red circle", "steps": 150, "width": 32, "height": 32, "seed": seed,
           "sampler_name": "Euler"})
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/tiny-shapes")
}

/// txt2img matches the CLI byte for byte; img2img with a mask; OpenAI; png-info and the lists.
fn generation_endpoints(server: &Server, dir: &Path) {
    let body = json!({"prompt": "a red circle", "negative_prompt": "blue", "steps": 3,
                      "width": 64, "height": 64, "seed": 11, "cfg_scale": 7,
                      "sampler_name": "DPM++ 2M", "scheduler": "Karras", "unknown_field": 1});
    let (status, r) = post(&server.url("/sdapi/v1/txt2img"), &body);
    assert_eq!(status, 200, "{r}");
    let png = unb64(&r["images"][0]);
    let out = dir.join("cli.png");
    let cli = Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args([
            "generate",
            "-p",
            "a red circle",
            "-n",
            "blue",
            "-s",
            "3",
            "-W",
            "64",
        ])
        .args([
            "-H",
            "64",
            "--seed",
            "11",
            "-g",
            "7",
            "--sampler",
            "dpmpp_2m",
            "--karras",
        ])
        .arg("-q")
        .arg("-o")
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(cli.success());
    assert!(
        std::fs::read(&out).unwrap() == png,
        "the server's PNG differs from the CLI's"
    );
    let i = info(&r);
    assert_eq!(i["all_seeds"], json!([11]));
    assert_eq!(i["sampler_name"], "DPM++ 2M Karras");
    assert_eq!(r["parameters"]["width"], 64);
    assert_eq!(r["parameters"]["subseed"], -1);

    // png-info reads the parameters back.
    let (status, p) = post(
        &server.url("/sdapi/v1/png-info"),
        &json!({"image": b64(&png)}),
    );
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["parameters"]["Steps"], "3");
    assert_eq!(p["parameters"]["Negative prompt"], "blue");
    assert!(p["info"].as_str().unwrap().starts_with("a red circle\n"));

    // img2img with a mask (left half repainted), the init image as a data URL.
    let mask = ldm_wgpu::image::Image {
        width: 64,
        height: 64,
        rgb: (0..64 * 64)
            .flat_map(|i| [if i % 64 < 32 { 255 } else { 0 }; 3])
            .collect(),
    };
    let mask_png = mask.encode_png("mask", &[]).unwrap();
    let body = json!({"prompt": "a blue square", "steps": 3, "seed": 3,
                      "init_images": [format!("data:image/png;base64,{}", b64(&png))],
                      "mask": b64(&mask_png), "denoising_strength": 0.6});
    let (status, r) = post(&server.url("/sdapi/v1/img2img"), &body);
    assert_eq!(status, 200, "{r}");
    let img = ldm_wgpu::image::Image::from_png_bytes(&unb64(&r["images"][0]), "img2img").unwrap();
    assert_eq!((img.width, img.height), (64, 64));
    let source = ldm_wgpu::image::Image::from_png_bytes(&png, "txt2img").unwrap();
    assert_ne!(img, source);
    assert!(info(&r)["infotexts"][0]
        .as_str()
        .unwrap()
        .contains("Denoising strength: 0.6"));

    // OpenAI's images endpoint.
    let body = json!({"prompt": "a red circle", "n": 2, "size": "32x32",
                      "response_format": "b64_json", "model": "whatever"});
    let (status, r) = post(&server.url("/v1/images/generations"), &body);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["data"].as_array().unwrap().len(), 2);
    assert!(r["created"].as_u64().unwrap() > 0);
    let img = ldm_wgpu::image::Image::from_png_bytes(&unb64(&r["data"][1]["b64_json"]), "openai")
        .unwrap();
    assert_eq!(img.width, 32);

    let (_, samplers) = get(&server.url("/sdapi/v1/samplers"));
    assert!(samplers
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["name"] == "DPM++ 2M"));
    let (_, schedulers) = get(&server.url("/sdapi/v1/schedulers"));
    assert_eq!(schedulers[1]["label"], "Karras");
    let (status, e) = get(&server.url("/sdapi/v1/embeddings"));
    assert_eq!((status, e["loaded"].is_object()), (200, true));
    assert_eq!(get(&server.url("/sdapi/v1/loras")).0, 200);
}

/// Bad requests get a 4xx with a message, and the server keeps serving.
fn bad_requests(server: &Server) {
    let url = server.url("/sdapi/v1/txt2img");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("malformed JSON", b"{\"prompt\": ".to_vec()),
        (
            "wrong type",
            br#"{"prompt": "x", "steps": "many"}"#.to_vec(),
        ),
        ("missing prompt", br#"{"steps": 2}"#.to_vec()),
        (
            "65536x65536",
            br#"{"prompt": "x", "width": 65536, "height": 65536}"#.to_vec(),
        ),
        ("steps 0", br#"{"prompt": "x", "steps": 0}"#.to_vec()),
        (
            "unknown sampler",
            br#"{"prompt": "x", "sampler_name": "Nope 3000"}"#.to_vec(),
        ),
        (
            "not a multiple of 8",
            br#"{"prompt": "x", "width": 33}"#.to_vec(),
        ),
    ];
    for (what, body) in cases {
        let (status, r) = post_raw(&url, &body);
        assert_eq!(status, 422, "{what}: {r}");
        let detail = &r["detail"][0];
        assert!(
            detail["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {r}"
        );
        assert_eq!(detail["loc"][0], "body", "{what}: {r}");
    }
    let (_, r) = post_raw(&url, br#"{"prompt": "x", "steps": "many"}"#);
    assert_eq!(r["detail"][0]["loc"], json!(["body", "steps"]));
    // Over --max-body-mb 1.
    let big = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(1_200_000));
    assert_eq!(post_raw(&url, big.as_bytes()).0, 413);
    let (status, r) = post(
        &server.url("/v1/images/generations"),
        &json!({"prompt": "x", "size": "big"}),
    );
    assert_eq!(status, 400);
    assert!(r["error"]["message"].as_str().unwrap().contains("size"));
    assert_eq!(get(&server.url("/nope")).0, 404);
    // Still serving.
    let (status, _) = post(
        &url,
        &json!({"prompt": "x", "steps": 1, "width": 32, "height": 32}),
    );
    assert_eq!(status, 200);
}

/// Progress moves, interrupt stops the job within a step, a full queue answers 503, a
/// disconnected client's job is cancelled.
fn jobs(server: &Server) {
    let url = server.url("/sdapi/v1/txt2img");
    let long = {
        let url = url.clone();
        std::thread::spawn(move || {
            let (status, r) = post(&url, &long_job(1));
            (status, r, Instant::now())
        })
    };
    wait_until("the long job to start", 60, || {
        progress(server).is_some_and(|(step, _, _)| step >= 1)
    });
    let (first, _, _) = progress(server).unwrap();
    let mut preview = Value::Null;
    wait_until("progress to move and a preview", 60, || {
        let (step, p, image) = progress(server).unwrap();
        if !image.is_null() {
            preview = image;
        }
        step > first + 1 && p > 0.0 && !preview.is_null()
    });
    let preview = ldm_wgpu::image::Image::from_png_bytes(&unb64(&preview), "preview").unwrap();
    assert_eq!(preview.width, 32);

    // Four short jobs fill the queue (--queue-size 4); the next is refused.
    let short: Vec<_> = (0..4)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                post(
                    &url,
                    &json!({"prompt": "x", "steps": 1, "width": 32, "height": 32, "seed": i}),
                )
            })
        })
        .collect();
    wait_until("four queued jobs", 30, || {
        metric(server, "ldm_queue_length") == 4.0
    });
    let refused = agent()
        .post(&url)
        .send_json(json!({"prompt": "x"}))
        .unwrap();
    assert_eq!(refused.status().as_u16(), 503);
    assert!(refused.headers().get("retry-after").is_some());

    let (step_before, progress_before, _) = progress(server).unwrap();
    assert!(progress_before < 0.5);
    let interrupted_at = Instant::now();
    assert_eq!(post(&server.url("/sdapi/v1/interrupt"), &json!({})).0, 200);
    let (status, r, answered) = long.join().unwrap();
    assert_eq!(status, 200, "{r}");
    assert_eq!(info(&r)["interrupted"], true);
    let took = answered - interrupted_at;
    assert!(took < Duration::from_secs(10), "interrupt took {took:?}");
    assert!(step_before < 150);
    for s in short {
        assert_eq!(s.join().unwrap().0, 200);
    }

    // A client that goes away cancels its job.
    let body = long_job(2).to_string();
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    write!(
        stream,
        "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    wait_until("the job to start", 60, || {
        progress(server).is_some_and(|(step, _, _)| step >= 1)
    });
    drop(stream);
    let gone = Instant::now();
    wait_until("the cancelled job to stop", 20, || {
        progress(server).is_none()
    });
    assert!(gone.elapsed() < Duration::from_secs(20));

    // Skip ends the current batch only: the job goes on with the next (job_no 1).
    let two_batches = {
        let url = url.clone();
        let mut body = long_job(4);
        body["n_iter"] = json!(2);
        std::thread::spawn(move || post(&url, &body))
    };
    wait_until("the job to start", 60, || {
        progress(server).is_some_and(|(step, _, _)| step >= 1)
    });
    assert_eq!(post(&server.url("/sdapi/v1/skip"), &json!({})).0, 200);
    wait_until("the second batch", 30, || {
        get(&server.url("/sdapi/v1/progress?skip_current_image=true")).1["state"]["job_no"] == 1
    });
    assert_eq!(post(&server.url("/sdapi/v1/interrupt"), &json!({})).0, 200);
    let (status, r) = two_batches.join().unwrap();
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["images"], json!([]));
}

/// 8 requests from 4 clients: all complete, each image the one its seed gives.
fn concurrent(server: &Server) {
    let url = server.url("/sdapi/v1/txt2img");
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let url = url.clone();
            std::thread::spawn(move || {
                (0..2)
                    .map(|k| {
                        let seed = (c * 2 + k) % 4;
                        let body = json!({"prompt": "a red circle", "steps": 2, "width": 32,
                                          "height": 32, "seed": seed});
                        let (status, r) = post(&url, &body);
                        assert_eq!(status, 200, "{r}");
                        assert_eq!(info(&r)["seed"], seed);
                        // No sampler asked for: the model's scheduler config (DDIM) chose it.
                        assert_eq!(info(&r)["sampler_name"], "DDIM");
                        (seed, unb64(&r["images"][0]))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut by_seed: std::collections::BTreeMap<u64, Vec<Vec<u8>>> = Default::default();
    for c in clients {
        for (seed, png) in c.join().unwrap() {
            by_seed.entry(seed).or_default().push(png);
        }
    }
    assert_eq!(by_seed.len(), 4);
    for (seed, pngs) in &by_seed {
        assert_eq!(pngs.len(), 2);
        assert!(pngs[0] == pngs[1], "seed {seed}: two different images");
        let text = ldm_wgpu::image::Image::png_text(&pngs[0], "png").unwrap();
        assert!(text[0].1.contains(&format!("Seed: {seed},")));
    }
    assert_ne!(by_seed[&0], by_seed[&1]);
}

/// Switching checkpoints by name among --models-dir only.
fn model_switching(server: &Server) {
    let (_, models) = get(&server.url("/sdapi/v1/sd-models"));
    let titles: Vec<&str> = models
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["tiny-shapes", "tiny-copy"]);
    let options = server.url("/sdapi/v1/options");
    assert_eq!(get(&options).1["sd_model_checkpoint"], "tiny-shapes");
    for outside in ["../tiny-copy", "/etc/passwd", "tiny-copy/../../x", ""] {
        let (status, r) = post(&options, &json!({"sd_model_checkpoint": outside}));
        assert_eq!(status, 422, "{outside}: {r}");
    }
    let (status, r) = post(&options, &json!({"sd_model_checkpoint": "tiny-copy"}));
    assert_eq!(status, 200, "{r}");
    assert_eq!(get(&options).1["sd_model_checkpoint"], "tiny-copy");
    let (status, r) = post(
        &server.url("/sdapi/v1/txt2img"),
        &json!({"prompt": "x", "steps": 1, "width": 32, "height": 32}),
    );
    assert_eq!(status, 200, "{r}");
    assert!(info(&r)["infotexts"][0]
        .as_str()
        .unwrap()
        .contains("Model: tiny-copy"));
}

#[test]
fn a1111_api_over_http() {
    let dir = std::env::temp_dir().join(format!("ldm-serve-{}", std::process::id()));
    let models = dir.join("models");
    copy_dir(&tiny_model(), &models.join("tiny-copy"));
    std::fs::write(models.join("notes.txt"), "not a model").unwrap();
    let mut server = Server::start(&[
        // 4 clients never have more than 4 jobs waiting, even while the worker is between jobs.
        "--queue-size",
        "4",
        "--max-body-mb",
        "1",
        "--models-dir",
        models.to_str().unwrap(),
    ]);
    let t = Instant::now();
    generation_endpoints(&server, &dir);
    eprintln!("generation endpoints: {:.1}s", t.elapsed().as_secs_f64());
    bad_requests(&server);
    let t = Instant::now();
    jobs(&server);
    eprintln!("jobs: {:.1}s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    concurrent(&server);
    eprintln!("concurrent: {:.1}s", t.elapsed().as_secs_f64());
    assert!(
        metric(
            &server,
            "ldm_http_requests_total{endpoint=\"/sdapi/v1/txt2img\",status=\"200\"}"
        ) >= 8.0
    );
    let t = Instant::now();
    model_switching(&server);
    eprintln!("switching: {:.1}s", t.elapsed().as_secs_f64());

    // SIGTERM while a job runs and another waits: the waiting one is refused, the running one
    // finishes, and the server exits 0.
    let url = server.url("/sdapi/v1/txt2img");
    let body = json!({"prompt": "x", "steps": 12, "width": 32, "height": 32, "seed": 9,
                      "sampler_name": "Euler"});
    let running = {
        let (url, body) = (url.clone(), body.clone());
        std::thread::spawn(move || post(&url, &body).0)
    };
    wait_until("the job to start", 60, || progress(&server).is_some());
    let waiting = std::thread::spawn(move || post(&url, &body).0);
    wait_until("a queued job", 30, || {
        metric(&server, "ldm_queue_length") == 1.0
    });
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let started = Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert_eq!(running.join().unwrap(), 200);
    assert_ne!(waiting.join().unwrap(), 200);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn credentials_are_checked() {
    let server = Server::start(&["--api-auth", "alice:secret,bob:pw", "--api-key", "k123"]);
    let url = server.url("/sdapi/v1/samplers");
    let status = |req: ureq::RequestBuilder<ureq::typestate::WithoutBody>| {
        req.call().unwrap().status().as_u16()
    };
    let a = agent();
    assert_eq!(status(a.get(&url)), 401);
    let basic = |pair: &str| format!("Basic {}", b64(pair.as_bytes()));
    assert_eq!(
        status(a.get(&url).header("Authorization", basic("alice:wrong"))),
        401
    );
    assert_eq!(
        status(a.get(&url).header("Authorization", basic("alice:secret"))),
        200
    );
    assert_eq!(
        status(a.get(&url).header("Authorization", basic("bob:pw"))),
        200
    );
    assert_eq!(
        status(a.get(&url).header("Authorization", "Bearer nope")),
        401
    );
    assert_eq!(
        status(a.get(&url).header("Authorization", "Bearer k123")),
        200
    );
    assert_eq!(status(a.get(&url).header("X-API-Key", "k123")), 200);
    let resp = a
        .post(server.url("/sdapi/v1/txt2img"))
        .send_json(json!({"prompt": "x"}))
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert!(resp.headers().get("www-authenticate").is_some());
    // /health stays open for load balancers.
    assert_eq!(get(&server.url("/health")).0, 200);
    assert_eq!(status(a.get(server.url("/metrics"))), 401);
    // A raw request with no headers at all.
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.write_all(b"GET /sdapi/v1/options HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
}
