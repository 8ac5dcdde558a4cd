//! Placement: owner and successor lookups on the ring, and rebuilding it on a change.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tether_common::placement::{DEFAULT_VNODES, Ring};

fn ring(n: usize) -> (Vec<String>, Ring) {
    let ids: Vec<String> = (0..n).map(|i| format!("worker-{i}")).collect();
    let ring = Ring::new(ids.iter().map(String::as_str), DEFAULT_VNODES);
    (ids, ring)
}

fn placement(c: &mut Criterion) {
    for n in [3, 16, 64] {
        let (ids, ring) = ring(n);
        let mut key = 0x9e37_79b9_7f4a_7c15u64;
        c.bench_function(&format!("owner/{n}_workers"), |b| {
            b.iter(|| {
                key = key.wrapping_mul(6364136223846793005).wrapping_add(1);
                black_box(ring.owner(black_box(key)))
            })
        });
        c.bench_function(&format!("successor/{n}_workers"), |b| {
            b.iter(|| {
                key = key.wrapping_mul(6364136223846793005).wrapping_add(1);
                black_box(ring.successor(black_box(key)))
            })
        });
        c.bench_function(&format!("rebuild/{n}_workers"), |b| {
            b.iter(|| black_box(Ring::new(ids.iter().map(String::as_str), DEFAULT_VNODES)))
        });
    }
}

criterion_group!(benches, placement);
criterion_main!(benches);
