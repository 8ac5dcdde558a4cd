//! A stateless prompt (`full`, a session the shard never saw) hits the prefix another session
//! left on the shard, block by block, when the engine can share prefixes (the sim); with the
//! per-session bookkeeping alone it is a cold prefill.

use std::sync::Arc;
use std::time::Duration;

use tether_common::ops::Readiness;
use tether_proto::shard::v1::generate_chunk::Kind;
use tether_proto::shard::v1::shard_server::Shard;
use tether_proto::shard::v1::{GenerateRequest, InfoRequest, Sampling, Usage};
use tether_shard::ShardConfig;
use tether_shard::engine::sim::SimEngine;
use tether_shard::grpc::ShardService;
use tether_shard::kv_cache::KvCache;
use tokio_stream::StreamExt;
use tonic::Request;

const BLOCK: u32 = 16;

fn shard(cache: KvCache) -> ShardService {
    let serving = Readiness::default();
    serving.set(true);
    let engine = Arc::new(SimEngine::new(ShardConfig::for_test().sim));
    ShardService::new("shard-test".into(), engine, Arc::new(cache), serving)
}

/// Runs a stateless turn of `tokens` as `session` and returns its usage.
async fn stateless_turn(shard: &ShardService, session: u64, tokens: &[u32]) -> Usage {
    scoped_turn(shard, session, TENANT, tokens).await
}

/// The scope of the tenant these tests' turns belong to.
const TENANT: u64 = 0x7e;

/// [`stateless_turn`] for the tenant with `scope`.
async fn scoped_turn(shard: &ShardService, session: u64, scope: u64, tokens: &[u32]) -> Usage {
    let request = GenerateRequest {
        session,
        cache_scope: scope,
        model: "tether-sim".into(),
        tokens: tokens.to_vec(),
        full: true,
        sampling: Some(Sampling { max_output_tokens: 5, ..Default::default() }),
        ..Default::default()
    };
    let turn = async {
        let mut stream = shard.generate(Request::new(request)).await.expect("generate").into_inner();
        while let Some(chunk) = stream.next().await {
            if let Some(Kind::Finished(finished)) = chunk.expect("chunk").kind {
                return finished.usage.expect("usage");
            }
        }
        panic!("the stream ended without Finished");
    };
    tokio::time::timeout(Duration::from_secs(10), turn).await.expect("the turn finished")
}

/// A prompt of `len` tokens the sim's vocabulary has, starting at `first`.
fn prompt(first: u32, len: u32) -> Vec<u32> {
    (first..first + len).map(|i| 1_000 + i).collect()
}

#[tokio::test]
async fn a_new_session_hits_the_blocks_another_session_left() {
    let shard = shard(KvCache::new(1_000_000).with_shared_prefixes(BLOCK));
    let history = prompt(0, 100);
    assert_eq!(stateless_turn(&shard, 1, &history).await.cached_tokens, 0, "a cold shard");

    // Another conversation resends that history and adds to it: the six full blocks of the
    // history are held (the seventh mixes the history's tail with the first answer's tokens).
    let mut longer = history.clone();
    longer.extend(prompt(500, 40));
    let usage = stateless_turn(&shard, 2, &longer).await;
    assert_eq!(usage.prompt_tokens, 140);
    assert_eq!(usage.cached_tokens, 96, "100 shared tokens, 6 full blocks of {BLOCK}");

    // Another tenant's conversation with the same history sees nothing of it.
    assert_eq!(scoped_turn(&shard, 4, TENANT + 1, &longer).await.cached_tokens, 0, "scoped by tenant");

    // A prompt that diverges inside the second block shares only the first.
    let mut fork = history.clone();
    fork[20] = 7;
    assert_eq!(stateless_turn(&shard, 3, &fork).await.cached_tokens, 16);

    // A session's own longer prefix still counts in full (not only whole blocks).
    let mut again = longer.clone();
    again.push(9);
    let own = stateless_turn(&shard, 2, &again).await.cached_tokens;
    assert!(own >= 140, "session 2 holds its whole last prompt: {own}");

    let info = shard.info(Request::new(InfoRequest {})).await.expect("info").into_inner();
    // Misses: the cold shard and the other tenant's turn.
    assert_eq!((info.cache_hits, info.cache_misses), (3, 2));
}

#[tokio::test]
async fn without_shared_prefixes_only_the_session_itself_hits() {
    let shard = shard(KvCache::new(1_000_000));
    let history = prompt(0, 100);
    stateless_turn(&shard, 1, &history).await;
    assert_eq!(stateless_turn(&shard, 2, &history).await.cached_tokens, 0, "another session");
    assert_eq!(stateless_turn(&shard, 1, &history).await.cached_tokens, 100, "the same session");
}
