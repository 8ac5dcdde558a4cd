//! The closed error classification of tether.
//!
//! A failure is classified once, where it happens; retry, migration and the status a client
//! sees are decided on the class, never on message text. This is the single mapping from a
//! class to gRPC and HTTP codes.

use http::StatusCode;
use tonic::Code;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The client's request is malformed or violates a rule.
    InvalidRequest,
    /// The named thing does not exist (or belongs to another tenant).
    NotFound,
    /// No or a wrong credential.
    Unauthenticated,
    /// A worker could not be reached or has no membership.
    Unavailable,
    /// No shard could serve the turn.
    ShardUnavailable,
    /// A peer went away in the middle of a stream.
    Disconnected,
    DeadlineExceeded,
    /// Admission control refused the work.
    Overloaded,
    Cancelled,
    Internal,
}

impl ErrorClass {
    pub fn grpc_code(self) -> Code {
        match self {
            ErrorClass::InvalidRequest => Code::InvalidArgument,
            ErrorClass::NotFound => Code::NotFound,
            ErrorClass::Unauthenticated => Code::Unauthenticated,
            ErrorClass::Unavailable | ErrorClass::ShardUnavailable => Code::Unavailable,
            ErrorClass::Disconnected => Code::Aborted,
            ErrorClass::DeadlineExceeded => Code::DeadlineExceeded,
            ErrorClass::Overloaded => Code::ResourceExhausted,
            ErrorClass::Cancelled => Code::Cancelled,
            ErrorClass::Internal => Code::Internal,
        }
    }

    pub fn http_status(self) -> StatusCode {
        match self {
            ErrorClass::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorClass::NotFound => StatusCode::NOT_FOUND,
            ErrorClass::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorClass::Unavailable | ErrorClass::ShardUnavailable | ErrorClass::Disconnected => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorClass::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            ErrorClass::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            ErrorClass::Cancelled => StatusCode::from_u16(499).expect("valid status"),
            ErrorClass::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Classifies a gRPC status received from a peer.
    pub fn from_grpc(code: Code) -> Self {
        match code {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => ErrorClass::InvalidRequest,
            Code::NotFound => ErrorClass::NotFound,
            Code::Unauthenticated | Code::PermissionDenied => ErrorClass::Unauthenticated,
            Code::Unavailable => ErrorClass::Unavailable,
            Code::Aborted => ErrorClass::Disconnected,
            Code::DeadlineExceeded => ErrorClass::DeadlineExceeded,
            Code::ResourceExhausted => ErrorClass::Overloaded,
            Code::Cancelled => ErrorClass::Cancelled,
            _ => ErrorClass::Internal,
        }
    }

    /// Classifies a status received from a peer. tether's services never answer `Unknown`:
    /// tonic reports a call that failed in the transport (a connection reset by a crashed
    /// peer, an HTTP/2 stream error) with it, so it is `Disconnected`, which another node may
    /// retry. So is any status tonic built locally from a transport error rather than decoded
    /// from the peer's answer (such a status carries that error as its source): a stream
    /// refused by a GOAWAY (a peer shutting down gracefully says `NO_ERROR`, which tonic
    /// reports as `Internal`), or a request hyper cancelled because the connection closed
    /// (reported as `Cancelled`).
    pub fn from_status(status: &tonic::Status) -> Self {
        if made_by_transport(status) {
            return ErrorClass::Disconnected;
        }
        match status.code() {
            Code::Unknown => ErrorClass::Disconnected,
            code => Self::from_grpc(code),
        }
    }

    /// Whether a turn that failed with this class before emitting anything may be retried
    /// on another node (the request never reached an engine or the peer vanished).
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorClass::Unavailable | ErrorClass::ShardUnavailable | ErrorClass::Disconnected)
    }

    /// A stable label for metrics.
    pub fn as_label(self) -> &'static str {
        match self {
            ErrorClass::InvalidRequest => "invalid_request",
            ErrorClass::NotFound => "not_found",
            ErrorClass::Unauthenticated => "unauthenticated",
            ErrorClass::Unavailable => "unavailable",
            ErrorClass::ShardUnavailable => "shard_unavailable",
            ErrorClass::Disconnected => "disconnected",
            ErrorClass::DeadlineExceeded => "deadline_exceeded",
            ErrorClass::Overloaded => "overloaded",
            ErrorClass::Cancelled => "cancelled",
            ErrorClass::Internal => "internal",
        }
    }
}

/// Whether tonic made `status` itself from a transport error (it keeps that error as the
/// status's source); a status decoded from a peer's answer has no source.
fn made_by_transport(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
}

#[cfg(test)]
mod tests {
    use super::ErrorClass;

    #[test]
    fn grpc_round_trip_keeps_the_class() {
        for class in [
            ErrorClass::InvalidRequest,
            ErrorClass::NotFound,
            ErrorClass::Unauthenticated,
            ErrorClass::Unavailable,
            ErrorClass::DeadlineExceeded,
            ErrorClass::Overloaded,
            ErrorClass::Cancelled,
            ErrorClass::Internal,
        ] {
            assert_eq!(ErrorClass::from_grpc(class.grpc_code()), class);
        }
    }

    #[test]
    fn http2_failures_are_disconnects_and_peer_statuses_keep_their_code() {
        // A stream refused by a graceful GOAWAY: tonic says Internal, the peer never saw it.
        for reason in [h2::Reason::NO_ERROR, h2::Reason::CANCEL, h2::Reason::INTERNAL_ERROR] {
            let status = tonic::Status::from_error(Box::new(h2::Error::from(reason)));
            assert_ne!(status.code(), tonic::Code::Unavailable);
            assert_eq!(ErrorClass::from_status(&status), ErrorClass::Disconnected, "{reason:?}");
            assert!(ErrorClass::from_status(&status).is_retryable());
        }
        // A connection hyper gave up on (no HTTP/2 error in the chain) is a disconnect too.
        let closed = tonic::Status::from_error(Box::new(std::io::Error::other("connection closed")));
        assert_eq!(ErrorClass::from_status(&closed), ErrorClass::Disconnected);
        // The same codes sent by a peer are what they say.
        assert_eq!(ErrorClass::from_status(&tonic::Status::internal("bug")), ErrorClass::Internal);
        assert_eq!(ErrorClass::from_status(&tonic::Status::cancelled("gone")), ErrorClass::Cancelled);
        assert_eq!(ErrorClass::from_status(&tonic::Status::unknown("reset")), ErrorClass::Disconnected);
    }
}
