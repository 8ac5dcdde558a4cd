//! The per-tenant budget of uncached prefill tokens: a token bucket per tenant, refilled at a
//! configured rate up to a burst, charged with the tokens a turn sends the shard to prefill.
//!
//! A turn is admitted while its tenant's bucket is above zero and may take it below (so a
//! turn larger than the burst is not refused forever); the tenant's next turns wait for the
//! refill. A refusal is `rate_limit_exceeded` (HTTP 429) before any engine work, and touches
//! no session state. Buckets back at their burst are forgotten, so the map stays bounded.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How fast a tenant may make shards prefill.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrefillLimit {
    pub tokens_per_second: u32,
    pub burst: u32,
}

/// Buckets past this count are swept of full ones before another is added.
const SWEEP_AT: usize = 16_384;

pub struct PrefillBudget {
    limit: PrefillLimit,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    level: f64,
    updated: Instant,
}

impl PrefillBudget {
    pub fn new(limit: PrefillLimit) -> Self {
        PrefillBudget { limit, buckets: Mutex::new(HashMap::new()) }
    }

    /// Charges `tokens` to `tenant` at `now`; when its bucket is empty, returns how long until
    /// it is not.
    pub fn charge(&self, tenant: &str, tokens: u32, now: Instant) -> Result<(), Duration> {
        let (rate, burst) = (f64::from(self.limit.tokens_per_second), f64::from(self.limit.burst));
        let refill = |bucket: &mut Bucket| {
            let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
            bucket.level = (bucket.level + elapsed * rate).min(burst);
            bucket.updated = now;
        };
        let mut buckets = self.buckets.lock();
        if buckets.len() >= SWEEP_AT && !buckets.contains_key(tenant) {
            buckets.retain(|_, bucket| {
                refill(bucket);
                bucket.level < burst
            });
        }
        let bucket = buckets.entry(tenant.to_owned()).or_insert(Bucket { level: burst, updated: now });
        refill(bucket);
        if bucket.level <= 0.0 {
            let wait = if rate > 0.0 { (-bucket.level + 1.0) / rate } else { f64::MAX };
            return Err(Duration::from_secs_f64(wait.min(86_400.0)));
        }
        bucket.level -= f64::from(tokens);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{PrefillBudget, PrefillLimit};

    #[test]
    fn a_tenant_in_debt_waits_for_the_refill_and_others_do_not() {
        let budget = PrefillBudget::new(PrefillLimit { tokens_per_second: 100, burst: 200 });
        let start = Instant::now();
        budget.charge("a", 150, start).unwrap();
        budget.charge("a", 150, start).unwrap(); // 50 left: admitted, now 100 in debt
        let wait = budget.charge("a", 1, start).unwrap_err();
        assert!(wait > Duration::from_secs(1), "{wait:?}");
        budget.charge("b", 150, start).expect("another tenant has its own bucket");
        budget.charge("a", 1, start + Duration::from_millis(1_100)).expect("refilled past zero");
    }
}
