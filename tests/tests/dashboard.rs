//! The operator view (issue 17): `GET /v1/cluster/status` behind the admin-key rule, and the
//! `/dashboard` page in a real headless Chromium against real `tether` processes with real etcd:
//! the page lists the three workers live, a SIGKILLed worker shows as ejected with its
//! sessions moving to the others, the page logs no JavaScript error, and a screenshot is kept
//! (`$CARGO_TARGET_DIR/ci/dashboard.png`, a CI artifact; `TETHER_UPDATE_SCREENSHOT=1` also
//! writes `docs/dashboard.png`, the README's). `tether status` prints the same view.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tether_edge::config::{AdminKey, AuthMode};
use tether_tests::Cluster;
use tether_tests::agents;
use tether_tests::browser::{Browser, Page};
use tether_tests::etcd::Etcd;
use tether_tests::process::{Process, tether_bin};
use tether_tests::wait;
use tokio_util::sync::CancellationToken;

/// Two workers and a shard behind an edge with API keys (tenant `alpha`) and an admin key.
async fn keyed_cluster() -> Cluster {
    Cluster::builder()
        .workers(2)
        .shards(1)
        .edge_config(|c| {
            c.auth = AuthMode::Keys;
            c.api_keys = [("sk-alpha".to_owned(), "alpha".to_owned())].into();
            c.admin_key = Some(AdminKey("sk-operator".into()));
        })
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_view_needs_the_admin_key_and_the_page_loads_nothing_from_outside() {
    let cluster = keyed_cluster().await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/cluster/status", cluster.url());
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
    assert_eq!(http.get(&url).bearer_auth("sk-alpha").send().await.unwrap().status(), 403, "a tenant key");
    let view: Value = http.get(&url).bearer_auth("sk-operator").send().await.unwrap().json().await.unwrap();
    let states: Vec<&str> = view["workers"].as_array().unwrap().iter().map(|w| w["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["live", "live"], "{view}");
    assert_eq!(view["shards"][0]["state"], "live", "{view}");
    assert_eq!(view["shards"][0]["engine"], "sim", "{view}");
    assert!(view["workers"][0]["sessions"].is_u64(), "the worker reports its sessions: {view}");

    // The page is served to anyone (it holds no data) with a policy that forbids any
    // resource from elsewhere, and references none.
    let page = http.get(format!("{}/dashboard", cluster.url())).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let policy = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(policy.starts_with("default-src 'none'") && policy.contains("connect-src 'self'"), "{policy}");
    let html = page.text().await.unwrap();
    assert!(html.contains("/v1/cluster/status"));
    for outside in ["https://", "src=\"http", "href=\"http", "@import", "<script src"] {
        assert!(!html.contains(outside), "the page references {outside}");
    }
}

/// Real processes: etcd, 2 shards, 3 workers, an edge.
struct Processes {
    _etcd: Etcd,
    _dir: tempfile::TempDir,
    edge: Process,
    workers: Vec<Process>,
    _shards: Vec<Process>,
}

impl Processes {
    async fn start() -> Processes {
        tether_common::telemetry::init_for_test();
        let etcd = Etcd::start().await;
        let dir = tempfile::tempdir().unwrap();
        // A long lease: the killed worker stays a member (ejected by the edge) while the page
        // is checked, instead of leaving membership.
        let spawn = |name: &str, args: &[&str]| {
            let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
            all.extend(["--listen", "127.0.0.1:0", "--cluster", "dashboard", "--lease-ttl", "15s"].map(str::to_owned));
            for endpoint in etcd.endpoints() {
                all.extend(["--etcd".to_owned(), endpoint]);
            }
            Process::start(name, &all, dir.path())
        };
        let shards = (0..2).map(|i| spawn(&format!("shard-{i}"), &["shard", "--id", &format!("shard-{i}")])).collect();
        let workers =
            (0..3).map(|i| spawn(&format!("worker-{i}"), &["worker", "--id", &format!("worker-{i}")])).collect();
        let edge = spawn("edge", &["edge", "--auth", "open"]);
        Processes { _etcd: etcd, _dir: dir, edge, workers, _shards: shards }
    }
}

/// The page's worker rows: (id, state, sessions, moved in).
async fn worker_rows(page: &Page) -> Vec<(String, String, u64, u64)> {
    let rows = page
        .eval(
            "[...document.querySelectorAll('tr[data-worker]')].map(r => \
             [r.dataset.worker, r.dataset.state, Number(r.dataset.sessions || 0), Number(r.dataset.movedIn || 0)])",
        )
        .await;
    serde_json::from_value(rows).unwrap_or_default()
}

async fn completed_turns(edge: &str) -> u64 {
    let view: Option<Value> =
        async { reqwest::get(format!("{edge}/v1/cluster/status")).await.ok()?.json().await.ok() }.await;
    view.and_then(|v| v["edge"]["outcomes"]["ok"].as_u64()).unwrap_or(0)
}

/// Where CI keeps artifacts: `$CARGO_TARGET_DIR/ci`, else `target/ci` beside this test binary.
fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/<test> -> target
        exe.ancestors().nth(3).map(Path::to_path_buf).expect("the target dir")
    });
    target.join("ci")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_killed_worker_ejected_and_its_sessions_moving() {
    let Some(browser) = Browser::start().await else { return };
    let mut cluster = Processes::start().await;
    let edge = cluster.edge.url();
    let page = browser.open(&format!("{edge}/dashboard")).await;

    wait::until(Duration::from_secs(30), "the page lists 3 live workers and 2 live shards", || async {
        let workers = worker_rows(&page).await;
        let shards = page.eval("document.querySelectorAll('tr[data-shard][data-state=live]').length").await;
        (workers.len() == 3 && workers.iter().all(|w| w.1 == "live") && shards == 2).then_some(())
    })
    .await;

    let stop = CancellationToken::new();
    let ws_url = format!("ws://{}/v1/responses", cluster.edge.addr);
    let agents = tokio::spawn({
        let stop = stop.clone();
        async move { agents::run(&ws_url, 12, 5_000, stop).await }
    });
    wait::until(Duration::from_secs(60), "every worker holds sessions on the page, 60 turns done", || async {
        let workers = worker_rows(&page).await;
        let busy = workers.len() == 3 && workers.iter().all(|w| w.2 > 0);
        (busy && completed_turns(&edge).await >= 60).then_some(())
    })
    .await;

    // The router's share of the time to first token, measured per streamed turn.
    let view: Value = reqwest::get(format!("{edge}/v1/cluster/status")).await.unwrap().json().await.unwrap();
    let overhead = &view["edge"]["router_overhead_ms"];
    assert!(overhead["samples"].as_u64().unwrap_or(0) > 0, "router overhead samples: {overhead}");
    assert!(overhead["p50"].as_f64().is_some_and(|p50| p50 >= 0.0), "{overhead}");
    let tile = wait::until(Duration::from_secs(10), "the router-overhead tile shows a number", || async {
        let text = page.eval("document.getElementById('t-overhead').textContent").await;
        text.as_str().filter(|t| t.chars().next().is_some_and(|c| c.is_ascii_digit())).map(str::to_owned)
    })
    .await;
    println!("router overhead tile: {tile} ms; status: {overhead}");

    cluster.workers[0].kill();
    let rows = wait::until(Duration::from_secs(60), "worker-0 ejected and its sessions moved on the page", || async {
        let rows = worker_rows(&page).await;
        let ejected = rows.iter().any(|w| w.0 == "worker-0" && w.1 == "ejected");
        let moved: u64 = rows.iter().filter(|w| w.0 != "worker-0").map(|w| w.3).sum();
        let survivors_live = rows.iter().filter(|w| w.0 != "worker-0" && w.1 == "live").count() == 2;
        (ejected && moved > 0 && survivors_live).then_some(rows)
    })
    .await;
    let logged = page.eval("!!document.querySelector('tr[data-event=\"worker-0\"][data-to=\"ejected\"]')").await;
    assert_eq!(logged, true, "the membership log shows the ejection");
    let moves = page.eval("Number(document.getElementById('t-moves').dataset.value)").await;
    assert!(moves.as_u64().is_some_and(|n| n > 0), "the moves tile counts them: {moves}");

    // A few more polls so the charts show the moves, then the screenshot.
    let polls = page.eval("Number(document.body.dataset.polls)").await.as_u64().unwrap_or(0);
    wait::until(Duration::from_secs(20), "three more polls", || async {
        (page.eval("Number(document.body.dataset.polls)").await.as_u64().unwrap_or(0) >= polls + 3).then_some(())
    })
    .await;
    let png = page.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let dir = artifacts();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dashboard.png"), &png).unwrap();
    if std::env::var_os("TETHER_UPDATE_SCREENSHOT").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/dashboard.png");
        std::fs::write(docs, &png).unwrap();
    }
    println!("worker rows after the kill: {rows:?}; screenshot {}", dir.join("dashboard.png").display());

    // `tether status` prints the same view.
    let output = std::process::Command::new(tether_bin()).args(["status", "--url", &edge]).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "tether status: {}", String::from_utf8_lossy(&output.stderr));
    assert!(text.lines().any(|l| l.contains("worker-0") && l.contains("ejected")), "{text}");
    assert!(text.contains("workers 2/3 live"), "{text}");

    stop.cancel();
    let _ = wait::within(Duration::from_secs(30), "the agents stop", agents).await;
    let errors = page.errors();
    assert!(errors.is_empty(), "the page logged errors: {errors:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_keys_the_page_asks_for_the_admin_key_and_keeps_it_for_the_tab() {
    let Some(browser) = Browser::start().await else { return };
    let cluster = keyed_cluster().await;
    let page = browser.open(&format!("{}/dashboard", cluster.url())).await;
    wait::until(Duration::from_secs(20), "the page asks for the admin key", || async {
        let asks = page.eval("getComputedStyle(document.getElementById('keyform')).display !== 'none'").await;
        (asks == true).then_some(())
    })
    .await;
    assert_eq!(page.eval("document.querySelectorAll('tr[data-worker]').length").await, 0, "no data without the key");

    page.eval(
        "document.getElementById('key').value = 'sk-operator'; \
         document.getElementById('keyform').requestSubmit(); true",
    )
    .await;
    wait::until(Duration::from_secs(20), "the page shows the workers with the key", || async {
        (page.eval("document.querySelectorAll('tr[data-worker][data-state=live]').length").await == 2).then_some(())
    })
    .await;
    assert_eq!(page.eval("sessionStorage.getItem('tether-admin-key')").await, "sk-operator");
    assert_eq!(page.eval("location.href.includes('sk-operator')").await, false, "never in the URL");
    // The refusals before the key are the page's expected path, not errors: the page handles
    // them. Chromium still logs each 401/403 fetch as a failed resource load.
    let errors: Vec<String> =
        page.errors().into_iter().filter(|e| !(e.contains("status of 401") || e.contains("status of 403"))).collect();
    assert!(errors.is_empty(), "the page logged errors: {errors:#?}");
}
