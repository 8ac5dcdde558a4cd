//! The gRPC implementation of [`ShardApi`]: a lazily connected, persistent HTTP/2 channel.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tether_common::discovery::BoxFuture;
use tether_common::link::Link;
use tether_common::tls::Tls;
use tether_proto::shard::v1::shard_client::ShardClient;
use tether_proto::shard::v1::{GenerateRequest, InfoRequest, InfoResponse};
use tonic::Status;

use super::{ChunkStream, ShardApi};

pub struct GrpcShard {
    client: ShardClient<Link>,
    described: Arc<RwLock<Described>>,
}

/// What the shard's last `Info` said about its model.
#[derive(Default)]
struct Described {
    models: Vec<String>,
    context_window: u32,
    structured_outputs: bool,
}

impl Described {
    fn update(lock: &RwLock<Described>, info: InfoResponse) {
        *lock.write() = Described {
            models: info.models,
            context_window: info.context_window,
            structured_outputs: info.structured_outputs,
        };
    }
}

impl GrpcShard {
    /// Creates the channel (connected on first use) and asks the shard for its models;
    /// `None` if `addr` is not a URL of the plane's scheme.
    pub fn connect(id: &str, addr: &str, tls: Option<&Tls>) -> Option<Self> {
        let channel = tether_common::link::connect(addr, tls)?;
        let client = ShardClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
        let described = Arc::new(RwLock::new(Described::default()));
        let (mut info_client, info_described, id) = (client.clone(), described.clone(), id.to_owned());
        tokio::spawn(async move {
            // A shard that just registered may still be starting: retry with backoff.
            for attempt in 0..50u32 {
                match info_client.info(InfoRequest {}).await {
                    Ok(info) => {
                        Described::update(&info_described, info.into_inner());
                        return;
                    }
                    Err(status) => {
                        tracing::debug!(shard = %id, attempt, code = ?status.code(), "shard info failed");
                        tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt.min(10) + 1))).await;
                    }
                }
            }
        });
        Some(GrpcShard { client, described })
    }
}

impl ShardApi for GrpcShard {
    fn generate(&self, request: GenerateRequest) -> BoxFuture<'_, Result<ChunkStream, Status>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let stream = client.generate(tether_common::trace::request(request)).await?.into_inner();
            Ok(Box::pin(stream) as ChunkStream)
        })
    }

    fn models(&self) -> Vec<String> {
        self.described.read().models.clone()
    }

    fn context_window(&self) -> u32 {
        self.described.read().context_window
    }

    fn structured_outputs(&self) -> bool {
        self.described.read().structured_outputs
    }

    fn probe(&self) -> BoxFuture<'static, bool> {
        let mut client = self.client.clone();
        let described = self.described.clone();
        Box::pin(async move {
            match tokio::time::timeout(Duration::from_millis(500), client.info(InfoRequest {})).await {
                Ok(Ok(info)) => {
                    Described::update(&described, info.into_inner());
                    true
                }
                _ => false,
            }
        })
    }
}
