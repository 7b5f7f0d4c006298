//! Who may call the API: HTTP basic credentials (`--api-auth user:pass[,user2:pass2]`, as
//! A1111's flag) and/or API keys (`--api-key`, sent as `Authorization: Bearer KEY`, which the
//! OpenAI clients do, or `X-API-Key`). With neither configured, everyone on the listening
//! address may (the default address is 127.0.0.1).

use axum::http::HeaderMap;
use base64::Engine as _;

#[derive(Clone, Debug, Default)]
pub struct Auth {
    /// `user:pass` pairs, as given.
    pub basic: Vec<String>,
    pub keys: Vec<String>,
}

impl Auth {
    pub fn enabled(&self) -> bool {
        !self.basic.is_empty() || !self.keys.is_empty()
    }

    /// Whether the request's headers carry one of the configured credentials.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        if !self.enabled() {
            return true;
        }
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        if let Some(key) = header("x-api-key") {
            if self.keys.iter().any(|k| same(k, key)) {
                return true;
            }
        }
        let Some(authorization) = header("authorization") else {
            return false;
        };
        if let Some(token) = authorization.strip_prefix("Bearer ") {
            return self.keys.iter().any(|k| same(k, token.trim()));
        }
        if let Some(encoded) = authorization.strip_prefix("Basic ") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok());
            if let Some(pair) = decoded {
                return self.basic.iter().any(|p| same(p, &pair));
            }
        }
        false
    }
}

/// Equality that takes the same time wherever the strings differ (no timing oracle for a
/// password), only their lengths leak.
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_and_keys() {
        let auth = Auth {
            basic: vec!["u:p".into()],
            keys: vec!["k1".into()],
        };
        let mut h = HeaderMap::new();
        assert!(!auth.allows(&h));
        h.insert("authorization", "Basic dTpw".parse().unwrap());
        assert!(auth.allows(&h));
        h.insert("authorization", "Basic dTpx".parse().unwrap());
        assert!(!auth.allows(&h));
        h.insert("authorization", "Bearer k1".parse().unwrap());
        assert!(auth.allows(&h));
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "k1".parse().unwrap());
        assert!(auth.allows(&h));
        assert!(Auth::default().allows(&HeaderMap::new()));
    }
}
