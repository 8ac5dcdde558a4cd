//! The real model behind the whole stack (issue 6): an in-process cluster whose shard runs the
//! llama engine on SmolLM2-135M-Instruct. Needs the `llama` feature and the model file
//! (`scripts/fetch-model.sh`; `TETHER_LLAMA_MODEL` overrides the path). A missing model fails
//! the test: a build with the feature is a request to run these.
//!
//!   scripts/fetch-model.sh && cargo test -p tether-tests --features llama --test llama
#![cfg(feature = "llama")]

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use tether_shard::config::LlamaConfig;
use tether_tests::Cluster;
use tether_tests::client::{cached_tokens, function_calls, output_text, run_tests_tool};
use tether_tests::wait::within;
use tracing::info;

fn model_path() -> PathBuf {
    let path = std::env::var_os("TETHER_LLAMA_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(path.is_file(), "model file {} is missing: run scripts/fetch-model.sh", path.display());
    path
}

/// A cluster of one edge, one worker and one llama shard.
async fn llama_cluster(change: impl FnOnce(&mut LlamaConfig)) -> (Cluster, String) {
    let mut llama = LlamaConfig::new(model_path());
    llama.context_tokens = 4096;
    llama.sequences = 4;
    llama.threads = 2;
    change(&mut llama);
    let (name, path) = (llama.model_name.clone(), llama.model_path.clone());
    let cluster = Cluster::builder()
        .shards(1)
        .workers(1)
        .shard_config(|c| c.llama = Some(llama))
        .worker_config(|c| {
            c.default_model = name.clone();
            c.llama_models = vec![(name.clone(), path)];
        })
        .start()
        .await;
    (cluster, name)
}

async fn create(http: &reqwest::Client, cluster: &Cluster, body: Value) -> Value {
    let reply = within(Duration::from_secs(120), "a llama response", async {
        http.post(format!("{}/v1/responses", cluster.url())).json(&body).send().await.expect("post")
    })
    .await;
    assert_eq!(reply.status(), 200);
    let response: Value = reply.json().await.expect("json");
    assert!(matches!(response["status"].as_str(), Some("completed" | "incomplete")), "{response}");
    response
}

fn usage(response: &Value, field: &str) -> u64 {
    response["usage"][field].as_u64().unwrap_or_else(|| panic!("usage.{field} in {response}"))
}

fn prefill_us(response: &Value) -> u64 {
    response["x_tether"]["prefill_us"].as_u64().expect("x_tether.prefill_us")
}

/// Real text: some letters, not only whitespace or markup.
fn assert_real_text(text: &str) {
    assert!(text.chars().filter(|c| c.is_alphabetic()).count() >= 3, "expected real text, got {text:?}");
    assert!(!text.contains("<|im_"), "chat markup leaked into the answer: {text:?}");
}

/// About 600 tokens of history, so a full prefill clearly costs more than a follow-up.
fn long_context() -> String {
    let facts = [
        "The Rhine flows from the Swiss Alps to the North Sea.",
        "Paris is the capital of France and sits on the Seine.",
        "Mount Everest is the highest mountain above sea level.",
        "Water boils at one hundred degrees Celsius at sea level.",
        "The Pacific is the largest and deepest ocean on Earth.",
        "Honey bees communicate the direction of flowers by dancing.",
    ];
    let mut text = String::from("Here are some notes.\n");
    for round in 0..8 {
        for fact in facts {
            text.push_str(&format!("{round}. {fact}\n"));
        }
    }
    text.push_str("Question: what is the capital of France?");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_up_turn_reuses_the_kv_cache_and_decodes_only_new_tokens() {
    let (cluster, model) = llama_cluster(|_| {}).await;
    let http = reqwest::Client::new();

    info!("--- turn 1: a long prompt, prefilled in full");
    let first = create(
        &http,
        &cluster,
        json!({"model": model, "input": long_context(), "temperature": 0, "max_output_tokens": 24}),
    )
    .await;
    assert_eq!(first["model"], model);
    assert_eq!(cached_tokens(&first), 0);
    let first_prompt = usage(&first, "input_tokens");
    assert!(first_prompt > 400, "the long context renders to {first_prompt} tokens");
    assert_real_text(&output_text(&first));
    info!(text = %output_text(&first), prefill_us = prefill_us(&first), "turn 1");

    info!("--- turn 2: only the new message is decoded");
    let second = create(
        &http,
        &cluster,
        json!({"model": model, "previous_response_id": first["id"], "input": "Say it again in one short sentence.", "temperature": 0, "max_output_tokens": 24}),
    )
    .await;
    let held = first_prompt + usage(&first, "output_tokens");
    assert_eq!(cached_tokens(&second), held, "the shard holds turn 1's prompt and answer");
    let new_tokens = usage(&second, "input_tokens") - cached_tokens(&second);
    assert!(new_tokens < 40, "turn 2 decodes only its {new_tokens} new tokens");
    assert_real_text(&output_text(&second));
    info!(text = %output_text(&second), prefill_us = prefill_us(&second), "turn 2");
    assert!(
        prefill_us(&second) * 2 < prefill_us(&first),
        "a follow-up prefill ({} us) costs far less than the full one ({} us)",
        prefill_us(&second),
        prefill_us(&first)
    );

    info!("--- turn 3: the chain keeps growing on the same sequence");
    let third = create(&http, &cluster, json!({"model": model, "previous_response_id": second["id"], "input": "Thanks!", "temperature": 0, "max_output_tokens": 16})).await;
    assert_eq!(cached_tokens(&third), usage(&second, "input_tokens") + usage(&second, "output_tokens"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_sessions_are_resent_in_full_and_sampling_limits_hold() {
    // Two sequences: a third session evicts the least recently used one.
    let (cluster, model) = llama_cluster(|c| c.sequences = 2).await;
    let http = reqwest::Client::new();
    let turn = |input: &str, previous: Option<&Value>| {
        let mut body = json!({"model": model, "input": input, "temperature": 0, "max_output_tokens": 8});
        if let Some(previous) = previous {
            body["previous_response_id"] = previous["id"].clone();
        }
        body
    };

    info!("--- three sessions on two sequences");
    let a = create(&http, &cluster, turn("Name a color.", None)).await;
    assert_eq!(a["status"], "incomplete", "8 tokens cut the answer: {a}");
    assert_eq!(a["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(usage(&a, "output_tokens"), 8);
    let b = create(&http, &cluster, turn("Name a fruit.", None)).await;
    let _c = create(&http, &cluster, turn("Name an animal.", None)).await;
    assert!(cached_tokens(&create(&http, &cluster, turn("And another?", Some(&b))).await) > 0, "b was used after a");

    info!("--- a was evicted: its follow-up is a cache miss, resent in full, and still answered");
    let a2 = create(&http, &cluster, turn("And another one?", Some(&a))).await;
    assert_eq!(cached_tokens(&a2), 0, "a's sequence was evicted");
    assert_real_text(&output_text(&a2));

    info!("--- and a is cached again afterwards");
    let a3 = create(&http, &cluster, turn("One more.", Some(&a2))).await;
    assert_eq!(cached_tokens(&a3), usage(&a2, "input_tokens") + usage(&a2, "output_tokens"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_reach_the_prompt_and_calls_are_only_what_the_model_wrote() {
    let (cluster, model) = llama_cluster(|_| {}).await;
    let http = reqwest::Client::new();
    let response = create(
        &http,
        &cluster,
        json!({"model": model, "input": "Run the tests in src/ verbosely.", "tools": [run_tests_tool()], "temperature": 0, "max_output_tokens": 64}),
    )
    .await;
    assert!(usage(&response, "input_tokens") > 60, "the tool definitions are in the prompt");
    // SmolLM2-135M rarely writes a `<tool_call>`: either outcome is fine, a made-up call is not.
    let calls = function_calls(&response);
    for call in &calls {
        assert_eq!(call["name"], "run_tests", "{call}");
        if call["status"] == "incomplete" {
            // Cut by max_output_tokens while its arguments streamed: unfinished, and said so.
            assert_eq!(response["status"], "incomplete", "{response}");
            continue;
        }
        let arguments: Value =
            serde_json::from_str(call["arguments"].as_str().expect("arguments")).expect("JSON arguments");
        assert!(arguments.is_object(), "{call}");
    }
    if calls.is_empty() {
        assert_real_text(&output_text(&response));
    }
    info!(calls = calls.len(), text = %output_text(&response), "tool turn");
}

// === benchmark ===

/// Time to first token of a follow-up turn with KV reuse vs a full re-prefill, prefill and decode
/// rates, and sessions held before eviction. Prints the tables of `loadtest/README.md`:
///
///   cargo test --release -p tether-tests --features llama --test llama -- --ignored --nocapture
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: minutes of CPU"]
async fn benchmark_kv_reuse() {
    use std::time::Instant;

    use futures_util::StreamExt;
    use tether_vocabulary::ChatVocabulary;

    let path = model_path();
    let vocabulary = ChatVocabulary::load(&path).expect("vocabulary");
    let (cluster, model) = llama_cluster(|c| {
        c.context_tokens = 8192;
        c.sequences = 16;
    })
    .await;
    let http = reqwest::Client::new();

    // Filler text of about `tokens` tokens.
    let filler = |tokens: usize, salt: usize| {
        let mut text = String::new();
        let mut i = salt * 7919;
        while vocabulary.encode(&text, false).len() < tokens {
            i += 1;
            text.push_str(&format!(
                "Note {i}: the shard keeps session {} warm while worker {} renders turn {}.\n",
                i % 97,
                i % 13,
                i % 31
            ));
        }
        text
    };
    // Streams a request; returns (client TTFT in ms, the final response).
    let stream = |body: Value| {
        let http = http.clone();
        let url = format!("{}/v1/responses", cluster.url());
        async move {
            let started = Instant::now();
            let mut body = body;
            body["stream"] = json!(true);
            let reply = http.post(url).json(&body).send().await.expect("post");
            let mut bytes = reply.bytes_stream();
            let (mut text, mut ttft) = (String::new(), None);
            while let Some(chunk) = bytes.next().await {
                text.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
                if ttft.is_none() && text.contains("response.output_text.delta") {
                    ttft = Some(started.elapsed().as_secs_f64() * 1e3);
                }
            }
            let last = text.split("\n\n").filter(|f| !f.trim().is_empty()).last().expect("events");
            let data: Value = serde_json::from_str(last.split_once("data: ").expect("data").1).expect("json");
            (ttft.unwrap_or(f64::NAN), data["response"].clone())
        }
    };

    // Decode with the cache otherwise empty.
    for _ in 0..2 {
        let story = create(&http, &cluster, json!({"model": model, "input": "Write a long story about a dragon and a knight.", "temperature": 0, "max_output_tokens": 128})).await;
        let decoded = usage(&story, "output_tokens").saturating_sub(1) as f64;
        let seconds = story["x_tether"]["decode_us"].as_u64().unwrap_or(1) as f64 / 1e6;
        println!("decode, short context: {:.0} tok/s ({} tokens)", decoded / seconds, usage(&story, "output_tokens"));
    }

    println!(
        "\n| history | follow-up TTFT, KV reuse | follow-up TTFT, full re-prefill | speed-up | engine prefill, reuse / full | prefill tok/s (turn 1) | decode tok/s |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (index, history) in [1000usize, 4000].into_iter().enumerate() {
        for rep in 0..2 {
            let notes = filler(history, index * 10 + rep);
            let first = create(
                &http,
                &cluster,
                json!({"model": model, "input": notes, "temperature": 0, "max_output_tokens": 64}),
            )
            .await;
            let question = "Which worker rendered the last turn? Answer in one sentence.";
            let (reuse_ttft, reuse) = stream(json!({"model": model, "previous_response_id": first["id"], "input": question, "temperature": 0, "max_output_tokens": 8})).await;
            let history_items = json!([
                {"role": "user", "content": notes},
                {"role": "assistant", "content": output_text(&first)},
                {"role": "user", "content": question},
            ]);
            let (full_ttft, full) = stream(json!({"model": model, "input": history_items, "store": false, "temperature": 0, "max_output_tokens": 8})).await;
            assert!(cached_tokens(&reuse) > 0 && cached_tokens(&full) == 0);
            let prefill_rate = usage(&first, "input_tokens") as f64 / (prefill_us(&first) as f64 / 1e6);
            let decoded = usage(&first, "output_tokens").saturating_sub(1) as f64;
            let decode_rate = decoded / (first["x_tether"]["decode_us"].as_u64().unwrap_or(1) as f64 / 1e6);
            println!(
                "| {} tokens (run {}) | {:.0} ms | {:.0} ms | {:.1}x | {:.0} / {:.0} ms | {:.0} | {:.0} ({} tokens) |",
                usage(&full, "input_tokens"),
                rep + 1,
                reuse_ttft,
                full_ttft,
                full_ttft / reuse_ttft,
                prefill_us(&reuse) as f64 / 1e3,
                prefill_us(&full) as f64 / 1e3,
                prefill_rate,
                decode_rate,
                usage(&first, "output_tokens"),
            );
        }
    }

    // Sessions held: new sessions until the shard's count stops growing.
    use tether_proto::shard::v1::InfoRequest;
    use tether_proto::shard::v1::shard_client::ShardClient;
    let mut shard = ShardClient::connect(cluster.shards[0].url()).await.expect("shard");
    println!("\n| session size (prompt + answer) | sessions held before eviction | context / sequences |");
    println!("|---|---|---|");
    for (index, size) in [300usize, 1000, 2000].into_iter().enumerate() {
        let mut held = 0;
        let mut sizes = Vec::new();
        for n in 0..20 {
            let response = create(&http, &cluster, json!({"model": model, "input": filler(size, 100 + index * 20 + n), "temperature": 0, "max_output_tokens": 16})).await;
            sizes.push(usage(&response, "input_tokens") + usage(&response, "output_tokens"));
            // After 20 sessions of one size, older (other-size) sessions are gone.
            held = shard.info(InfoRequest {}).await.expect("info").into_inner().cache_sessions;
        }
        let mean = sizes.iter().sum::<u64>() / sizes.len() as u64;
        println!("| ~{mean} tokens | {held} | 8192 / 16 |");
    }
}

// === session migration between two llama engines ===

/// A llama shard service in this process, without a network: the engine, its KV-cache
/// bookkeeping and the gRPC service around them, called directly.
async fn llama_service(id: &str, config: LlamaConfig) -> tether_shard::grpc::ShardService {
    use std::sync::Arc;

    use tether_shard::engine::llama::LlamaEngine;
    use tether_shard::kv_cache::KvCache;

    let cache = Arc::new(KvCache::new(u64::from(config.context_tokens)));
    let evicted = cache.clone();
    let on_evict = Box::new(move |session: u64| {
        evicted.drop_session(session);
    });
    let engine = tokio::task::spawn_blocking(move || LlamaEngine::start(config, on_evict))
        .await
        .expect("engine start")
        .expect("the model loads");
    let serving = tether_common::ops::Readiness::default();
    serving.set(true);
    tether_shard::grpc::ShardService::new(id.to_owned(), Arc::new(engine), cache, serving)
}

/// Runs a `Generate` to its end; returns (cached tokens, generated text).
async fn generate_on(
    service: &tether_shard::grpc::ShardService,
    request: tether_proto::shard::v1::GenerateRequest,
) -> (u32, String) {
    use futures_util::StreamExt;
    use tether_proto::shard::v1::generate_chunk::Kind;
    use tether_proto::shard::v1::shard_server::Shard;

    let mut stream = service.generate(tonic::Request::new(request)).await.expect("generate").into_inner();
    let mut text = String::new();
    while let Some(chunk) = within(Duration::from_secs(120), "a chunk", stream.next()).await {
        match chunk.expect("chunk").kind {
            Some(Kind::Tokens(tokens)) => text.push_str(&tokens.text),
            Some(Kind::Finished(finished)) => {
                return (finished.usage.expect("usage").cached_tokens, text);
            }
            Some(Kind::CacheMiss(miss)) => panic!("cache miss (held {})", miss.held_len),
            None => {}
        }
    }
    panic!("the stream ended without finishing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_exported_from_one_llama_shard_continues_on_another_with_its_kv_cache() {
    use std::time::Instant;

    use tether_common::tokens::PrefixHash;
    use tether_proto::shard::v1::shard_server::Shard;
    use tether_proto::shard::v1::{ExportSessionRequest, GenerateRequest, ImportSessionRequest, Sampling};
    use tether_vocabulary::ChatVocabulary;

    tether_common::telemetry::init_for_test();
    let path = model_path();
    let vocabulary = ChatVocabulary::load(&path).expect("vocabulary");
    let mut config = LlamaConfig::new(path);
    config.context_tokens = 2048;
    config.sequences = 4;
    config.threads = 2;
    let model = config.model_name.clone();
    let source = llama_service("source", config.clone()).await;
    let target = llama_service("target", config).await;

    let prefix = vocabulary.encode(
        &format!(
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n",
            long_context()
        ),
        true,
    );
    let follow_up = vocabulary.encode("<|im_start|>assistant\n", true);
    let session = 0x5e55_1011;
    let turn = |prefix_len: u32, prefix_hash: u64, tokens: Vec<u32>, prefill_only: bool| GenerateRequest {
        session,
        model: model.clone(),
        prefix_len,
        prefix_hash,
        tokens,
        full: false,
        sampling: Some(Sampling { temperature: Some(0.0), top_p: None, max_output_tokens: 12 }),
        tools: None,
        hints: Default::default(),
        prefill_only,
        output_format: None,
        resume_tokens: 0,
        cache_scope: 0,
    };

    info!("--- prefill {} tokens on the source", prefix.len());
    let (cached, _) = generate_on(&source, turn(0, 0, prefix.clone(), true)).await;
    assert_eq!(cached, 0);

    info!("--- export from the source, import on the target");
    let started = Instant::now();
    let exported = source
        .export_session(tonic::Request::new(ExportSessionRequest { session }))
        .await
        .expect("export")
        .into_inner();
    let export_time = started.elapsed();
    assert!(exported.found);
    assert_eq!(exported.model, model);
    assert_eq!(exported.tokens, prefix);
    let bytes = exported.state.len();
    assert!(bytes > prefix.len() * 1000, "a real KV state: {bytes} bytes for {} tokens", prefix.len());
    let started = Instant::now();
    let imported = target
        .import_session(tonic::Request::new(ImportSessionRequest {
            session,
            model: exported.model.clone(),
            tokens: exported.tokens.clone(),
            state: exported.state.clone(),
        }))
        .await
        .expect("import")
        .into_inner();
    let import_time = started.elapsed();
    assert!(imported.imported);
    assert_eq!(imported.held_len as usize, prefix.len());
    let tokens = prefix.len() as f64;
    println!(
        "session state of {} tokens: {bytes} bytes ({:.1} KiB/token); export {:.1} ms ({:.1} µs/token), import {:.1} ms ({:.1} µs/token)",
        prefix.len(),
        bytes as f64 / tokens / 1024.0,
        export_time.as_secs_f64() * 1e3,
        export_time.as_secs_f64() * 1e6 / tokens,
        import_time.as_secs_f64() * 1e3,
        import_time.as_secs_f64() * 1e6 / tokens,
    );

    info!("--- the next turn claims the prefix on both shards");
    let claim = PrefixHash::of(&prefix).value();
    let (cached, moved_text) = generate_on(&target, turn(prefix.len() as u32, claim, follow_up.clone(), false)).await;
    assert_eq!(cached as usize, prefix.len(), "the imported prefix is a cache hit");
    assert_real_text(&moved_text);
    let (cached, source_text) = generate_on(&source, turn(prefix.len() as u32, claim, follow_up, false)).await;
    assert_eq!(cached as usize, prefix.len());
    assert_eq!(moved_text, source_text, "greedy decoding continues identically from the moved state");

    info!("--- a state for another model is refused; an unknown session is not found");
    let wrong_model = target
        .import_session(tonic::Request::new(ImportSessionRequest {
            session: session + 1,
            model: "another-model".into(),
            tokens: exported.tokens.clone(),
            state: exported.state.clone(),
        }))
        .await
        .expect_err("another model's state");
    assert_eq!(wrong_model.code(), tonic::Code::InvalidArgument);
    let unknown = target
        .export_session(tonic::Request::new(ExportSessionRequest { session: session + 2 }))
        .await
        .expect("export of an unknown session")
        .into_inner();
    assert!(!unknown.found);

    info!("--- issue 11: a truncated or forged state is an error, never an abort");
    let state = &exported.state;
    // The first layer's key row size, after the header, the tokens, the stream and cell
    // counts, the cells, the four layout words and the key type: a size that overflows.
    let cells = exported.tokens.len();
    let first_row = 12 + 4 * cells + 8 + 12 * cells + 16 + 4;
    let mut forged_row = state.clone();
    forged_row[first_row..first_row + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    for (what, bad) in [
        ("cut by one byte", state[..state.len() - 1].to_vec()),
        ("cut in half", state[..state.len() / 2].to_vec()),
        ("one byte longer", [state.as_slice(), &[0]].concat()),
        ("garbage", vec![0x5a; state.len()]),
        ("a forged row size", forged_row),
    ] {
        let refused = target
            .import_session(tonic::Request::new(ImportSessionRequest {
                session: session + 3,
                model: exported.model.clone(),
                tokens: exported.tokens.clone(),
                state: bad,
            }))
            .await
            .expect_err(what);
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{what}");
    }
    let still = target
        .export_session(tonic::Request::new(ExportSessionRequest { session }))
        .await
        .expect("the shard still serves")
        .into_inner();
    assert!(still.found, "the imported session is still held");
}
