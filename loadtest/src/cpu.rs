//! CPU time of the processes under test (`--cpu-pid`) and of the load generator itself, read
//! from `/proc/<pid>/stat` around each mode's measured phase (after its warm-up), so a report
//! can say how much CPU the server spent per turn rather than how long a turn took.
//!
//! The process line of `/proc/<pid>/stat` holds `utime` + `stime` summed over all of the
//! process's threads, exited threads included; children are not counted (`cutime` is only
//! added when a child is reaped), so every process of interest is named by its own pid.
//! Resolution is one clock tick (10 ms at the usual 100 Hz): a mode's window must hold many
//! turns for the per-turn figure to mean anything.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};

/// One process to watch: `PID` or `LABEL=PID`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CpuTarget {
    pub label: String,
    pub pid: u32,
}

impl FromStr for CpuTarget {
    type Err = anyhow::Error;

    fn from_str(value: &str) -> anyhow::Result<Self> {
        let (label, pid) = match value.split_once('=') {
            Some((label, pid)) if !label.is_empty() => (label.to_owned(), pid),
            Some(_) => bail!("--cpu-pid {value:?}: the label before '=' is empty"),
            None => (format!("pid {value}"), value),
        };
        let pid = pid.trim().parse().with_context(|| format!("--cpu-pid {value:?}: not a pid"))?;
        Ok(CpuTarget { label, pid })
    }
}

impl fmt::Display for CpuTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.label, self.pid)
    }
}

/// The label of the load generator's own row.
pub const SELF_LABEL: &str = "tether-loadtest (self)";

/// CPU time (user + system) of each watched process at one instant; `None` where the process
/// could not be read (it exited, or it is not ours to read).
#[derive(Clone, Debug)]
pub struct CpuSnapshot {
    processes: Vec<Option<Duration>>,
    own: Option<Duration>,
}

/// The CPU a process spent during a mode's measured phase.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProcessCpu {
    pub label: String,
    /// `None` for the load generator's own row.
    pub pid: Option<u32>,
    /// `None` when the process could not be read at the start or the end of the window.
    pub cpu_ms: Option<f64>,
}

/// Reads the watched processes' CPU time.
#[derive(Clone, Debug)]
pub struct CpuWatch {
    targets: Vec<CpuTarget>,
    ticks_per_second: u64,
}

impl CpuWatch {
    pub fn new(targets: Vec<CpuTarget>) -> Self {
        CpuWatch { targets, ticks_per_second: rustix::param::clock_ticks_per_second().max(1) }
    }

    pub fn snapshot(&self) -> CpuSnapshot {
        let read = |path: &str| {
            let ticks = std::fs::read_to_string(path).ok().and_then(|line| cpu_ticks(&line))?;
            Some(Duration::from_secs_f64(ticks as f64 / self.ticks_per_second as f64))
        };
        CpuSnapshot {
            processes: self.targets.iter().map(|target| read(&format!("/proc/{}/stat", target.pid))).collect(),
            own: read("/proc/self/stat"),
        }
    }

    /// The CPU spent between two snapshots, one row per watched process, then the generator's.
    pub fn spent(&self, before: &CpuSnapshot, after: &CpuSnapshot) -> Vec<ProcessCpu> {
        let delta = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a).as_secs_f64() * 1e3),
            _ => None,
        };
        let mut rows: Vec<ProcessCpu> = self
            .targets
            .iter()
            .zip(before.processes.iter().zip(&after.processes))
            .map(|(target, (a, b))| ProcessCpu {
                label: target.label.clone(),
                pid: Some(target.pid),
                cpu_ms: delta(*a, *b),
            })
            .collect();
        rows.push(ProcessCpu { label: SELF_LABEL.to_owned(), pid: None, cpu_ms: delta(before.own, after.own) });
        rows
    }
}

/// `utime + stime` in clock ticks from one `/proc/<pid>/stat` line. The command name (field 2)
/// is in parentheses and may hold spaces or parentheses itself, so fields are counted from the
/// last `)`: state is field 3, utime field 14, stime field 15.
fn cpu_ticks(line: &str) -> Option<u64> {
    let (_, rest) = line.rsplit_once(')')?;
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::{CpuTarget, CpuWatch, cpu_ticks};

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let line = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 2000 0 0 0 150 37 0 0 20 0 9 0 100 0 0";
        assert_eq!(cpu_ticks(line), Some(187));
        assert_eq!(cpu_ticks("4242 (short) S 1"), None);
    }

    #[test]
    fn targets_parse_with_or_without_a_label() {
        assert_eq!("12".parse::<CpuTarget>().unwrap(), CpuTarget { label: "pid 12".into(), pid: 12 });
        assert_eq!("edge=7".parse::<CpuTarget>().unwrap(), CpuTarget { label: "edge".into(), pid: 7 });
        assert!("=7".parse::<CpuTarget>().is_err());
        assert!("edge=x".parse::<CpuTarget>().is_err());
    }

    #[test]
    fn own_cpu_grows_with_work() {
        let watch = CpuWatch::new(vec![CpuTarget { label: "me".into(), pid: std::process::id() }]);
        let before = watch.snapshot();
        let started = std::time::Instant::now();
        let mut x = 0u64;
        // Spin until the kernel has charged at least two ticks (bounded at 5 s).
        while started.elapsed() < std::time::Duration::from_secs(5) {
            for i in 0..100_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            let now = watch.snapshot();
            if watch.spent(&before, &now)[0].cpu_ms.unwrap_or(0.0) >= 20.0 {
                break;
            }
        }
        std::hint::black_box(x);
        let rows = watch.spent(&before, &watch.snapshot());
        assert_eq!(rows.len(), 2, "the watched process, then the generator's own row");
        assert!(rows[0].cpu_ms.unwrap() >= 20.0, "{rows:?}");
        assert!(rows[1].cpu_ms.unwrap() >= 20.0, "{rows:?}");
    }

    #[test]
    fn an_unreadable_process_has_no_figure() {
        let watch = CpuWatch::new(vec![CpuTarget { label: "gone".into(), pid: u32::MAX }]);
        let rows = watch.spent(&watch.snapshot(), &watch.snapshot());
        assert_eq!(rows[0].cpu_ms, None);
    }
}
