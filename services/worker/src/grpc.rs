//! The `tether.worker.v1.Worker` service.

use std::pin::Pin;
use std::sync::Arc;

use tether_proto::worker::v1::worker_server::Worker;
use tether_proto::worker::v1::{
    FetchStateRequest, FetchStateResponse, ListInputItemsRequest, ListModelsRequest, ListModelsResponse,
    ReleaseConnectionRequest, ReleaseConnectionResponse, ReplicateRequest, ReplicateResponse, ResponseBody,
    ResponseRef, StatusRequest, StatusResponse, TurnEvent, TurnRequest, response_body,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::api::item_list::{self, Page};
use crate::context::WorkerContext;
use crate::error::WorkerError;
use crate::pipeline::{count_input_tokens, run_turn};
use crate::replication;
use crate::session::convert::to_proto;

pub struct WorkerService {
    ctx: Arc<WorkerContext>,
}

impl WorkerService {
    pub fn new(ctx: Arc<WorkerContext>) -> Self {
        WorkerService { ctx }
    }

    /// Returns a stored response, pulling it from the previous owner or the replica holder
    /// when it moved here with its key (a forwarded, local-only request never pulls).
    async fn stored(&self, reference: &ResponseRef) -> Option<Arc<crate::session::ResponseState>> {
        let tenant = &reference.tenant;
        let id = &reference.response_id;
        let local = self.ctx.cache.get(tenant, id);
        let state = match (local, reference.local_only) {
            (Some(state), _) => Some(state),
            (None, true) => None,
            (None, false) => {
                let key = tether_common::ResponseId::parse(id)?.session_key().0;
                replication::pull(&self.ctx, tenant, id, key).await
            }
        };
        state.filter(|state| state.store)
    }
}

fn error_body(error: &WorkerError) -> ResponseBody {
    ResponseBody { kind: Some(response_body::Kind::Error(error.api_error())) }
}

/// The cancel's answer for a response that already ended: the object itself once it was
/// cancelled (a repeated cancel), otherwise the error naming its status.
fn cancel_reply(response: &serde_json::Value) -> ResponseBody {
    match response.get("status").and_then(serde_json::Value::as_str) {
        Some("cancelled") => ResponseBody { kind: Some(response_body::Kind::Json(response.to_string().into_bytes())) },
        status => error_body(&WorkerError::NotCancellable { status: status.unwrap_or("unknown").to_owned() }),
    }
}

fn not_found(id: &str) -> ResponseBody {
    ResponseBody { kind: Some(response_body::Kind::Error(WorkerError::ResponseNotFound(id.to_owned()).api_error())) }
}

/// A JSON reply, or the error in the protocol's shape.
fn reply(result: Result<serde_json::Value, WorkerError>) -> ResponseBody {
    let kind = match result {
        Ok(json) => response_body::Kind::Json(json.to_string().into_bytes()),
        Err(error) => response_body::Kind::Error(error.api_error()),
    };
    ResponseBody { kind: Some(kind) }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<TurnEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    type TurnStream = EventStream;

    async fn turn(&self, request: Request<TurnRequest>) -> Result<Response<EventStream>, Status> {
        if !self.ctx.serving.is_ready() {
            return Err(WorkerError::NotServing.into());
        }
        let (tx, rx) = mpsc::channel(32);
        let parent = tether_common::trace::from_metadata(request.metadata());
        let turn = request.into_inner();
        let span = tracing::info_span!(
            "worker.turn",
            otel.kind = "server",
            node = %self.ctx.id,
            session = %format_args!("{:016x}", turn.session),
            request_id = %turn.request_id,
        );
        tether_common::trace::set_parent(&span, parent);
        let ctx = self.ctx.clone();
        tokio::spawn(
            async move {
                let _in_flight = ctx.stats.turn();
                run_turn(ctx.clone(), turn, tx).await
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_response(&self, request: Request<ResponseRef>) -> Result<Response<ResponseBody>, Status> {
        let reference = request.into_inner();
        let body = match self.stored(&reference).await {
            Some(state) => ResponseBody { kind: Some(response_body::Kind::Json(state.response_json.to_vec())) },
            None => not_found(&reference.response_id),
        };
        Ok(Response::new(body))
    }

    async fn delete_response(&self, request: Request<ResponseRef>) -> Result<Response<ResponseBody>, Status> {
        let reference = request.into_inner();
        if self.stored(&reference).await.is_none() {
            return Ok(Response::new(not_found(&reference.response_id)));
        }
        let removed = self.ctx.cache.remove(&reference.tenant, &reference.response_id);
        if let Some(state) = removed.filter(|_| !reference.local_only) {
            // Every copy a later pull could find goes too, or it would bring the response back.
            replication::forget(&self.ctx, &reference, state.session.0).await;
        }
        let json = serde_json::json!({"id": reference.response_id, "object": "response.deleted", "deleted": true});
        Ok(Response::new(ResponseBody { kind: Some(response_body::Kind::Json(json.to_string().into_bytes())) }))
    }

    async fn release_connection(
        &self,
        request: Request<ReleaseConnectionRequest>,
    ) -> Result<Response<ReleaseConnectionResponse>, Status> {
        let released = self.ctx.cache.release_connection(request.into_inner().connection);
        Ok(Response::new(ReleaseConnectionResponse { released }))
    }

    async fn list_models(&self, _request: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        // Also the edges' liveness probe: a worker that does not take turns says so.
        if !self.ctx.serving.is_ready() {
            return Err(WorkerError::NotServing.into());
        }
        Ok(Response::new(ListModelsResponse { models: self.ctx.shards.models() }))
    }

    async fn replicate(&self, request: Request<ReplicateRequest>) -> Result<Response<ReplicateResponse>, Status> {
        // A draining (or fenced) worker takes no states: it would leave with them. The sender
        // ejects it and sends to the next owner.
        if !self.ctx.serving.is_ready() {
            return Err(WorkerError::NotServing.into());
        }
        let need_full = replication::accept(&self.ctx, request.into_inner().states);
        // Checked again after storing: a drain that began meanwhile may have taken its hand-off
        // snapshot without these states, so the sender must not count on this copy. (A drain
        // that begins after this check snapshots after the insert and hands them on.)
        if !self.ctx.serving.is_ready() {
            return Err(WorkerError::NotServing.into());
        }
        Ok(Response::new(ReplicateResponse { need_full }))
    }

    async fn fetch_state(&self, request: Request<FetchStateRequest>) -> Result<Response<FetchStateResponse>, Status> {
        let request = request.into_inner();
        let state = self
            .ctx
            .cache
            .get(&request.tenant, &request.response_id)
            .filter(|state| state.store)
            .map(|state| to_proto(&state, false));
        Ok(Response::new(FetchStateResponse { state }))
    }

    async fn cancel_response(&self, request: Request<ResponseRef>) -> Result<Response<ResponseBody>, Status> {
        let reference = request.into_inner();
        let (tenant, id) = (&reference.tenant, &reference.response_id);
        let body = match self.ctx.in_flight.cancel(tenant, id).await {
            Some(Some(response)) => cancel_reply(&response),
            // The turn ended without a Response (its client went away first): nothing remains.
            Some(None) => not_found(id),
            None => match self.stored(&reference).await {
                Some(state) => match serde_json::from_slice::<serde_json::Value>(&state.response_json) {
                    Ok(response) => cancel_reply(&response),
                    Err(_) => not_found(id),
                },
                None => not_found(id),
            },
        };
        Ok(Response::new(body))
    }

    async fn list_input_items(
        &self,
        request: Request<ListInputItemsRequest>,
    ) -> Result<Response<ResponseBody>, Status> {
        let request = request.into_inner();
        let reference = request.response.unwrap_or_default();
        let page = Page {
            limit: request.limit.clamp(1, 100) as usize,
            ascending: request.ascending,
            after: (!request.after.is_empty()).then_some(request.after),
        };
        let body = match self.stored(&reference).await {
            Some(state) => reply(item_list::list(&state, &page)),
            None => not_found(&reference.response_id),
        };
        Ok(Response::new(body))
    }

    async fn count_input_tokens(&self, request: Request<TurnRequest>) -> Result<Response<ResponseBody>, Status> {
        // A worker that takes no turns counts none either: the edge asks the next owner.
        if !self.ctx.serving.is_ready() {
            return Err(WorkerError::NotServing.into());
        }
        let count = count_input_tokens(&self.ctx, &request.into_inner()).await;
        let json = count.map(|tokens| serde_json::json!({"object": "response.input_tokens", "input_tokens": tokens}));
        Ok(Response::new(reply(json)))
    }

    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let stats = self.ctx.stats.snapshot();
        Ok(Response::new(StatusResponse {
            worker_id: self.ctx.id.clone(),
            serving: self.ctx.serving.is_ready(),
            draining: stats.draining,
            cache_entries: self.ctx.cache.len() as u64,
            cache_bytes: self.ctx.cache.bytes() as u64,
            in_flight_turns: stats.in_flight,
            turns: stats.turns,
            pulls: stats.pulls,
            handed_off: stats.handed_off,
            replica_batches: stats.replica_batches,
            fenced: stats.fenced,
        }))
    }
}
