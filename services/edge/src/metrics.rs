//! The edge's metrics, described once at startup. Labels have bounded cardinality: a `tenant`
//! label names a configured tenant (`default` with open auth), never a key or a client value.

pub const REQUESTS: &str = "tether_edge_requests_total";
pub const WS_CONNECTIONS: &str = "tether_edge_ws_connections";
pub const WS_CONNECTIONS_ACCEPTED: &str = "tether_edge_ws_connections_accepted_total";
pub const WS_CLIENT_ERRORS: &str = "tether_edge_ws_client_errors_total";
pub const EVENTS_RELAYED: &str = "tether_edge_events_relayed_total";
pub const FIRST_EVENT_SECONDS: &str = "tether_edge_first_event_seconds";
pub const WORKER_ERRORS: &str = "tether_edge_worker_errors_total";
pub const RESPONSES_FAILED_MIDSTREAM: &str = "tether_edge_responses_failed_midstream_total";
pub const RESPONSES_RESUMED: &str = "tether_edge_responses_resumed_total";
pub const IN_FLIGHT: &str = "tether_edge_in_flight_responses";
pub const TURN_RETRIES: &str = "tether_edge_turn_retries_total";
pub const ADMISSION_REFUSED: &str = "tether_edge_admission_refused_total";
pub const SLOW_CLIENTS: &str = "tether_edge_slow_clients_total";
pub const HTTP_CONNECTIONS: &str = "tether_edge_http_connections";
pub const HTTP_CONNECTIONS_REFUSED: &str = "tether_edge_http_connections_refused_total";

pub fn describe() {
    metrics::describe_counter!(REQUESTS, "Responses requests by transport, tenant and outcome");
    metrics::describe_gauge!(WS_CONNECTIONS, "Open WebSocket connections, by tenant");
    metrics::describe_counter!(WS_CONNECTIONS_ACCEPTED, "WebSocket connections accepted");
    metrics::describe_counter!(WS_CLIENT_ERRORS, "Client events rejected, by code");
    metrics::describe_counter!(EVENTS_RELAYED, "Events relayed to clients");
    metrics::describe_histogram!(FIRST_EVENT_SECONDS, metrics::Unit::Seconds, "Request to first relayed event");
    metrics::describe_counter!(WORKER_ERRORS, "Failed worker calls, by class");
    metrics::describe_counter!(RESPONSES_FAILED_MIDSTREAM, "Responses ended by the edge after their worker went away");
    metrics::describe_counter!(
        RESPONSES_RESUMED,
        "Responses continued on another worker after theirs went away mid-stream"
    );
    metrics::describe_gauge!(IN_FLIGHT, "Responses in progress, by tenant");
    metrics::describe_counter!(TURN_RETRIES, "Turns moved to another worker before any event");
    metrics::describe_counter!(ADMISSION_REFUSED, "Requests refused by a limit, by tenant and limit");
    metrics::describe_counter!(SLOW_CLIENTS, "Responses cancelled because their client read nothing in time");
    metrics::describe_gauge!(HTTP_CONNECTIONS, "Open HTTP connections (not upgraded to WebSocket)");
    metrics::describe_counter!(HTTP_CONNECTIONS_REFUSED, "HTTP connections refused at --max-http-connections");
}
