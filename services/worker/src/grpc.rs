//! The `tether.worker.v1.Worker` service.

use std::pin::Pin;
use std::sync::Arc;

use tether_proto::worker::v1::worker_server::Worker;
use tether_proto::worker::v1::{
    FetchStateRequest, FetchStateResponse, ListModelsRequest, ListModelsResponse, ReleaseConnectionRequest,
    ReleaseConnectionResponse, ReplicateRequest, ReplicateResponse, ResponseBody, ResponseRef, TurnEvent, TurnRequest,
    response_body,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::context::WorkerContext;
use crate::error::WorkerError;
use crate::pipeline::run_turn;
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

fn not_found(id: &str) -> ResponseBody {
    ResponseBody { kind: Some(response_body::Kind::Error(WorkerError::ResponseNotFound(id.to_owned()).api_error())) }
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
        tokio::spawn(run_turn(self.ctx.clone(), turn, tx).instrument(span));
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
}
