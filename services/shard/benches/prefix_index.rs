//! The content index's cost per turn: a stateless turn looks its prompt up and inserts the
//! prompt plus its answer; a chained turn inserts the session's whole sequence. A 17k-token
//! history (the 30-turn loadtest workflow's last turn) against an index holding 200 such.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tether_shard::prefix_index::PrefixIndex;

fn history(seed: u32, len: u32) -> Vec<u32> {
    (0..len).map(|i| seed.wrapping_mul(2_654_435_761).wrapping_add(i) % 200_000).collect()
}

fn prefix_index(c: &mut Criterion) {
    for len in [2_000, 17_000] {
        let mut index = PrefixIndex::new(16, 4_000_000);
        for seed in 0..200 {
            index.insert(0, &history(seed, len));
        }
        let prompt = history(7, len);
        c.bench_function(&format!("lookup_hit/{len}_tokens"), |b| {
            b.iter(|| black_box(index.longest_prefix(0, black_box(&prompt))))
        });
        c.bench_function(&format!("insert_held/{len}_tokens"), |b| {
            b.iter(|| black_box(index.insert(0, black_box(&prompt))))
        });
    }
}

criterion_group!(benches, prefix_index);
criterion_main!(benches);
