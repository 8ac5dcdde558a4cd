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
