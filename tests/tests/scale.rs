//! The many-node run, scaled down (16 workers, 4 shards, 10,000 sessions): a worker joins, one
//! drains, one is killed, a shard drains, while one session in ten takes turns. The full run
//! (64 workers, 100,000 sessions) is `tether-scale`; its numbers are in docs/scale.md.

use std::time::Duration;

use tether_tests::scale::{Change, ScaleConfig, ScaleReport};
use tether_tests::wait;

fn assert_consistent_moves(report: &ScaleReport, change: Change) {
    let r = report.change(change).expect("the change ran");
    // Consistent hashing moves only the keys of the node that joined or left: about 1/N of
    // all sessions; the window leaves room for how unevenly 128 virtual nodes split the ring.
    assert_eq!(r.foreign_moves, 0, "{}: sessions moved between workers the change did not touch", change.name());
    let ratio = r.moved_fraction() / r.expected_fraction;
    assert!(
        (0.65..1.35).contains(&ratio),
        "{}: moved {:.2}% for 1/N = {:.2}%",
        change.name(),
        r.moved_fraction() * 100.0,
        r.expected_fraction * 100.0
    );
    // Every active session's turns went where the edge's ring says once it settled.
    assert_eq!(r.misrouted, 0, "{}: active sessions served off their owner", change.name());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_workers_ten_thousand_sessions_move_one_nth_and_lose_no_turn() {
    let config = ScaleConfig::small();
    let report =
        wait::within(Duration::from_secs(240), "the scaled-down run", tether_tests::scale::run(&config, &Change::ALL))
            .await;
    println!("{report}");
    assert!(
        report.create_failures.is_empty(),
        "sessions failed to create: {:?}",
        &report.create_failures[..5.min(report.create_failures.len())]
    );
    assert_eq!(report.sessions, config.sessions);

    let join = report.change(Change::WorkerJoin).unwrap();
    assert_consistent_moves(&report, Change::WorkerJoin);
    assert_eq!(join.failed(), 0, "failed turns on join: {:?} {:?}", join.failed_during, join.failed_after);
    // Nothing moves on a join until a turn asks: an active session that moved pulled its chain
    // from the previous owner at most once (none when a turn on the old owner had already
    // replicated it to the newcomer); idle ones cost nothing.
    assert!(
        join.counters.pulls > 0.0 && join.counters.pulls as usize <= join.active_moved,
        "pulls {} for {} moved active sessions",
        join.counters.pulls,
        join.active_moved
    );
    assert_eq!(join.counters.handed_off, 0.0);

    let drain = report.change(Change::WorkerDrain).unwrap();
    assert_consistent_moves(&report, Change::WorkerDrain);
    assert_eq!(drain.failed(), 0, "failed turns on drain: {:?} {:?}", drain.failed_during, drain.failed_after);
    assert_eq!(drain.outcome, None, "the worker drained within its shutdown grace");
    let held = drain.leaving_held.expect("the drained worker's state was read");
    assert!(
        drain.counters.handed_off as u64 >= held.entries,
        "handed off {} of {} states held",
        drain.counters.handed_off,
        held.entries
    );

    let kill = report.change(Change::WorkerKill).unwrap();
    assert_consistent_moves(&report, Change::WorkerKill);
    // Turns in flight on the killed worker may fail; every session continues afterwards
    // (its chain's replica is on the ring successor, the new owner).
    assert!(kill.failed_after.is_empty(), "sessions lost with the killed worker: {:?}", kill.failed_after);

    let shard = report.change(Change::ShardDrain).unwrap();
    assert_eq!(shard.outcome, None, "the shard drained within its shutdown grace");
    assert_eq!(shard.failed(), 0, "failed turns on shard drain: {:?} {:?}", shard.failed_during, shard.failed_after);
}
