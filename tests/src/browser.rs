//! A real headless Chromium for the page tests, driven over the DevTools protocol: Debian's
//! `chromium` (or `TETHER_CHROMIUM`) with a temp profile, `--no-sandbox` (CI runs as root) and
//! its debugging port on 127.0.0.1 only. The client is the few protocol calls the tests need
//! (open a page, evaluate, screenshot) over the WebSocket crate the tests already use: the
//! protocol crates (chromiumoxide, headless_chrome) compile a generated binding of the whole
//! protocol, minutes of build on CI for five methods.
//!
//! Every console error, uncaught exception and browser log error the page produces is kept:
//! [`Page::errors`] lets a test assert there were none.
//!
//! A missing browser skips the caller (`Browser::start` returns `None`, with a message) unless
//! `CI=true`, where it fails: CI installs `chromium` in `.ci/run`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::wait;

const CANDIDATES: &[&str] = &["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"];
const CALL_LIMIT: Duration = Duration::from_secs(30);

/// The browser binary: `TETHER_CHROMIUM`, else the first of Debian's usual paths that exists.
pub fn binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("TETHER_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    CANDIDATES.iter().map(PathBuf::from).find(|path| path.exists())
}

pub struct Browser {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts headless Chromium, or returns `None` (after saying why) when it is not
    /// installed and `CI` is not `true`.
    pub async fn start() -> Option<Browser> {
        let Some(bin) = binary() else {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true");
            assert!(!ci, "chromium is not installed (CI=true): `apt-get install chromium` or set TETHER_CHROMIUM");
            eprintln!("SKIPPED: no chromium (install Debian's `chromium` or set TETHER_CHROMIUM)");
            return None;
        };
        let profile = tempfile::tempdir().expect("a temp profile dir");
        let child = Command::new(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1400,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        // With port 0 the browser writes the port it bound to DevToolsActivePort in its profile.
        let port_file = profile.path().join("DevToolsActivePort");
        let port = wait::until(Duration::from_secs(30), "chromium's DevToolsActivePort", || {
            let text = std::fs::read_to_string(&port_file).unwrap_or_default();
            async move { text.lines().next().and_then(|line| line.trim().parse::<u16>().ok()) }
        })
        .await;
        Some(Browser { child, port, _profile: profile })
    }

    /// Opens a new tab on `url`.
    pub async fn open(&self, url: &str) -> Page {
        let endpoint = format!("http://127.0.0.1:{}/json/new?about:blank", self.port);
        let target: Value = reqwest::Client::new()
            .put(&endpoint)
            .send()
            .await
            .expect("DevTools /json/new")
            .json()
            .await
            .expect("a target description");
        let ws = target["webSocketDebuggerUrl"].as_str().expect("the target's debugger URL");
        let page = Page::connect(ws).await;
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            page.call(domain, json!({})).await;
        }
        page.call("Page.navigate", json!({"url": url})).await;
        // `Page.navigate` answers before the document is there: a test's first query must not
        // race the load (it would run against about:blank or a half-parsed page).
        wait::until(Duration::from_secs(20), "the page loads", || async {
            let loaded = page.eval("location.href !== 'about:blank' && document.readyState === 'complete'").await;
            (loaded == true).then_some(())
        })
        .await;
        page
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Sink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;

/// One tab.
pub struct Page {
    sink: tokio::sync::Mutex<Sink>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>,
    errors: Arc<Mutex<Vec<String>>>,
    next_id: AtomicU64,
}

/// The page's own problems among the protocol's events, as text.
fn page_error(method: &str, params: &Value) -> Option<String> {
    match method {
        "Runtime.exceptionThrown" => {
            let details = &params["exceptionDetails"];
            let text = details["exception"]["description"].as_str().or(details["text"].as_str()).unwrap_or("?");
            Some(format!("uncaught exception: {text}"))
        }
        "Runtime.consoleAPICalled" if params["type"] == "error" || params["type"] == "assert" => {
            let args: Vec<String> = params["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| a["value"].as_str().map(str::to_owned).unwrap_or_else(|| a["description"].to_string()))
                .collect();
            Some(format!("console.error: {}", args.join(" ")))
        }
        "Log.entryAdded" if params["entry"]["level"] == "error" => {
            let entry = &params["entry"];
            Some(format!("log error: {} {}", entry["text"], entry["url"]))
        }
        _ => None,
    }
}

impl Page {
    async fn connect(url: &str) -> Page {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("connect to the page's DevTools socket");
        let (sink, mut stream) = ws.split();
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>> = Arc::default();
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let (reader_pending, reader_errors) = (pending.clone(), errors.clone());
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                let Message::Text(text) = message else { continue };
                let Ok(message) = serde_json::from_str::<Value>(&text) else { continue };
                if let Some(id) = message["id"].as_u64() {
                    if let Some(reply) = reader_pending.lock().remove(&id) {
                        let _ = reply.send(message);
                    }
                } else if let Some(error) = page_error(message["method"].as_str().unwrap_or(""), &message["params"]) {
                    reader_errors.lock().push(error);
                }
            }
        });
        Page { sink: tokio::sync::Mutex::new(sink), pending, errors, next_id: AtomicU64::new(1) }
    }

    /// Calls a protocol method and returns its `result`; a protocol error fails the test.
    pub async fn call(&self, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, tx);
        let request = json!({"id": id, "method": method, "params": params}).to_string();
        self.sink.lock().await.send(Message::Text(request.into())).await.expect("send a DevTools call");
        let reply = wait::within(CALL_LIMIT, method, rx).await.expect("the browser closed the socket");
        assert!(reply.get("error").is_none(), "{method} failed: {}", reply["error"]);
        reply["result"].clone()
    }

    /// Evaluates `expression` in the page and returns its value (JSON-serializable results).
    pub async fn eval(&self, expression: &str) -> Value {
        let result = self
            .call("Runtime.evaluate", json!({"expression": expression, "returnByValue": true, "awaitPromise": true}))
            .await;
        assert!(result.get("exceptionDetails").is_none(), "{expression} threw: {}", result["exceptionDetails"]);
        result["result"]["value"].clone()
    }

    /// A PNG of the whole page.
    pub async fn screenshot(&self) -> Vec<u8> {
        let result = self.call("Page.captureScreenshot", json!({"format": "png", "captureBeyondViewport": true})).await;
        let data = result["data"].as_str().expect("screenshot data");
        base64::engine::general_purpose::STANDARD.decode(data).expect("base64 PNG")
    }

    /// Errors the page produced so far: uncaught exceptions, `console.error`, failed loads.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().clone()
    }
}
