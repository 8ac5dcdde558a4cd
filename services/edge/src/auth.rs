//! Bearer-key authentication: maps a key to its tenant. Keys are never logged.

use std::collections::HashMap;
use std::sync::Arc;

use axum::http::HeaderMap;
use tether_proto::worker::v1::ApiError;

use crate::config::{AdminKey, AuthMode};
use crate::error::api_error;

pub const OPEN_TENANT: &str = "default";

#[derive(Clone)]
pub struct Auth {
    mode: AuthMode,
    keys: Arc<HashMap<String, Arc<str>>>,
    open_tenant: Arc<str>,
    admin_key: Option<AdminKey>,
}

/// The bearer token exactly as sent: `Bearer ` (either case of the scheme) and the rest
/// untouched. Surrounding spaces are not trimmed: `Bearer  sk-a ` is not the key `sk-a`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
}

/// Compares two secrets in time that depends only on their lengths.
fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    pub fn new(mode: AuthMode, keys: &HashMap<String, String>, admin_key: Option<AdminKey>) -> Self {
        let keys = keys.iter().map(|(k, t)| (k.clone(), Arc::from(t.as_str()))).collect();
        Auth { mode, keys: Arc::new(keys), open_tenant: Arc::from(OPEN_TENANT), admin_key }
    }

    /// Lets an operator in: anyone with open auth; with keys, only the admin key (and nobody
    /// when none is configured).
    pub fn admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.mode == AuthMode::Open {
            return Ok(());
        }
        let Some(AdminKey(admin)) = &self.admin_key else {
            return Err(api_error(
                403,
                "invalid_request_error",
                "forbidden",
                "This endpoint is disabled: the server has no admin key configured.",
                "",
            ));
        };
        match bearer(headers) {
            Some(key) if secrets_equal(key.as_bytes(), admin.as_bytes()) => Ok(()),
            Some(_) => {
                Err(api_error(403, "invalid_request_error", "forbidden", "This endpoint needs the admin key.", ""))
            }
            None => Err(api_error(
                401,
                "invalid_request_error",
                "missing_api_key",
                "You didn't provide an API key. Provide it in an Authorization header (Bearer auth).",
                "",
            )),
        }
    }

    /// Returns the tenant of the request's bearer key.
    pub fn tenant(&self, headers: &HeaderMap) -> Result<Arc<str>, ApiError> {
        let key = bearer(headers);
        match (self.mode, key) {
            (AuthMode::Open, _) => Ok(self.open_tenant.clone()),
            (AuthMode::Keys, Some(key)) => self.keys.get(key).cloned().ok_or_else(|| {
                api_error(401, "invalid_request_error", "invalid_api_key", "Incorrect API key provided.", "")
            }),
            (AuthMode::Keys, None) => Err(api_error(
                401,
                "invalid_request_error",
                "missing_api_key",
                "You didn't provide an API key. Provide it in an Authorization header (Bearer auth).",
                "",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use axum::http::HeaderMap;

    use super::Auth;
    use crate::config::{AdminKey, AuthMode};

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", value.parse().unwrap());
        headers
    }

    #[test]
    fn keys_map_to_tenants() {
        let auth = Auth::new(AuthMode::Keys, &HashMap::from([("sk-a".into(), "alpha".into())]), None);
        assert_eq!(&*auth.tenant(&headers("Bearer sk-a")).unwrap(), "alpha");
        assert_eq!(auth.tenant(&headers("Bearer sk-b")).unwrap_err().status, 401);
        assert_eq!(auth.tenant(&HeaderMap::new()).unwrap_err().code, "missing_api_key");
        let open = Auth::new(AuthMode::Open, &HashMap::new(), None);
        assert_eq!(&*open.tenant(&HeaderMap::new()).unwrap(), "default");
    }

    #[test]
    fn the_bearer_token_is_not_trimmed() {
        let auth = Auth::new(AuthMode::Keys, &HashMap::from([("sk-a".into(), "alpha".into())]), None);
        for sent in ["Bearer  sk-a ", "Bearer sk-a ", "Bearer  sk-a", "Bearer\tsk-a"] {
            assert_eq!(auth.tenant(&headers(sent)).unwrap_err().status, 401, "{sent:?}");
        }
        assert_eq!(&*auth.tenant(&headers("bearer sk-a")).unwrap(), "alpha");
    }

    #[test]
    fn the_cluster_view_needs_the_admin_key_with_keys() {
        let keys = HashMap::from([("sk-a".into(), "alpha".into())]);
        let none = Auth::new(AuthMode::Keys, &keys, None);
        assert_eq!(none.admin(&headers("Bearer sk-a")).unwrap_err().status, 403, "no admin key configured");
        let admin = Auth::new(AuthMode::Keys, &keys, Some(AdminKey("sk-admin".into())));
        assert!(admin.admin(&headers("Bearer sk-admin")).is_ok());
        assert_eq!(admin.admin(&headers("Bearer sk-a")).unwrap_err().status, 403, "a tenant key is not enough");
        assert_eq!(admin.admin(&headers("Bearer sk-admin ")).unwrap_err().status, 403);
        assert_eq!(admin.admin(&HeaderMap::new()).unwrap_err().status, 401);
        assert!(Auth::new(AuthMode::Open, &HashMap::new(), None).admin(&HeaderMap::new()).is_ok());
    }
}
