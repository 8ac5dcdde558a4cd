//! Bearer-key authentication: maps a key to its tenant. Keys are never logged.

use std::collections::HashMap;
use std::sync::Arc;

use axum::http::HeaderMap;
use tether_proto::worker::v1::ApiError;

use crate::config::AuthMode;
use crate::error::api_error;

pub const OPEN_TENANT: &str = "default";

#[derive(Clone)]
pub struct Auth {
    mode: AuthMode,
    keys: Arc<HashMap<String, Arc<str>>>,
    open_tenant: Arc<str>,
}

impl Auth {
    pub fn new(mode: AuthMode, keys: &HashMap<String, String>) -> Self {
        let keys = keys.iter().map(|(k, t)| (k.clone(), Arc::from(t.as_str()))).collect();
        Auth { mode, keys: Arc::new(keys), open_tenant: Arc::from(OPEN_TENANT) }
    }

    /// Returns the tenant of the request's bearer key.
    pub fn tenant(&self, headers: &HeaderMap) -> Result<Arc<str>, ApiError> {
        let key = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .map(str::trim);
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
    use crate::config::AuthMode;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", value.parse().unwrap());
        headers
    }

    #[test]
    fn keys_map_to_tenants() {
        let auth = Auth::new(AuthMode::Keys, &HashMap::from([("sk-a".into(), "alpha".into())]));
        assert_eq!(&*auth.tenant(&headers("Bearer sk-a")).unwrap(), "alpha");
        assert_eq!(auth.tenant(&headers("Bearer sk-b")).unwrap_err().status, 401);
        assert_eq!(auth.tenant(&HeaderMap::new()).unwrap_err().code, "missing_api_key");
        let open = Auth::new(AuthMode::Open, &HashMap::new());
        assert_eq!(&*open.tenant(&HeaderMap::new()).unwrap(), "default");
    }
}
