//! A real etcd server for the membership suite: Debian's `etcd-server` (`/usr/bin/etcd`, or
//! `TETHER_ETCD_BIN`) on loopback with its own temp dir (data dir plus one log per start),
//! killed on drop. The dir is kept, and its path printed, when the test panicked.
//!
//! Ports. etcd cannot take a pre-bound listener, and etcd-client cannot dial a unix socket (it
//! turns every endpoint into an `http://` URI), so the first start asks etcd for port 0 and
//! reads the address it bound from its log: no race. A **restart** must come back on that same
//! port, since the clients under test were configured with it; this is the one place a released
//! port is bound again. The port is free between the kill and the restart (etcd's listeners set
//! SO_REUSEADDR, so TIME_WAIT does not block it); if another process took it meanwhile, the
//! restart fails with a message saying so rather than a flaky assertion later.
//!
//! A missing binary fails the test (never skips): CI installs `etcd-server` in `.ci/run`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const DEFAULT_BIN: &str = "/usr/bin/etcd";
const START_LIMIT: Duration = Duration::from_secs(15);
/// The zap log line etcd (3.4 with `--logger zap`, 3.5+) writes once it serves clients.
const SERVING_MESSAGE: &str = "serving client traffic insecurely";

pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    /// The client address, e.g. `127.0.0.1:40123`, stable across restarts.
    addr: String,
    starts: u32,
}

impl Etcd {
    /// Starts etcd on loopback with a fresh data dir and waits until it answers `/health`.
    pub async fn start() -> Etcd {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let bin = binary();
        let unique = format!("tether-etcd-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir().join(unique);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let mut etcd = Etcd { child: None, dir, addr: String::new(), starts: 0 };
        etcd.spawn(&bin, "127.0.0.1:0").await;
        etcd
    }

    /// Returns the client endpoints to give `EtcdDiscovery::connect`.
    pub fn endpoints(&self) -> Vec<String> {
        vec![format!("http://{}", self.addr)]
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Kills the server (SIGKILL) and reaps it; the data dir stays for [`Etcd::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same data dir and client port.
    pub async fn restart(&mut self) {
        self.kill();
        let addr = self.addr.clone();
        self.spawn(&binary(), &addr).await;
        assert_eq!(self.addr, addr, "etcd restarted on another address");
    }

    async fn spawn(&mut self, bin: &Path, client_addr: &str) {
        self.starts += 1;
        let log_path = self.dir.join(format!("etcd-{}.log", self.starts));
        let log = File::create(&log_path).unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let log_err = log.try_clone().unwrap_or_else(|e| panic!("cannot clone the log file handle: {e}"));
        let client_url = format!("http://{client_addr}");
        // The peer port is never dialled (one member), so it can stay ephemeral across restarts.
        let peer_url = "http://127.0.0.1:0";
        let child = Command::new(bin)
            .args(["--name", "tether-test", "--logger", "zap", "--log-outputs", "stderr"])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url])
            .args(["--initial-cluster", &format!("tether-test={peer_url}")])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        self.child = Some(child);
        self.addr = self.wait_serving(&log_path).await;
        self.wait_healthy().await;
    }

    /// Polls the log for the bound client address, failing fast if etcd exits.
    async fn wait_serving(&mut self, log_path: &Path) -> String {
        let deadline = tokio::time::Instant::now() + START_LIMIT;
        loop {
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
            if let Some(addr) = log.lines().find_map(serving_address) {
                return addr;
            }
            if let Some(status) = self.child.as_mut().and_then(|child| child.try_wait().ok().flatten()) {
                let hint = if log.contains("address already in use") {
                    "\n(its client port was taken by another process while it was down)"
                } else {
                    ""
                };
                panic!("etcd exited with {status} before serving{hint}; log {}:\n{}", log_path.display(), tail(&log));
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "etcd did not serve clients within {START_LIMIT:?}; log {}:\n{}",
                log_path.display(),
                tail(&log)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_healthy(&self) {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap_or_else(|e| panic!("cannot build an HTTP client: {e}"));
        let url = format!("http://{}/health", self.addr);
        crate::wait::until(START_LIMIT, "etcd /health", || async {
            let response = client.get(&url).send().await.ok()?;
            let body: serde_json::Value = response.json().await.ok()?;
            (body["health"] == "true").then_some(())
        })
        .await;
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().map(Child::id).unwrap_or_else(|| panic!("etcd is not running"));
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill {signal} (procps): {e}"));
        assert!(status.success(), "kill {signal} {pid} failed: {status}");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("etcd logs and data kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn binary() -> PathBuf {
    let bin = std::env::var_os("TETHER_ETCD_BIN").map_or_else(|| PathBuf::from(DEFAULT_BIN), PathBuf::from);
    assert!(
        bin.is_file(),
        "etcd not found at {}: install Debian's etcd-server (`apt-get install etcd-server`, as .ci/run does) \
         or set TETHER_ETCD_BIN",
        bin.display()
    );
    bin
}

/// Reads `address` from the zap line `{"msg":"serving client traffic insecurely; ...","address":"127.0.0.1:N"}`.
fn serving_address(line: &str) -> Option<String> {
    let entry: serde_json::Value = serde_json::from_str(line).ok()?;
    entry["msg"].as_str()?.starts_with(SERVING_MESSAGE).then(|| entry["address"].as_str().map(str::to_owned))?
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
