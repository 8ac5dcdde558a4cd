//! Worker errors, classified once, and their Responses API error shape.

use tether_common::ErrorClass;
use tether_proto::worker::v1::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{message}")]
    InvalidRequest { param: String, message: String, code: Option<&'static str> },
    #[error("Previous response with id '{0}' not found.")]
    PreviousResponseNotFound(String),
    #[error("Response with id '{0}' not found.")]
    ResponseNotFound(String),
    #[error("Cannot cancel a response with status '{status}': only a response in progress can be cancelled.")]
    NotCancellable { status: String },
    #[error("The model '{0}' does not exist or you do not have access to it.")]
    ModelNotFound(String),
    #[error("The input was flagged by the safety classifier (category: {0}).")]
    Flagged(String),
    #[error("{0}")]
    RateLimited(String),
    /// The model opened a function call and then wrote something that is not one.
    #[error("The model wrote a malformed function call. Retry the request.")]
    MalformedToolCall,
    #[error("no shard is available")]
    NoShard,
    #[error("shard failed: {0}")]
    Shard(tonic::Status),
    #[error("worker is not serving (draining or fenced)")]
    NotServing,
    #[error("registration failed: {0}")]
    Discovery(#[from] tether_common::discovery::DiscoveryError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("shutdown deadline exceeded")]
    ShutdownDeadline,
}

impl WorkerError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        WorkerError::InvalidRequest { param: param.into(), message: message.into(), code: None }
    }

    pub fn invalid_with_code(param: impl Into<String>, message: impl Into<String>, code: &'static str) -> Self {
        WorkerError::InvalidRequest { param: param.into(), message: message.into(), code: Some(code) }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            WorkerError::InvalidRequest { .. }
            | WorkerError::PreviousResponseNotFound(_)
            | WorkerError::ModelNotFound(_)
            | WorkerError::NotCancellable { .. }
            | WorkerError::Flagged(_) => ErrorClass::InvalidRequest,
            WorkerError::ResponseNotFound(_) => ErrorClass::NotFound,
            WorkerError::RateLimited(_) => ErrorClass::Overloaded,
            WorkerError::NoShard => ErrorClass::ShardUnavailable,
            WorkerError::Shard(status) => match ErrorClass::from_status(status) {
                ErrorClass::Unavailable => ErrorClass::ShardUnavailable,
                class => class,
            },
            WorkerError::NotServing | WorkerError::Discovery(_) => ErrorClass::Unavailable,
            WorkerError::Io(_) | WorkerError::ShutdownDeadline | WorkerError::MalformedToolCall => ErrorClass::Internal,
        }
    }

    /// The error in the protocol's shape (status, type, code, message, param).
    pub fn api_error(&self) -> ApiError {
        let class = self.class();
        let (kind, code, param) = match self {
            WorkerError::InvalidRequest { param, code, .. } => {
                ("invalid_request_error", code.unwrap_or("invalid_request"), param.as_str())
            }
            WorkerError::PreviousResponseNotFound(_) => {
                ("invalid_request_error", "previous_response_not_found", "previous_response_id")
            }
            WorkerError::ResponseNotFound(_) => ("invalid_request_error", "not_found", ""),
            WorkerError::ModelNotFound(_) => ("invalid_request_error", "model_not_found", "model"),
            WorkerError::NotCancellable { .. } => ("invalid_request_error", "response_not_cancellable", ""),
            WorkerError::Flagged(_) => ("invalid_request_error", "invalid_prompt", "input"),
            // A shard refused the job itself (e.g. a prompt past its window that the worker
            // could not check yet): the client's request, in the protocol's shape.
            WorkerError::Shard(_) if class == ErrorClass::InvalidRequest => {
                ("invalid_request_error", "invalid_request", "")
            }
            _ if class == ErrorClass::Overloaded => ("rate_limit_error", "rate_limit_exceeded", ""),
            _ => ("server_error", "server_error", ""),
        };
        // Internal failures keep their detail in the logs, not in the client's message.
        let message = match class {
            // The model's fault, not the server's internals: say what happened.
            _ if matches!(self, WorkerError::MalformedToolCall) => self.to_string(),
            ErrorClass::Internal => "The server had an error while processing your request.".to_owned(),
            ErrorClass::ShardUnavailable | ErrorClass::Unavailable => {
                "The model backend is unavailable. Retry the request.".to_owned()
            }
            _ => self.to_string(),
        };
        ApiError {
            status: u32::from(class.http_status().as_u16()),
            r#type: kind.to_owned(),
            code: code.to_owned(),
            message,
            param: param.to_owned(),
        }
    }
}

impl From<WorkerError> for tonic::Status {
    fn from(error: WorkerError) -> Self {
        tonic::Status::new(error.class().grpc_code(), error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::WorkerError;

    #[test]
    fn a_request_the_shard_refused_is_an_invalid_request_error() {
        let error = WorkerError::Shard(tonic::Status::invalid_argument("the prompt needs 9 tokens of context"));
        let api = error.api_error();
        assert_eq!(
            (api.status, api.r#type.as_str(), api.code.as_str()),
            (400, "invalid_request_error", "invalid_request")
        );
        let failed = WorkerError::Shard(tonic::Status::internal("bug")).api_error();
        assert_eq!((failed.status, failed.r#type.as_str()), (500, "server_error"));
    }
}
