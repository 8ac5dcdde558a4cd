//! Knowing whether this process was stopped (SIGSTOP, `docker pause`, a VM pause) while some
//! work was under way. A thread notes the time every 100 ms; a gap of a second or more between
//! two notes, or a note that is that old now, means the process did not run meanwhile. A worker
//! checks this before it commits a turn: a turn that sat frozen has been continued elsewhere
//! (the edge re-issues it to the key's next owner), and the late copy must not be stored.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A gap this long means the process was stopped.
pub const PAUSE_LIMIT: Duration = Duration::from_secs(1);
const TICK: Duration = Duration::from_millis(100);

static EPOCH: OnceLock<Instant> = OnceLock::new();
/// Milliseconds since [`EPOCH`] of the last note; 0 until the watch runs.
static LAST_TICK: AtomicU64 = AtomicU64::new(0);
/// Milliseconds since [`EPOCH`] when a stop was last seen; 0 for never.
static PAUSED_AT: AtomicU64 = AtomicU64::new(0);

fn now_ms() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Starts the watch (once per process; later calls do nothing). A plain thread, so it lives as
/// long as the process whatever runtime started it.
pub fn watch() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        LAST_TICK.store(now_ms(), Ordering::Relaxed);
        std::thread::Builder::new()
            .name("pause-watch".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(TICK);
                    let now = now_ms();
                    if now - LAST_TICK.load(Ordering::Relaxed) >= PAUSE_LIMIT.as_millis() as u64 {
                        PAUSED_AT.store(now, Ordering::Relaxed);
                    }
                    LAST_TICK.store(now, Ordering::Relaxed);
                }
            })
            .expect("spawn the pause watch");
    });
}

/// A point in time to ask [`paused_since`] about.
#[derive(Clone, Copy, Debug)]
pub struct Mark(u64);

pub fn mark() -> Mark {
    Mark(now_ms())
}

/// Whether the process was stopped after `mark` (false while the watch does not run).
pub fn paused_since(mark: Mark) -> bool {
    let last = LAST_TICK.load(Ordering::Relaxed);
    if last == 0 {
        return false;
    }
    PAUSED_AT.load(Ordering::Relaxed) >= mark.0 || now_ms().saturating_sub(last) >= PAUSE_LIMIT.as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::{mark, paused_since, watch};

    #[test]
    fn a_running_process_was_not_paused() {
        watch();
        let start = mark();
        std::thread::sleep(std::time::Duration::from_millis(250));
        assert!(!paused_since(start));
    }
}
