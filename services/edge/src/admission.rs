//! Admission: the one path by which a turn, a WebSocket connection or a request is let in.
//!
//! Every limit is stated per resource (the edge-wide permits and, per tenant, in-flight
//! responses, open WebSocket connections and a request-rate token bucket), so one tenant cannot
//! take another's capacity. A [`TurnGuard`] holds the tenant's and the edge's in-flight
//! permits, the in-flight gauge and the outcome counter; a [`ConnectionGuard`] holds the
//! connection permits and gauge. Both are acquired in one constructor and released in `Drop`,
//! so a cancelled or aborted task (a client that went away) cannot leak a slot or a gauge.
//!
//! Tenants are known at startup (the tenants of the configured keys, or `default` with open
//! auth), so the table never grows and the `tenant` metric label has bounded cardinality.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tether_proto::worker::v1::ApiError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::OPEN_TENANT;
use crate::config::{AuthMode, EdgeConfig, TenantLimitKind};
use crate::error::rate_limited;
use crate::metrics as m;
use crate::stats::EdgeStats;

/// Which limit refused a request (the `limit` label of the refusal counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    TenantInFlight,
    EdgeInFlight,
    TenantRate,
    TenantConnections,
    EdgeConnections,
    WsQueue,
}

impl Limit {
    pub fn as_label(self) -> &'static str {
        match self {
            Limit::TenantInFlight => "tenant_in_flight",
            Limit::EdgeInFlight => "edge_in_flight",
            Limit::TenantRate => "tenant_rate",
            Limit::TenantConnections => "tenant_connections",
            Limit::EdgeConnections => "edge_connections",
            Limit::WsQueue => "ws_queue",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Limit::TenantInFlight => "Too many responses in progress for this API key's tenant. Retry shortly.",
            Limit::EdgeInFlight => "Too many responses in progress on this server. Retry shortly.",
            Limit::TenantRate => "Too many requests for this API key's tenant. Slow down and retry shortly.",
            Limit::TenantConnections => "Too many open WebSocket connections for this API key's tenant.",
            Limit::EdgeConnections => "Too many open WebSocket connections on this server.",
            Limit::WsQueue => {
                "Too many response.create events queued on this WebSocket connection. Wait for responses to finish."
            }
        }
    }
}

/// How an admitted turn ended (the `outcome` label of the request counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A completed (or incomplete) response.
    Ok,
    /// An error before the response existed.
    Error,
    /// A `response.failed`.
    Failed,
    /// The client went away or read too slowly; the guard was dropped before an outcome.
    Cancelled,
}

impl Outcome {
    fn as_label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// A tenant's resolved limits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TenantLimits {
    pub max_in_flight: usize,
    pub max_connections: usize,
    /// Requests per second; `None` is unlimited.
    pub rate: Option<f64>,
    pub burst: u32,
}

/// The request rate of a tenant with `--auth keys` unless configured.
pub const DEFAULT_KEYS_RATE: f64 = 100.0;

struct Tenant {
    name: Arc<str>,
    in_flight: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    /// `None`: no rate limit.
    bucket: Option<Mutex<TokenBucket>>,
}

impl Tenant {
    fn new(name: &str, limits: TenantLimits) -> Self {
        Tenant {
            name: Arc::from(name),
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            bucket: limits.rate.map(|rate| Mutex::new(TokenBucket::new(rate, limits.burst, Instant::now()))),
        }
    }
}

pub struct Admission {
    /// Responses in progress across the edge.
    in_flight: Arc<Semaphore>,
    /// Open WebSocket connections across the edge.
    pub connections: Arc<Semaphore>,
    tenants: HashMap<Arc<str>, Arc<Tenant>>,
    /// For a tenant not in the table (cannot happen: auth only yields configured tenants).
    fallback: Arc<Tenant>,
    /// Every admitted turn's outcome and time to first event, for the operator view.
    stats: Arc<EdgeStats>,
}

/// A tenant's share of an edge-wide limit by default: the limit divided by the number of
/// tenants, but by at most 4 (several tenants may be busy at different times).
fn default_share(edge_limit: usize, tenants: usize) -> usize {
    (edge_limit / tenants.clamp(1, 4)).max(1)
}

/// Resolves every tenant's limits from the configuration.
pub fn tenant_limits(config: &EdgeConfig) -> HashMap<String, TenantLimits> {
    let mut names: Vec<String> = match config.auth {
        AuthMode::Open => vec![OPEN_TENANT.to_owned()],
        AuthMode::Keys => config.api_keys.values().cloned().collect(),
    };
    names.sort();
    names.dedup();
    let base = TenantLimits {
        max_in_flight: config.tenant_max_in_flight.unwrap_or_else(|| default_share(config.max_in_flight, names.len())),
        max_connections: config
            .tenant_max_connections
            .unwrap_or_else(|| default_share(config.max_connections, names.len())),
        rate: match (config.tenant_rate, config.auth) {
            (Some(rate), _) => Some(rate),
            (None, AuthMode::Keys) => Some(DEFAULT_KEYS_RATE),
            (None, AuthMode::Open) => None,
        },
        burst: config.tenant_burst,
    };
    let mut limits: HashMap<String, TenantLimits> = names.into_iter().map(|name| (name, base)).collect();
    for setting in &config.tenant_limits {
        let Some(tenant) = limits.get_mut(&setting.tenant) else { continue };
        match setting.limit {
            TenantLimitKind::MaxInFlight(n) => tenant.max_in_flight = n,
            TenantLimitKind::MaxConnections(n) => tenant.max_connections = n,
            TenantLimitKind::Rate(rate) => tenant.rate = Some(rate),
            TenantLimitKind::Burst(burst) => tenant.burst = burst,
        }
    }
    limits
}

impl Admission {
    pub fn new(config: &EdgeConfig) -> Self {
        let tenants = tenant_limits(config)
            .into_iter()
            .map(|(name, limits)| {
                let tenant = Arc::new(Tenant::new(&name, limits));
                (tenant.name.clone(), tenant)
            })
            .collect();
        let fallback = TenantLimits { max_in_flight: 0, max_connections: 0, rate: Some(0.0), burst: 0 };
        Admission {
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            connections: Arc::new(Semaphore::new(config.max_connections)),
            tenants,
            fallback: Arc::new(Tenant::new("unknown", fallback)),
            stats: Arc::default(),
        }
    }

    /// The turn statistics of the operator view.
    pub fn stats(&self) -> &Arc<EdgeStats> {
        &self.stats
    }

    fn tenant(&self, name: &str) -> &Arc<Tenant> {
        self.tenants.get(name).unwrap_or(&self.fallback)
    }

    /// Counts a refusal and returns its 429 error.
    fn refuse(tenant: &Tenant, limit: Limit) -> ApiError {
        metrics::counter!(m::ADMISSION_REFUSED, "tenant" => tenant.name.to_string(), "limit" => limit.as_label())
            .increment(1);
        rate_limited(limit.message())
    }

    /// Counts a refusal by a limit outside this table (the WebSocket queue) and returns its error.
    pub fn refused(&self, tenant: &str, limit: Limit) -> ApiError {
        Self::refuse(self.tenant(tenant), limit)
    }

    /// Takes one token from the tenant's request-rate bucket.
    pub fn check_rate(&self, tenant: &str) -> Result<(), ApiError> {
        let tenant = self.tenant(tenant);
        match &tenant.bucket {
            Some(bucket) if !bucket.lock().take(Instant::now()) => Err(Self::refuse(tenant, Limit::TenantRate)),
            _ => Ok(()),
        }
    }

    /// Admits a turn: the tenant's in-flight permit, then the edge's.
    pub fn turn(&self, tenant: &str, transport: &'static str) -> Result<TurnGuard, ApiError> {
        let span = tracing::info_span!("edge.admission", admitted = false);
        let _entered = span.enter();
        let tenant = self.tenant(tenant);
        let Ok(tenant_permit) = tenant.in_flight.clone().try_acquire_owned() else {
            return Err(Self::refuse(tenant, Limit::TenantInFlight));
        };
        let Ok(edge_permit) = self.in_flight.clone().try_acquire_owned() else {
            return Err(Self::refuse(tenant, Limit::EdgeInFlight));
        };
        metrics::gauge!(m::IN_FLIGHT, "tenant" => tenant.name.to_string()).increment(1.0);
        span.record("admitted", true);
        Ok(TurnGuard {
            tenant: tenant.clone(),
            transport,
            started: tokio::time::Instant::now(),
            first_event_seen: false,
            first_delta: None,
            outcome: Outcome::Cancelled,
            stats: self.stats.clone(),
            _tenant_permit: tenant_permit,
            _edge_permit: edge_permit,
        })
    }

    /// Admits a WebSocket connection: the tenant's connection permit, then the edge's.
    pub fn connection(&self, tenant: &str) -> Result<ConnectionGuard, ApiError> {
        let tenant = self.tenant(tenant);
        let Ok(tenant_permit) = tenant.connections.clone().try_acquire_owned() else {
            return Err(Self::refuse(tenant, Limit::TenantConnections));
        };
        let Ok(edge_permit) = self.connections.clone().try_acquire_owned() else {
            return Err(Self::refuse(tenant, Limit::EdgeConnections));
        };
        metrics::gauge!(m::WS_CONNECTIONS, "tenant" => tenant.name.to_string()).increment(1.0);
        metrics::counter!(m::WS_CONNECTIONS_ACCEPTED).increment(1);
        Ok(ConnectionGuard { tenant: tenant.clone(), _tenant_permit: tenant_permit, _edge_permit: edge_permit })
    }

    /// Responses in progress across the edge (for tests and the drain).
    pub fn in_flight(&self, max_in_flight: usize) -> usize {
        max_in_flight - self.in_flight.available_permits()
    }
}

/// One admitted turn. Dropping it frees its slots, lowers the gauge and counts the outcome.
#[must_use = "the turn is admitted only while the guard lives"]
pub struct TurnGuard {
    tenant: Arc<Tenant>,
    transport: &'static str,
    /// tokio's clock (the std one outside tests): a paused test clock can drive it.
    started: tokio::time::Instant,
    first_event_seen: bool,
    /// When the first output delta (the first token the client sees) was relayed.
    first_delta: Option<Duration>,
    outcome: Outcome,
    stats: Arc<EdgeStats>,
    _tenant_permit: OwnedSemaphorePermit,
    _edge_permit: OwnedSemaphorePermit,
}

impl TurnGuard {
    /// Records the time to the first event, once.
    pub fn first_event(&mut self) {
        if !self.first_event_seen {
            self.first_event_seen = true;
            metrics::histogram!(m::FIRST_EVENT_SECONDS).record(self.started.elapsed().as_secs_f64());
            self.stats.first_event(self.started.elapsed());
        }
    }

    /// Notes a relayed event: the first output delta's time and, on the terminal event, the
    /// router's share of the client's time to first token (that time minus the engine's own
    /// queue and prefill, which the worker reports with the terminal event).
    pub fn relayed(&mut self, event_type: &str, engine_ttft_us: u64) {
        if self.first_delta.is_none() && event_type.ends_with(".delta") {
            self.first_delta = Some(self.started.elapsed());
        }
        if engine_ttft_us > 0
            && let Some(first_delta) = self.first_delta
        {
            self.stats.router_overhead(first_delta.saturating_sub(Duration::from_micros(engine_ttft_us)));
        }
    }

    /// Sets how the turn ended (left `Cancelled` if never called).
    pub fn set_outcome(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }
}

impl Drop for TurnGuard {
    fn drop(&mut self) {
        let tenant = self.tenant.name.to_string();
        metrics::gauge!(m::IN_FLIGHT, "tenant" => tenant.clone()).decrement(1.0);
        metrics::counter!(m::REQUESTS, "transport" => self.transport, "tenant" => tenant, "outcome" => self.outcome.as_label())
            .increment(1);
        self.stats.turn(self.outcome.as_label());
    }
}

/// One admitted WebSocket connection; dropping it frees its slots and lowers the gauge.
#[must_use = "the connection is admitted only while the guard lives"]
pub struct ConnectionGuard {
    tenant: Arc<Tenant>,
    _tenant_permit: OwnedSemaphorePermit,
    _edge_permit: OwnedSemaphorePermit,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        metrics::gauge!(m::WS_CONNECTIONS, "tenant" => self.tenant.name.to_string()).decrement(1.0);
    }
}

/// Counts a create refused before admission (bad key, body or envelope).
pub fn count_unadmitted(transport: &'static str, tenant: Option<&str>) {
    let tenant = tenant.unwrap_or("none").to_owned();
    metrics::counter!(m::REQUESTS, "transport" => transport, "tenant" => tenant, "outcome" => "error").increment(1);
}

/// A token bucket: `burst` tokens, refilled at `rate` per second.
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst);
        TokenBucket { rate: rate.max(0.0), burst, tokens: burst, last: now }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{Admission, Limit, TokenBucket, default_share, tenant_limits};
    use crate::config::{AuthMode, EdgeConfig, TenantLimit, TenantLimitKind};

    fn two_tenants() -> EdgeConfig {
        let mut config = EdgeConfig::for_test();
        config.auth = AuthMode::Keys;
        config.api_keys = [("sk-a".into(), "alpha".into()), ("sk-b".into(), "beta".into())].into();
        config.max_in_flight = 8;
        config.max_connections = 8;
        config
    }

    #[test]
    fn the_bucket_allows_its_burst_then_its_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2.0, 3, start);
        assert!((0..3).all(|_| bucket.take(start)), "the burst");
        assert!(!bucket.take(start), "one past the burst");
        assert!(bucket.take(start + Duration::from_millis(500)), "one token after 1/rate");
        assert!(!bucket.take(start + Duration::from_millis(500)));
        assert!((0..3).all(|_| bucket.take(start + Duration::from_secs(60))), "refills up to the burst only");
        assert!(!bucket.take(start + Duration::from_secs(60)));
    }

    #[test]
    fn default_shares_split_the_edge_between_tenants() {
        assert_eq!(default_share(4096, 1), 4096);
        assert_eq!(default_share(32, 2), 16);
        assert_eq!(default_share(32, 10), 8, "at most a quarter each");
        assert_eq!(default_share(1, 3), 1);
        let mut config = two_tenants();
        config.tenant_limits = vec![TenantLimit { tenant: "alpha".into(), limit: TenantLimitKind::MaxInFlight(6) }];
        let limits = tenant_limits(&config);
        assert_eq!(limits["alpha"].max_in_flight, 6, "the override");
        assert_eq!(limits["beta"].max_in_flight, 4, "half of 8");
        assert_eq!(limits["beta"].max_connections, 4);
        assert_eq!(limits["beta"].rate, Some(super::DEFAULT_KEYS_RATE), "rate limited with keys by default");
        assert_eq!(tenant_limits(&EdgeConfig::for_test())["default"].rate, None, "open auth: unlimited");
    }

    #[tokio::test]
    async fn a_tenant_at_its_limit_leaves_the_others_their_share() {
        let admission = Admission::new(&two_tenants());
        let alpha: Vec<_> = (0..4).map(|_| admission.turn("alpha", "http").expect("within alpha's share")).collect();
        let error = admission.turn("alpha", "http").err().expect("one past alpha's share");
        assert_eq!((error.status, error.code.as_str()), (429, "rate_limit_exceeded"));
        let beta: Vec<_> = (0..4).map(|_| admission.turn("beta", "websocket").expect("beta's share")).collect();
        assert_eq!(admission.in_flight(8), 8);
        drop(alpha);
        drop(beta);
        assert_eq!(admission.in_flight(8), 0, "dropped guards free every slot");
        assert!(admission.turn("alpha", "http").is_ok());
        assert_eq!(Limit::TenantInFlight.as_label(), "tenant_in_flight");
    }

    #[tokio::test(start_paused = true)]
    async fn the_router_overhead_is_the_first_delta_minus_the_engines_ttft() {
        let admission = Admission::new(&two_tenants());
        let mut guard = admission.turn("alpha", "websocket").unwrap();
        guard.relayed("response.created", 0);
        tokio::time::advance(Duration::from_millis(30)).await;
        guard.relayed("response.output_text.delta", 0);
        tokio::time::advance(Duration::from_millis(50)).await;
        guard.relayed("response.output_text.delta", 0);
        // The engine took 26 ms of the 30 ms to the first delta.
        guard.relayed("response.completed", 26_000);
        let overhead = admission.stats().snapshot().router_overhead_ms;
        assert_eq!(overhead.samples, 1);
        let p50 = overhead.p50.unwrap();
        assert!((3.9..=4.1).contains(&p50), "{p50} ms");

        // A response with no delta (a warmup, a failure before any token) has no sample.
        let mut warmup = admission.turn("alpha", "websocket").unwrap();
        warmup.relayed("response.created", 0);
        warmup.relayed("response.completed", 1_000);
        assert_eq!(admission.stats().snapshot().router_overhead_ms.samples, 1);
    }

    #[tokio::test]
    async fn an_aborted_task_frees_its_turn() {
        let admission = std::sync::Arc::new(Admission::new(&two_tenants()));
        let guard = admission.turn("alpha", "websocket").unwrap();
        let task = tokio::spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });
        assert_eq!(admission.in_flight(8), 1);
        task.abort();
        let _ = task.await;
        assert_eq!(admission.in_flight(8), 0);
    }

    #[tokio::test]
    async fn connections_are_limited_per_tenant() {
        let mut config = two_tenants();
        config.tenant_max_connections = Some(2);
        let admission = Admission::new(&config);
        let held: Vec<_> = (0..2).map(|_| admission.connection("alpha").unwrap()).collect();
        assert_eq!(admission.connection("alpha").err().unwrap().status, 429);
        assert!(admission.connection("beta").is_ok());
        drop(held);
        assert!(admission.connection("alpha").is_ok());
    }
}
