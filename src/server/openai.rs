//! OpenAI's image generation endpoint (`POST /v1/images/generations`), enough for the official
//! clients: `prompt`, `n`, `size` ("WxH"), `response_format` "b64_json"; `model`, `quality` and
//! `style` are accepted and ignored.

use serde::Deserialize;
use serde_json::{json, Value};

use super::a1111::{b64, GenerationRequest};
use super::queue::JobOutput;

#[derive(Debug, Deserialize)]
pub struct ImagesRequest {
    pub prompt: String,
    #[serde(default = "one")]
    pub n: usize,
    pub size: Option<String>,
    pub response_format: Option<String>,
}

fn one() -> usize {
    1
}

/// OpenAI's error body.
pub fn error(message: &str) -> Value {
    json!({"error": {"message": message, "type": "invalid_request_error", "param": null,
                     "code": null}})
}

/// The A1111 request the OpenAI one stands for.
pub fn to_a1111(r: &ImagesRequest) -> Result<GenerationRequest, String> {
    if let Some(f) = r.response_format.as_deref() {
        if f != "b64_json" {
            return Err(format!(
                "response_format `{f}`: only b64_json is served (no image hosting)"
            ));
        }
    }
    let size = match r.size.as_deref() {
        None | Some("auto") => None,
        Some(s) => {
            let parsed = s
                .split_once('x')
                .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)));
            Some(parsed.ok_or_else(|| format!("size `{s}`: give WIDTHxHEIGHT, e.g. 512x512"))?)
        }
    };
    Ok(GenerationRequest {
        prompt: Some(r.prompt.clone()),
        batch_size: r.n,
        width: size.map(|s: (usize, usize)| s.0),
        height: size.map(|s| s.1),
        ..GenerationRequest::default()
    })
}

pub fn response(out: &JobOutput) -> Value {
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let data: Vec<Value> = out
        .images
        .iter()
        .map(|i| json!({"b64_json": b64(&i.png)}))
        .collect();
    json!({"created": created, "data": data})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(size: Option<&str>, format: Option<&str>) -> ImagesRequest {
        ImagesRequest {
            prompt: "x".into(),
            n: 2,
            size: size.map(Into::into),
            response_format: format.map(Into::into),
        }
    }

    #[test]
    fn size_and_format() {
        let a = to_a1111(&request(Some("512x768"), Some("b64_json"))).unwrap();
        assert_eq!((a.width, a.height, a.batch_size), (Some(512), Some(768), 2));
        assert_eq!(to_a1111(&request(None, None)).unwrap().width, None);
        assert!(to_a1111(&request(Some("huge"), None)).is_err());
        assert!(to_a1111(&request(None, Some("url"))).is_err());
    }
}
