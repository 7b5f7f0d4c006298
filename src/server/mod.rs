//! `ldm serve`: an HTTP server speaking the AUTOMATIC1111 web UI API (`/sdapi/v1/...`) and
//! OpenAI's `/v1/images/generations`, with the model loaded once per GPU and kept resident.
//!
//! - `a1111.rs`: request/response bodies and their translation to `GenerateRequest`
//! - `queue.rs`: the FIFO queue and one worker thread per adapter (progress, interrupt, cancel)
//! - `auth.rs`: basic credentials and API keys; `metrics.rs`: Prometheus; `openai.rs`
//!
//! The HTTP side is async (tokio + axum); generation is blocking GPU work on the workers' own
//! threads, reached through the queue and a one-shot reply per job.

mod a1111;
mod auth;
mod metrics;
mod openai;
mod queue;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Query, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

pub use a1111::Limits;
pub use auth::Auth;
use queue::{CancelOnDrop, Job, Queue, Refused};

use crate::error::{Error, Result};
use crate::GpuOptions;

/// Everything `ldm serve` is told on its command line.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    /// The model to start with (a diffusers folder or a single file).
    pub model: PathBuf,
    /// Where `/sdapi/v1/options` may switch to: its sub-folders and `.safetensors` files only.
    pub models_dir: Option<PathBuf>,
    /// One `GpuOptions` per worker (`--adapter all` or a list gives several).
    pub workers: Vec<GpuOptions>,
    pub auth: Auth,
    /// Origins allowed by CORS (`*` for any); none: no CORS headers.
    pub cors_allow_origins: Vec<String>,
    /// Jobs that may wait for a worker; more get 503.
    pub queue_size: usize,
    pub max_body_bytes: usize,
    pub limits: Limits,
    pub lora_dir: Option<PathBuf>,
    pub embeddings_dir: Option<PathBuf>,
}

/// The adapters `--adapter all` means: every one wgpu enumerates, by index.
pub fn all_adapters(options: &GpuOptions) -> Vec<GpuOptions> {
    let count = crate::runtime::device::enumerate(options.backends).len();
    (0..count.max(1))
        .map(|i| GpuOptions {
            adapter: Some(i.to_string()),
            ..options.clone()
        })
        .collect()
}

struct AppState {
    config: ServeConfig,
    queue: Arc<Queue>,
    metrics: metrics::Metrics,
}

type Shared = Arc<AppState>;

/// One JSON line on stderr (the request log and the workers' events).
pub(crate) fn log_event(fields: &[(&str, Value)]) {
    let mut line = Map::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    line.insert("ts".into(), json!((now * 1000.0).round() / 1000.0));
    for (k, v) in fields {
        line.insert((*k).into(), v.clone());
    }
    eprintln!("{}", Value::Object(line));
}

/// Run the server until SIGTERM or Ctrl-C: refuse new work, cancel the queued jobs, finish the
/// running ones (a second signal cancels them), answer the requests in flight, return.
pub fn serve(config: ServeConfig) -> Result<()> {
    if config.workers.is_empty() {
        return Err(Error::InvalidInput("no adapter to serve on".into()));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("tokio runtime", e))?;
    runtime.block_on(run(config))
}

async fn run(config: ServeConfig) -> Result<()> {
    let addr: SocketAddr = format!("{}:{}", config.host, config.port)
        .parse()
        .or_else(|_| {
            std::net::ToSocketAddrs::to_socket_addrs(&(config.host.as_str(), config.port))
                .ok()
                .and_then(|mut a| a.next())
                .ok_or(())
        })
        .map_err(|()| Error::InvalidInput(format!("--host {}: not an address", config.host)))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(addr.to_string(), e))?;
    let queue = Arc::new(Queue::new(
        config.workers.len(),
        config.queue_size,
        config.model.clone(),
    ));
    for (index, gpu) in config.workers.iter().enumerate() {
        let cfg = queue::WorkerConfig {
            index,
            gpu: gpu.clone(),
            lora_dir: config.lora_dir.clone(),
            embeddings_dir: config.embeddings_dir.clone(),
        };
        let q = queue.clone();
        std::thread::Builder::new()
            .name(format!("ldm-worker-{index}"))
            .spawn(move || queue::run_worker(q, cfg))
            .map_err(|e| Error::io("worker thread", e))?;
    }
    let state = Arc::new(AppState {
        config,
        queue: queue.clone(),
        metrics: metrics::Metrics::default(),
    });
    let app = router(state.clone());
    log_event(&[
        ("event", "listening".into()),
        (
            "address",
            listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default()
                .into(),
        ),
    ]);
    // SIGTERM or Ctrl-C: refuse new work, drop the queue, let the running jobs finish (what a
    // Kubernetes grace period is for); a second signal cancels them too.
    let shutdown_queue = queue.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            log_event(&[("event", "shutting_down".into())]);
            shutdown_queue.shut_down(false);
            tokio::spawn(async move {
                shutdown_signal().await;
                log_event(&[("event", "cancelling_running_jobs".into())]);
                shutdown_queue.shut_down(true);
            });
        })
        .await
        .map_err(|e| Error::io("server", e))?;
    log_event(&[("event", "stopped".into())]);
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

fn router(state: Shared) -> Router {
    let mut app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route("/sdapi/v1/img2img", post(img2img))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        .route("/sdapi/v1/skip", post(skip))
        .route(
            "/sdapi/v1/samplers",
            get(|| async { Json(a1111::samplers()) }),
        )
        .route(
            "/sdapi/v1/schedulers",
            get(|| async { Json(a1111::schedulers()) }),
        )
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/options", get(get_options).post(set_options))
        .route("/sdapi/v1/loras", get(loras))
        .route("/sdapi/v1/embeddings", get(embeddings))
        .route("/sdapi/v1/png-info", post(png_info))
        .route("/v1/images/generations", post(openai_generate))
        .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))) })
        .layer(axum::middleware::from_fn_with_state(state.clone(), access))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes));
    if !state.config.cors_allow_origins.is_empty() {
        use tower_http::cors::{AllowOrigin, Any, CorsLayer};
        let origins = &state.config.cors_allow_origins;
        let allow = if origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(allow)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers(Any),
        );
    }
    app.with_state(state)
}

/// Auth, then the request log line and the request counter.
async fn access(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_string(), |m| m.as_str().to_string());
    let open = path == "/health";
    let response = if open || state.config.auth.allows(req.headers()) {
        next.run(req).await
    } else {
        let mut r = (
            StatusCode::UNAUTHORIZED,
            Json(json!({"detail": "Not authenticated"})),
        )
            .into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"ldm\""),
        );
        r
    };
    let status = response.status().as_u16();
    state.metrics.record(&endpoint, status);
    log_event(&[
        ("method", method.into()),
        ("path", path.into()),
        ("status", status.into()),
        (
            "ms",
            (started.elapsed().as_secs_f64() * 1000.0).round().into(),
        ),
    ]);
    response
}

async fn health(State(state): State<Shared>) -> Response {
    if state.queue.ready() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response()
    }
}

async fn metrics_text(State(state): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&state.queue),
    )
        .into_response()
}

fn unprocessable(invalid: &a1111::Invalid) -> Response {
    (StatusCode::UNPROCESSABLE_ENTITY, Json(invalid.body())).into_response()
}

fn unavailable(message: &str, retry_after: u32) -> Response {
    let mut r = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"detail": message})),
    )
        .into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    r
}

/// Queue a job and wait for it; the job is cancelled if this future is dropped (the client went
/// away). Err: the response to send instead.
async fn run_job(
    state: &Shared,
    work: queue::GenJob,
) -> std::result::Result<queue::JobOutput, Response> {
    let (job, reply) = Job::new(work);
    match state.queue.submit(job.clone()) {
        Ok(()) => {}
        Err(Refused::Full) => {
            return Err(unavailable(
                "the queue is full; try again later",
                (state.queue.len() as u32).max(1) * 5,
            ))
        }
        Err(Refused::ShuttingDown) => return Err(unavailable("the server is shutting down", 10)),
    }
    let mut guard = CancelOnDrop(Some(job));
    let result = reply.await;
    guard.0 = None;
    let stopping = state
        .queue
        .shutting_down
        .load(std::sync::atomic::Ordering::Relaxed);
    match result {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(_)) if stopping => Err(unavailable("the server is shutting down", 10)),
        Ok(Err(Error::InvalidInput(m))) => Err(unprocessable(&a1111::Invalid::general(m))),
        Ok(Err(e)) => Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "GenerationError", "detail": e.to_string()})),
        )
            .into_response()),
        Err(_) => Err(unavailable("the worker stopped", 10)),
    }
}

fn native_size(state: &Shared) -> Option<usize> {
    state.queue.loaded().map(|l| l.native_size)
}

async fn generate_a1111(state: Shared, body: Bytes, img2img: bool) -> Response {
    let mut r: a1111::GenerationRequest = match a1111::parse_body(&body) {
        Ok(r) => r,
        Err(e) => return unprocessable(&e),
    };
    if img2img && r.init_images.is_none() {
        return unprocessable(&a1111::Invalid::field("init_images", "field required"));
    }
    if !img2img {
        r.init_images = None;
        r.mask = None;
    }
    let Some(native) = native_size(&state) else {
        return unavailable("the model is loading", 5);
    };
    let work = match a1111::to_job(&mut r, native, &state.config.limits) {
        Ok(w) => w,
        Err(e) => return unprocessable(&e),
    };
    let request = work.req.clone();
    let n_iter = work.n_iter;
    match run_job(&state, work).await {
        Ok(out) => {
            let job = queue::GenJob {
                req: request,
                n_iter,
            };
            Json(a1111::response(&r, &job, &out)).into_response()
        }
        Err(response) => response,
    }
}

async fn txt2img(State(state): State<Shared>, body: Bytes) -> Response {
    generate_a1111(state, body, false).await
}

async fn img2img(State(state): State<Shared>, body: Bytes) -> Response {
    generate_a1111(state, body, true).await
}

async fn openai_generate(State(state): State<Shared>, body: Bytes) -> Response {
    let bad = |m: &str| (StatusCode::BAD_REQUEST, Json(openai::error(m))).into_response();
    let r: openai::ImagesRequest = match a1111::parse_body(&body) {
        Ok(r) => r,
        Err(e) => return bad(&e.message),
    };
    let mut a = match openai::to_a1111(&r) {
        Ok(a) => a,
        Err(m) => return bad(&m),
    };
    let Some(native) = native_size(&state) else {
        return unavailable("the model is loading", 5);
    };
    let work = match a1111::to_job(&mut a, native, &state.config.limits) {
        Ok(w) => w,
        Err(e) => return bad(&e.message),
    };
    match run_job(&state, work).await {
        Ok(out) => Json(openai::response(&out)).into_response(),
        Err(response) => response,
    }
}

#[derive(serde::Deserialize)]
struct ProgressQuery {
    #[serde(default)]
    skip_current_image: bool,
}

async fn progress(State(state): State<Shared>, Query(q): Query<ProgressQuery>) -> Response {
    let running = state.queue.running();
    let Some(r) = running.first() else {
        return Json(json!({
            "progress": 0.0, "eta_relative": 0.0,
            "state": {"skipped": false, "interrupted": false, "job": "", "job_count": 0,
                      "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                      "sampling_steps": 0},
            "current_image": null, "textinfo": null,
        }))
        .into_response();
    };
    if !q.skip_current_image {
        state.queue.want_preview();
    }
    let per_job = r.sampling_step as f64 / r.sampling_steps.max(1) as f64;
    let progress = ((r.job_no as f64 + per_job) / r.job_count.max(1) as f64).min(1.0);
    let elapsed = r.started.elapsed().as_secs_f64();
    let eta = if progress > 0.0 {
        elapsed / progress - elapsed
    } else {
        0.0
    };
    let image = if q.skip_current_image {
        None
    } else {
        r.current_image.clone()
    };
    Json(json!({
        "progress": progress,
        "eta_relative": eta,
        "state": {
            "skipped": r.job.skipping(), "interrupted": r.job.interrupting(),
            "job": format!("job {}", r.job_timestamp),
            "job_count": r.job_count, "job_timestamp": r.job_timestamp, "job_no": r.job_no,
            "sampling_step": r.sampling_step, "sampling_steps": r.sampling_steps,
        },
        "current_image": image,
        "textinfo": r.textinfo,
    }))
    .into_response()
}

async fn interrupt(State(state): State<Shared>) -> Json<Value> {
    state.queue.interrupt();
    Json(json!({}))
}

async fn skip(State(state): State<Shared>) -> Json<Value> {
    state.queue.skip();
    Json(json!({}))
}

/// A checkpoint `/sdapi/v1/options` may switch to.
struct Checkpoint {
    title: String,
    path: PathBuf,
}

/// The loaded model and whatever `--models-dir` holds: diffusers folders (with
/// `model_index.json` or `unet/`) and `.safetensors` files, one level deep, no symlinks out.
fn checkpoints(state: &Shared) -> Vec<Checkpoint> {
    let mut out = vec![Checkpoint {
        title: crate::parameters::model_name(&state.config.model),
        path: state.config.model.clone(),
    }];
    let Some(dir) = &state.config.models_dir else {
        return out;
    };
    let Ok(root) = dir.canonicalize() else {
        return out;
    };
    let Ok(entries) = std::fs::read_dir(&root) else {
        return out;
    };
    let mut found: Vec<Checkpoint> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let path = e.path().canonicalize().ok()?;
            if !path.starts_with(&root) {
                return None;
            }
            let is_model = if path.is_dir() {
                path.join("model_index.json").is_file() || path.join("unet").is_dir()
            } else {
                path.extension().is_some_and(|x| x == "safetensors")
            };
            let name = e.file_name().to_string_lossy().to_string();
            is_model.then_some(Checkpoint { title: name, path })
        })
        .collect();
    found.sort_by(|a, b| a.title.cmp(&b.title));
    let initial = state.config.model.canonicalize().ok();
    found.retain(|c| Some(&c.path) != initial.as_ref());
    out.extend(found);
    out
}

async fn sd_models(State(state): State<Shared>) -> Json<Value> {
    let list: Vec<Value> = checkpoints(&state)
        .iter()
        .map(|c| {
            json!({
                "title": c.title,
                "model_name": crate::parameters::model_name(Path::new(&c.title)),
                "hash": null,
                "sha256": null,
                "filename": c.path.display().to_string(),
                "config": null,
            })
        })
        .collect();
    Json(Value::Array(list))
}

fn current_title(state: &Shared) -> Option<String> {
    let loaded = state.queue.loaded()?;
    checkpoints(state)
        .into_iter()
        .find(|c| c.path == loaded.path)
        .map(|c| c.title)
}

async fn get_options(State(state): State<Shared>) -> Json<Value> {
    Json(json!({
        "sd_model_checkpoint": current_title(&state),
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
    }))
}

/// Only `sd_model_checkpoint` changes anything: a title (or model name) from `/sd-models`,
/// never a path from the request. Waits until every worker holds the new model.
async fn set_options(State(state): State<Shared>, body: Bytes) -> Response {
    let options: Map<String, Value> = match a1111::parse_body(&body) {
        Ok(o) => o,
        Err(e) => return unprocessable(&e),
    };
    let Some(wanted) = options.get("sd_model_checkpoint") else {
        return Json(Value::Null).into_response();
    };
    let Some(wanted) = wanted.as_str() else {
        return unprocessable(&a1111::Invalid::field("sd_model_checkpoint", "a string"));
    };
    let found = checkpoints(&state).into_iter().find(|c| {
        c.title == wanted || crate::parameters::model_name(Path::new(&c.title)) == wanted
    });
    let Some(checkpoint) = found else {
        return unprocessable(&a1111::Invalid::field(
            "sd_model_checkpoint",
            format!("no checkpoint `{wanted}` (GET /sdapi/v1/sd-models lists them)"),
        ));
    };
    let generation = state.queue.switch_model(checkpoint.path);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        match state.queue.switched(generation) {
            Ok(true) => return Json(Value::Null).into_response(),
            Ok(false) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Ok(false) => return unavailable("the model is still loading", 10),
            Err(e) => {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(json!({"error": "ModelLoadError", "detail": e})),
                )
                    .into_response()
            }
        }
    }
}

async fn loras(State(state): State<Shared>) -> Json<Value> {
    let dir = match (&state.config.lora_dir, state.queue.loaded()) {
        (Some(d), _) => d.clone(),
        (None, Some(l)) => crate::lora::default_lora_dir(&l.path),
        (None, None) => return Json(json!([])),
    };
    let mut list = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.filter_map(|e| e.ok()) {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "safetensors") {
                let name = crate::parameters::model_name(&path);
                list.push(json!({"name": name, "alias": name,
                                 "path": path.display().to_string(), "metadata": {}}));
            }
        }
    }
    Json(Value::Array(list))
}

async fn embeddings(State(state): State<Shared>) -> Json<Value> {
    let mut loaded = Map::new();
    let mut skipped = Map::new();
    if let Some(report) = state.queue.loaded().and_then(|l| l.embeddings) {
        for (name, vectors) in report.loaded {
            loaded.insert(name, json!({"vectors": vectors}));
        }
        for (name, why) in report.skipped {
            skipped.insert(name, json!({"reason": why}));
        }
    }
    Json(json!({"loaded": loaded, "skipped": skipped}))
}

#[derive(serde::Deserialize)]
struct PngInfoRequest {
    image: String,
}

async fn png_info(body: Bytes) -> Response {
    let r: PngInfoRequest = match a1111::parse_body(&body) {
        Ok(r) => r,
        Err(e) => return unprocessable(&e),
    };
    let bytes = match a1111::decode_base64("image", &r.image) {
        Ok(b) => b,
        Err(e) => return unprocessable(&e),
    };
    let text = match crate::image::Image::png_text(&bytes, "image") {
        Ok(t) => t,
        Err(e) => return unprocessable(&a1111::Invalid::field("image", e.to_string())),
    };
    let items: Map<String, Value> = text.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    let info = text
        .iter()
        .find(|(k, _)| k == "parameters")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    Json(json!({
        "info": info,
        "items": items,
        "parameters": a1111::parse_infotext(&info),
    }))
    .into_response()
}
