//! Real `tether` processes for the multi-process suite: each started with
//! `--listen 127.0.0.1:0` and JSON logs in its own file; the bound address is read from its
//! "listening" log line. `kill()` is SIGKILL, `terminate()` SIGTERM (a drain), `freeze()` and
//! `thaw()` SIGSTOP and SIGCONT.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `tether` binary: `TETHER_BIN`, else `target/<profile>/tether` beside this test binary.
pub fn tether_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("TETHER_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/tether
    let candidate = exe.parent().and_then(Path::parent).map(|dir| dir.join("tether")).expect("target dir");
    assert!(
        candidate.exists(),
        "{} is missing: build it first (`cargo build -p tether --features etcd`) or set TETHER_BIN",
        candidate.display()
    );
    candidate
}

pub struct Process {
    pub name: String,
    pub addr: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// A stand-in that runs nothing (replaced before use).
    pub fn placeholder() -> Process {
        let child = Command::new("true").spawn().expect("spawn true");
        Process { name: "placeholder".into(), addr: SocketAddr::from(([127, 0, 0, 1], 0)), child, log: PathBuf::new() }
    }

    /// Starts `tether <args>` and waits (bounded) for its listening address.
    pub fn start(name: &str, args: &[String], dir: &Path) -> Process {
        // Appended: a node restarted under the same name keeps its earlier run's log.
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("open a log file");
        let earlier = file.metadata().map(|m| m.len() as usize).unwrap_or(0);
        let child = Command::new(tether_bin())
            .args(args)
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn tether");
        let mut process = Process { name: name.to_owned(), addr: SocketAddr::from(([127, 0, 0, 1], 0)), child, log };
        process.addr = process.wait_for_addr(earlier, Duration::from_secs(20));
        process
    }

    /// Reads this run's "listening" line (the log's bytes after `earlier`).
    fn wait_for_addr(&mut self, earlier: usize, limit: Duration) -> SocketAddr {
        let deadline = Instant::now() + limit;
        loop {
            let all = std::fs::read_to_string(&self.log).unwrap_or_default();
            let text = all.get(earlier..).unwrap_or_default();
            for line in text.lines() {
                let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else { continue };
                let fields = &entry["fields"];
                if fields["message"].as_str().is_some_and(|m| m.ends_with("listening"))
                    && let Some(addr) = fields["addr"].as_str().and_then(|a| a.parse().ok())
                {
                    return addr;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited with {status} before listening:\n{text}", self.name);
            }
            assert!(Instant::now() < deadline, "{} did not report its address within {limit:?}:\n{text}", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(signal).arg(self.child.id().to_string()).status().expect("run kill");
        assert!(status.success(), "kill {signal} {} failed", self.name);
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM: a graceful drain; waits for the exit within `limit`.
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        self.begin_terminate();
        self.wait_exit(limit)
    }

    /// SIGTERM without waiting (several nodes drained at once).
    pub fn begin_terminate(&self) {
        self.signal("-TERM");
    }

    /// Waits for the process to exit within `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not exit within {limit:?}", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGSTOP: the process is frozen, its sockets stay open.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT.
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-CONT").arg(self.child.id().to_string()).stderr(Stdio::null()).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
