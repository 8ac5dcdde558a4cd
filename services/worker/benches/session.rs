//! The worker's hot paths: session-cache get/put, and rendering a turn's new items versus
//! rendering the whole history (what the stateless path pays every turn), and tokenizing a
//! text against finding it in the memo of recent texts, by size (where `MIN_BYTES` sits).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tether_common::SessionKey;
use tether_common::tokens::PrefixHash;
use tether_worker::api::items::{Item, Role};
use tether_worker::render::Renderer;
use tether_worker::session::state::ResponseState;
use tether_worker::session::{CacheLimits, Segments, SessionCache};
use tether_worker::tokenizer::{Memoized, O200k, Tokenizer};

fn state(i: usize) -> Arc<ResponseState> {
    Arc::new(ResponseState {
        id: format!("resp_{i:048x}"),
        parent: None,
        tenant: Arc::from("tenant"),
        session: SessionKey(i as u64),
        store: true,
        connection: 0,
        model: "tether-sim".into(),
        header_key: 0,
        items: Segments::default().with(vec![Item::Message { role: Role::User, text: "hello".into() }]),
        tokens: Segments::default().with(vec![1; 64]),
        own_items: 1,
        own_tokens: 64,
        tokens_rebuilt: true,
        prefix_hash: PrefixHash::default(),
        open_assistant: true,
        tool_outputs_seen: 0,
        verdicts: Segments::default(),
        response_json: Arc::from(&b"{}"[..]),
        created: Instant::now(),
    })
}

/// A 40-turn agent conversation: a request, then call/output pairs with ~1 KB outputs.
fn conversation(turns: usize) -> Vec<Item> {
    let mut items = vec![Item::Message { role: Role::User, text: "Fix the failing build in the repository.".into() }];
    for turn in 0..turns {
        items.push(Item::FunctionCall {
            id: format!("fc_{turn}"),
            call_id: format!("call_{turn}"),
            name: "run_tests".into(),
            arguments: format!("{{\"path\":\"crate/{turn}\",\"verbose\":true}}"),
        });
        let output = format!("test result for crate {turn}: ").repeat(32);
        items.push(Item::FunctionCallOutput { call_id: format!("call_{turn}"), output });
    }
    items
}

fn session(c: &mut Criterion) {
    let cache =
        SessionCache::new(CacheLimits { max_bytes: 1 << 30, max_entries: 1_000_000, ttl: Duration::from_secs(3600) });
    for i in 0..100_000 {
        cache.insert(state(i));
    }
    let ids: Vec<String> = (0..100_000).map(|i| format!("resp_{i:048x}")).collect();
    let mut n = 0usize;
    c.bench_function("cache/get_hit_100k", |b| {
        b.iter(|| {
            n = (n + 7919) % ids.len();
            black_box(cache.get("tenant", &ids[n]))
        })
    });
    let mut m = 100_000usize;
    c.bench_function("cache/put", |b| {
        b.iter(|| {
            m += 1;
            cache.insert(state(m));
        })
    });

    let renderer = Renderer::new();
    let items = conversation(40);
    let tools = vec![serde_json::json!({"type": "function", "name": "run_tests", "parameters": {"type": "object"}})];
    c.bench_function("render/new_items_one_turn", |b| {
        b.iter(|| {
            let mut out = Vec::new();
            let open = renderer.items(black_box(&items[items.len() - 1..]), true, &mut out);
            renderer.generation_prompt(open, &mut out);
            black_box(out)
        })
    });
    c.bench_function("render/full_history_40_turns", |b| {
        b.iter(|| {
            let mut out = Vec::new();
            renderer.header(Some("You are a coding agent."), &tools, &mut out);
            let open = renderer.items(black_box(&items), false, &mut out);
            renderer.generation_prompt(open, &mut out);
            black_box(out)
        })
    });
}

fn memo(c: &mut Criterion) {
    let plain = O200k::new();
    let memo = Memoized::new(Arc::new(O200k::new()));
    let words = "{\"path\":\"crate/parser\",\"verbose\":true} test result: 3 passed, 1 failed; ".repeat(8);
    for size in [32usize, 64, 256] {
        let text = &words[..size];
        memo.encode(text);
        c.bench_function(&format!("tokenize/bpe_{size}B"), |b| b.iter(|| black_box(plain.encode(black_box(text)))));
        c.bench_function(&format!("tokenize/memo_hit_{size}B"), |b| b.iter(|| black_box(memo.encode(black_box(text)))));
    }
}

criterion_group!(benches, session, memo);
criterion_main!(benches);
