//! The worker's side of mid-stream continuation at exact cut points: a turn re-issued with a
//! `Resume` that carries the completion tokens an undisturbed run had reported by its k-th
//! event is the same response (id, items and their ids, text, arguments, usage), for a text
//! answer and for a function call cut inside its arguments. The edge's splice of the two
//! streams is unit-tested with the edge (`relay::splice`); the whole path, with real processes
//! killed and frozen, in `processes.rs`.

use std::time::Duration;

use serde_json::{Value, json};
use tether_proto::worker::v1::worker_client::WorkerClient;
use tether_proto::worker::v1::{Delivery, Event, Resume, Transport, TurnRequest, turn_event};
use tether_tests::Cluster;
use tether_tests::client::run_tests_tool;
use tonic::transport::{Channel, Endpoint};

/// Runs one turn on the worker and returns its events.
async fn turn(client: &mut WorkerClient<Channel>, session: u64, body: &Value, resume: Option<Resume>) -> Vec<Event> {
    let request = TurnRequest {
        tenant: "continuation".into(),
        session,
        body: serde_json::to_vec(body).unwrap(),
        transport: Transport::Websocket as i32,
        delivery: Delivery::Events as i32,
        resume,
        ..Default::default()
    };
    let mut stream = client.turn(request).await.expect("the turn starts").into_inner();
    let mut events = Vec::new();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), stream.message()).await.expect("no hang");
        match message.expect("the stream does not break") {
            Some(message) => match message.kind {
                Some(turn_event::Kind::Event(event)) => {
                    let terminal = event.terminal;
                    events.push(event);
                    if terminal {
                        return events;
                    }
                }
                other => panic!("an event, not {other:?}"),
            },
            None => panic!("the stream ended before its terminal event"),
        }
    }
}

fn response(events: &[Event]) -> Value {
    let last: Value = serde_json::from_slice(&events.last().unwrap().json).unwrap();
    assert_eq!(last["type"], "response.completed", "{last}");
    last["response"].clone()
}

/// Re-issues the turn resumed after each event of an undisturbed run and compares.
async fn every_cut_is_the_same_response(body: Value, session: u64) {
    let cluster = Cluster::builder().workers(1).shards(1).start().await;
    let channel = Endpoint::from_shared(cluster.workers[0].url()).unwrap().connect_lazy();
    let mut client = WorkerClient::new(channel);
    let reference = turn(&mut client, session, &body, None).await;
    let expected = response(&reference);
    assert!(reference.iter().any(|e| !e.progress_ids.is_empty()), "events carry the completion tokens");
    let (id, created_at) = (expected["id"].as_str().unwrap(), expected["created_at"].as_u64().unwrap());
    let (mut ids, mut text) = (Vec::new(), String::new());
    for (cut, event) in reference.iter().enumerate().take(reference.len() - 1) {
        ids.extend_from_slice(&event.progress_ids);
        text.push_str(&event.progress_text);
        let resume = Resume {
            response_id: id.to_owned(),
            created_at,
            completion_ids: ids.clone(),
            completion_text: text.clone(),
        };
        let resumed = response(&turn(&mut client, session, &body, Some(resume)).await);
        for field in ["id", "created_at", "output", "status"] {
            assert_eq!(resumed[field], expected[field], "cut after event {cut}: {field}");
        }
        assert_eq!(resumed["usage"]["output_tokens"], expected["usage"]["output_tokens"], "cut after event {cut}");
        assert_eq!(resumed["usage"]["input_tokens"], expected["usage"]["input_tokens"], "cut after event {cut}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_answer_resumed_at_every_event_is_the_same_response() {
    let body = json!({"model": "tether-sim", "input": "tell me about rings",
                      "metadata": {"tether_sim_output_tokens": "24"}});
    every_cut_is_the_same_response(body, 0x7e57_0001).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_call_resumed_inside_its_arguments_is_the_same_response() {
    let body = json!({"model": "tether-sim", "input": "run the tests", "tools": [run_tests_tool()],
                      "tool_choice": "required"});
    every_cut_is_the_same_response(body, 0x7e57_0002).await;
}
