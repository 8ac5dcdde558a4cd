//! Shard errors, classified once.

use tether_common::ErrorClass;

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("model {0:?} is not served by this shard")]
    UnknownModel(String),
    #[error("forced function {0:?} is not among the request's tools")]
    UnknownFunction(String),
    #[error("invalid tool definitions: {0}")]
    InvalidTools(String),
    #[error("the {0} engine cannot constrain its output to JSON (text.format)")]
    OutputFormatUnsupported(&'static str),
    #[error("text.format's JSON schema is not valid: {0}")]
    InvalidSchema(String),
    #[error("shard is not serving (draining or fenced)")]
    NotServing,
    #[error("the prompt needs {needed} tokens of context; the engine holds {capacity}")]
    ContextExceeded { needed: u32, capacity: u32 },
    /// The engine no longer holds the session's cached prefix (evicted after the lookup):
    /// answered as a cache miss, so the worker resends the whole prompt.
    #[error("the session's cached prefix was evicted")]
    SequenceLost,
    /// An imported session's state does not fit this shard (another model or engine kind, or
    /// a state the engine could not load).
    #[error("session state not importable: {0}")]
    IncompatibleState(String),
    #[error("engine: {0}")]
    Engine(String),
    /// The engine server cannot be reached (refused, reset before answering, or failing its
    /// health checks): another shard may serve the turn.
    #[error("engine unavailable: {0}")]
    EngineUnavailable(String),
    /// The engine server refused the work for load (HTTP 429): its own queue is full.
    #[error("engine overloaded: {0}")]
    EngineOverloaded(String),
    /// The engine server refused the request as invalid (HTTP 400/404/422).
    #[error("engine refused the request: {0}")]
    EngineRejected(String),
    /// The engine server did not answer in time (`{0}` names the deadline).
    #[error("engine timed out: {0}")]
    EngineTimeout(&'static str),
    /// The engine's stream broke after it had started.
    #[error("engine stream broken: {0}")]
    EngineDisconnected(String),
    #[error("registration failed: {0}")]
    Discovery(#[from] tether_common::discovery::DiscoveryError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("shutdown deadline exceeded")]
    ShutdownDeadline,
}

impl ShardError {
    pub fn class(&self) -> ErrorClass {
        match self {
            ShardError::UnknownModel(_) | ShardError::UnknownFunction(_) | ShardError::InvalidTools(_) => {
                ErrorClass::InvalidRequest
            }
            ShardError::ContextExceeded { .. }
            | ShardError::OutputFormatUnsupported(_)
            | ShardError::InvalidSchema(_) => ErrorClass::InvalidRequest,
            ShardError::IncompatibleState(_) => ErrorClass::InvalidRequest,
            ShardError::NotServing | ShardError::SequenceLost => ErrorClass::Unavailable,
            ShardError::Engine(_) => ErrorClass::Internal,
            ShardError::EngineUnavailable(_) => ErrorClass::Unavailable,
            ShardError::EngineOverloaded(_) => ErrorClass::Overloaded,
            ShardError::EngineRejected(_) => ErrorClass::InvalidRequest,
            ShardError::EngineTimeout(_) => ErrorClass::DeadlineExceeded,
            ShardError::EngineDisconnected(_) => ErrorClass::Disconnected,
            ShardError::Discovery(_) => ErrorClass::Unavailable,
            ShardError::Io(_) | ShardError::ShutdownDeadline => ErrorClass::Internal,
        }
    }
}

impl From<ShardError> for tonic::Status {
    fn from(error: ShardError) -> Self {
        tonic::Status::new(error.class().grpc_code(), error.to_string())
    }
}

#[cfg(feature = "llama")]
impl From<tether_vocabulary::VocabularyError> for ShardError {
    fn from(error: tether_vocabulary::VocabularyError) -> Self {
        ShardError::Engine(error.to_string())
    }
}
