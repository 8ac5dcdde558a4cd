//! `tether status`: the operator view of a running cluster for terminals. It reads the edge's
//! `GET /v1/cluster/status` (the snapshot `/dashboard` shows) and prints it as tables; with
//! `--watch` it redraws every `--interval` until interrupted. The admin key (needed with
//! `--auth keys`) goes in the `Authorization` header only and is never printed.

use std::fmt::Write as _;
use std::time::Duration;

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{CellAlignment, Table};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::cli::CliError;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The edge's base URL.
    #[arg(long, env = "TETHER_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The edge's admin key (with `--auth keys`).
    #[arg(long, env = "TETHER_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Redraw until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// How often `--watch` redraws.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub interval: Duration,
}

pub async fn run(args: &StatusArgs, shutdown: CancellationToken) -> Result<(), CliError> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| CliError::Service(e.to_string()))?;
    let url = format!("{}/v1/cluster/status", args.url.trim_end_matches('/'));
    loop {
        let view = fetch(&client, &url, args.admin_key.as_deref()).await;
        match (&view, args.watch) {
            (Ok(view), false) => print!("{}", render(view)),
            (Err(error), false) => return Err(CliError::Service(error.clone())),
            // Clear the screen and redraw; an error is shown in place of the view.
            (Ok(view), true) => print!("\x1b[2J\x1b[H{}", render(view)),
            (Err(error), true) => println!("\x1b[2J\x1b[H{error}"),
        }
        if !args.watch {
            return Ok(());
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(args.interval) => {}
        }
    }
}

async fn fetch(client: &reqwest::Client, url: &str, admin_key: Option<&str>) -> Result<Value, String> {
    let mut request = client.get(url);
    if let Some(key) = admin_key {
        request = request.bearer_auth(key);
    }
    let reply = request.send().await.map_err(|e| format!("{url}: {e}"))?;
    let status = reply.status();
    let body: Value = reply.json().await.map_err(|e| format!("{url}: {status}: {e}"))?;
    if !status.is_success() {
        let message = body["error"]["message"].as_str().unwrap_or("no message");
        return Err(format!("{url}: {status}: {message}"));
    }
    Ok(body)
}

/// A number, or `-` when the node did not say.
fn num(value: &Value) -> String {
    match value {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.1}"),
            _ => n.to_string(),
        },
        _ => "-".to_owned(),
    }
}

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_style(UTF8_FULL_CONDENSED).set_header(header.to_vec());
    table
}

/// Right-aligns every column after the first two (the numbers).
fn align(table: &mut Table, from: usize) {
    for column in table.column_iter_mut().skip(from) {
        column.set_cell_alignment(CellAlignment::Right);
    }
}

/// The view as text: a summary, then workers, shards, errors and recent changes.
pub fn render(view: &Value) -> String {
    let edge = &view["edge"];
    let empty = Vec::new();
    let workers = view["workers"].as_array().unwrap_or(&empty);
    let shards = view["shards"].as_array().unwrap_or(&empty);
    let live = |rows: &Vec<Value>| rows.iter().filter(|r| r["state"] == "live").count();
    let ms = |v: &Value| v.as_f64().map_or("-".to_owned(), |f| format!("{f:.0} ms"));
    let hit_rate = view["cache"]["hit_rate"].as_f64().map_or("-".to_owned(), |r| format!("{:.1}%", r * 100.0));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "workers {}/{} live · shards {}/{} live · {:.1} turns/s · TTFT p50 {} p99 {} · router overhead p50 {} p99 {} · \
         KV cache hits {} · {} session moves",
        live(workers),
        workers.len(),
        live(shards),
        shards.len(),
        edge["turn_rate"].as_f64().unwrap_or(0.0),
        ms(&edge["ttft_ms"]["p50"]),
        ms(&edge["ttft_ms"]["p99"]),
        ms(&edge["router_overhead_ms"]["p50"]),
        ms(&edge["router_overhead_ms"]["p99"]),
        hit_rate,
        num(&edge["moves"]),
    );

    let mut t = table(&[
        "worker",
        "state",
        "sessions",
        "in flight",
        "edge sessions",
        "turns",
        "moved in",
        "pulls",
        "handed off",
        "fenced",
    ]);
    for w in workers {
        t.add_row(vec![
            w["id"].as_str().unwrap_or("?").to_owned(),
            w["state"].as_str().unwrap_or("?").to_owned(),
            num(&w["sessions"]),
            num(&w["in_flight"]),
            num(&w["edge_sessions"]),
            num(&w["turns"]),
            num(&w["moved_in"]),
            num(&w["pulls"]),
            num(&w["handed_off"]),
            num(&w["fenced"]),
        ]);
    }
    align(&mut t, 2);
    let _ = writeln!(out, "{t}");

    let mut t = table(&["shard", "state", "slots busy", "slots", "KV sessions", "KV tokens", "hits", "misses"]);
    for s in shards {
        t.add_row(vec![
            s["id"].as_str().unwrap_or("?").to_owned(),
            s["state"].as_str().unwrap_or("?").to_owned(),
            num(&s["slots_busy"]),
            num(&s["slots"]),
            num(&s["cache_sessions"]),
            num(&s["cache_tokens"]),
            num(&s["cache_hits"]),
            num(&s["cache_misses"]),
        ]);
    }
    align(&mut t, 2);
    let _ = writeln!(out, "{t}");

    let mut errors = table(&["errors", "count"]);
    let outcomes = edge["outcomes"].as_object().into_iter().flatten().filter(|(k, _)| *k != "ok");
    for (outcome, n) in outcomes {
        errors.add_row(vec![format!("turn {outcome}"), num(n)]);
    }
    for (class, n) in edge["worker_errors"].as_object().into_iter().flatten() {
        errors.add_row(vec![format!("worker call: {class}"), num(n)]);
    }
    align(&mut errors, 1);
    let _ = writeln!(out, "{errors}");

    let events = view["events"].as_array().unwrap_or(&empty);
    if !events.is_empty() {
        let _ = writeln!(out, "recent changes:");
        for e in events.iter().rev().take(8) {
            let from = e["from"].as_str().map_or("joined".to_owned(), |from| format!("{from} ->"));
            let seconds_ago =
                view["at_ms"].as_u64().unwrap_or(0).saturating_sub(e["at_ms"].as_u64().unwrap_or(0)) / 1000;
            let _ = writeln!(
                out,
                "  {:>5}s ago  {} {}: {} {}",
                seconds_ago,
                e["kind"].as_str().unwrap_or("?"),
                e["id"].as_str().unwrap_or("?"),
                from,
                e["to"].as_str().unwrap_or("?"),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::render;

    #[test]
    fn the_view_prints_states_numbers_and_changes() {
        let view = json!({
            "at_ms": 10_000,
            "edge": {"turn_rate": 2.5, "ttft_ms": {"p50": 12.3, "p99": 80.0},
                     "router_overhead_ms": {"p50": 1.4, "p99": 6.0}, "moves": 4,
                     "outcomes": {"ok": 10, "failed": 2}, "worker_errors": {"unavailable": 3}},
            "workers": [
                {"id": "worker-0", "state": "live", "sessions": 7, "in_flight": 1, "edge_sessions": 1,
                 "turns": 12, "moved_in": 4, "pulls": 0, "handed_off": 0, "fenced": 0},
                {"id": "worker-1", "state": "ejected", "sessions": null, "edge_sessions": 0, "moved_in": 0}
            ],
            "shards": [{"id": "shard-0", "state": "live", "slots_busy": 1, "slots": 64, "cache_sessions": 7,
                        "cache_tokens": 300, "cache_hits": 9, "cache_misses": 3}],
            "cache": {"hit_rate": 0.75},
            "events": [{"at_ms": 7_000, "kind": "worker", "id": "worker-1", "from": "live", "to": "ejected"}]
        });
        let text = render(&view);
        assert!(text.contains("workers 1/2 live"), "{text}");
        assert!(text.contains("router overhead p50 1 ms p99 6 ms"), "{text}");
        assert!(text.contains("2.5 turns/s") && text.contains("p50 12 ms") && text.contains("75.0%"), "{text}");
        assert!(text.lines().any(|l| l.contains("worker-1") && l.contains("ejected") && l.contains(" - ")), "{text}");
        assert!(text.lines().any(|l| l.contains("worker-0") && l.contains(" 7 ")), "{text}");
        assert!(text.contains("turn failed") && text.contains("worker call: unavailable"), "{text}");
        assert!(text.contains("3s ago  worker worker-1: live -> ejected"), "{text}");
    }
}
