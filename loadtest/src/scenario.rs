//! The workload: what each simulated agent sends. Every workflow is generated from the run
//! seed and its index alone, so every mode of a run (and a rerun with the same `--seed`) sends
//! the same text and sleeps the same tool latencies.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// The one tool the simulated agent offers the model.
pub const TOOL_NAME: &str = "run_tests";

/// Metadata keys of the sim engine's tool policy (see the shard's sim engine).
pub const HINT_TOOL_CALLS: &str = "tether_sim_tool_calls";
pub const HINT_OUTPUT_TOKENS: &str = "tether_sim_output_tokens";

/// A distribution of simulated tool run times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LatencyDist {
    Fixed(Duration),
    Uniform(Duration, Duration),
}

impl LatencyDist {
    pub fn sample(&self, rng: &mut impl Rng) -> Duration {
        match *self {
            LatencyDist::Fixed(d) => d,
            LatencyDist::Uniform(lo, hi) if hi <= lo => lo,
            LatencyDist::Uniform(lo, hi) => {
                Duration::from_micros(rng.random_range(lo.as_micros() as u64..=hi.as_micros() as u64))
            }
        }
    }
}

impl FromStr for LatencyDist {
    type Err = anyhow::Error;

    /// Parses `fixed:50ms`, `uniform:20ms..80ms`, or a bare duration (`50ms`).
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let parse = |d: &str| -> anyhow::Result<Duration> {
            humantime::parse_duration(d.trim()).with_context(|| format!("bad duration {d:?}"))
        };
        match s.split_once(':') {
            Some(("fixed", d)) => Ok(LatencyDist::Fixed(parse(d)?)),
            Some(("uniform", range)) => {
                let (lo, hi) = range.split_once("..").context("uniform needs LO..HI")?;
                let (lo, hi) = (parse(lo)?, parse(hi)?);
                if hi < lo {
                    bail!("uniform range {lo:?}..{hi:?} is empty");
                }
                Ok(LatencyDist::Uniform(lo, hi))
            }
            Some((kind, _)) => bail!("unknown distribution {kind:?} (fixed|uniform)"),
            None => Ok(LatencyDist::Fixed(parse(s)?)),
        }
    }
}

impl std::fmt::Display for LatencyDist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = |d: Duration| humantime::format_duration(d).to_string();
        match *self {
            LatencyDist::Fixed(d) => write!(f, "fixed:{}", h(d)),
            LatencyDist::Uniform(lo, hi) => write!(f, "uniform:{}..{}", h(lo), h(hi)),
        }
    }
}

impl serde::Serialize for LatencyDist {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The shape of every workflow of a run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkloadConfig {
    pub turns: u32,
    pub tool_latency: LatencyDist,
    pub input_tokens: usize,
    pub tool_output_bytes: usize,
    pub output_tokens: u32,
    pub seed: u64,
}

/// One agent workflow: a user request, then `turns` tool round trips, then a final answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkflowPlan {
    pub index: u64,
    pub user_text: String,
    /// The tool output returned after model call `i`.
    pub tool_outputs: Vec<String>,
    /// How long tool run `i` takes.
    pub tool_latencies: Vec<Duration>,
    pub output_tokens: u32,
}

impl WorkflowPlan {
    pub fn turns(&self) -> u32 {
        self.tool_outputs.len() as u32
    }

    /// Returns the per-conversation key (`prompt_cache_key`, direct session) for `mode`.
    pub fn conversation_key(&self, mode: &str, seed: u64) -> String {
        format!("lt-{mode}-{seed:016x}-{}", self.index)
    }

    /// Returns the request `metadata` that drives the sim engine's tool policy.
    pub fn metadata(&self) -> Value {
        json!({
            HINT_TOOL_CALLS: self.turns().to_string(),
            HINT_OUTPUT_TOKENS: self.output_tokens.to_string(),
        })
    }
}

impl WorkloadConfig {
    /// Returns workflow `index`; a pure function of the seed and the index.
    pub fn workflow(&self, index: u64) -> WorkflowPlan {
        let mut rng = StdRng::seed_from_u64(self.seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let user_text = format!(
            "Fix the failing tests in this repository, running `{TOOL_NAME}` after each change.\n{}",
            filler_tokens(&mut rng, self.input_tokens)
        );
        let turns = self.turns as usize;
        let tool_outputs = (0..turns).map(|i| tool_output(&mut rng, i, self.tool_output_bytes)).collect();
        let tool_latencies = (0..turns).map(|_| self.tool_latency.sample(&mut rng)).collect();
        WorkflowPlan { index, user_text, tool_outputs, tool_latencies, output_tokens: self.output_tokens }
    }
}

/// Returns the function tool definition (flat Responses API shape).
pub fn tool_definition() -> Value {
    json!({
        "type": "function",
        "name": TOOL_NAME,
        "description": "Run the test suite and return its summary and log",
        "parameters": {
            "type": "object",
            "properties": {
                "suite": {"type": "string", "description": "Which suite to run"},
                "filter": {"type": "string", "description": "Only tests whose name contains this"}
            },
            "required": ["suite"],
            "additionalProperties": false
        },
        "strict": false
    })
}

/// Common English words that o200k_base encodes as one token each (with the leading space).
const WORDS: &[&str] = &[
    "the", "test", "build", "error", "value", "return", "config", "server", "client", "request", "response", "cache",
    "token", "session", "worker", "stream", "event", "agent", "tool", "output", "input", "model", "state", "file",
    "line", "code", "check", "result", "data", "time", "path", "name", "type", "list", "map", "key", "hash", "queue",
    "thread", "task", "run", "call", "read", "write", "open", "close", "start", "stop", "fast", "slow", "new", "old",
    "first", "last", "next", "each", "every", "some", "many", "small", "large", "module", "function", "method",
    "field", "index", "number", "string", "table", "query", "update",
];

/// Returns roughly `tokens` tokens of deterministic English-like filler.
pub fn filler_tokens(rng: &mut impl Rng, tokens: usize) -> String {
    let mut out = String::with_capacity(tokens * 6);
    let mut emitted = 0;
    while emitted < tokens {
        let sentence = rng.random_range(6..16).min(tokens - emitted);
        for i in 0..sentence {
            if i > 0 {
                out.push(' ');
            }
            out.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        }
        out.push_str(".\n");
        emitted += sentence + 1;
    }
    out
}

/// Returns a tool output of exactly `bytes` ASCII bytes.
fn tool_output(rng: &mut impl Rng, turn: usize, bytes: usize) -> String {
    let failed = rng.random_range(0..5);
    let mut out = format!("run {turn}: {} passed, {failed} failed\n", rng.random_range(50..500));
    while out.len() < bytes {
        out.push_str(&filler_tokens(rng, 32));
    }
    out.truncate(bytes);
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{LatencyDist, WorkloadConfig};

    fn config(seed: u64) -> WorkloadConfig {
        WorkloadConfig {
            turns: 3,
            tool_latency: "uniform:10ms..30ms".parse().unwrap(),
            input_tokens: 200,
            tool_output_bytes: 300,
            output_tokens: 40,
            seed,
        }
    }

    #[test]
    fn workflows_are_deterministic_per_seed_and_index() {
        let (a, b) = (config(7), config(7));
        assert_eq!(a.workflow(3), b.workflow(3));
        assert_ne!(a.workflow(3).user_text, a.workflow(4).user_text);
        assert_ne!(a.workflow(3).user_text, config(8).workflow(3).user_text);
    }

    #[test]
    fn workflow_sizes_follow_the_config() {
        let plan = config(1).workflow(0);
        assert_eq!(plan.turns(), 3);
        assert!(plan.tool_outputs.iter().all(|o| o.len() == 300));
        for latency in &plan.tool_latencies {
            assert!((Duration::from_millis(10)..=Duration::from_millis(30)).contains(latency));
        }
        let bpe = tiktoken_rs::o200k_base().unwrap();
        let tokens = bpe.encode_ordinary(&plan.user_text).len();
        assert!((180..=260).contains(&tokens), "{tokens} tokens for ~200 asked");
    }

    #[test]
    fn latency_distributions_parse() {
        assert_eq!("fixed:50ms".parse::<LatencyDist>().unwrap(), LatencyDist::Fixed(Duration::from_millis(50)));
        assert_eq!("25ms".parse::<LatencyDist>().unwrap(), LatencyDist::Fixed(Duration::from_millis(25)));
        assert!("uniform:80ms..20ms".parse::<LatencyDist>().is_err());
        assert!("normal:1ms".parse::<LatencyDist>().is_err());
        assert_eq!("uniform:20ms..80ms".parse::<LatencyDist>().unwrap().to_string(), "uniform:20ms..80ms");
    }
}
