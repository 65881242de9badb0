//! The one error enum of the coordinator's domain operations, and its mapping to gRPC status
//! codes: the only place a `tonic::Status` is made from a domain error.

use spin_common::ids::{JobId, WorkerId};
use spin_common::proto::ProtoError;
use tonic::Status;

use crate::journal::JournalError;
use crate::membership::MembershipError;
use crate::state::TransitionError;

/// Why a coordinator operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A request field is malformed; names the field.
    #[error("field `{field}`: {reason}")]
    InvalidArgument {
        /// `Message.field`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A wire message did not convert.
    #[error(transparent)]
    Proto(#[from] ProtoError),
    /// No such job.
    #[error("job {0} is not known")]
    UnknownJob(JobId),
    /// No such worker (never registered, or already lost).
    #[error("worker {0} is not registered (never joined, or was declared lost)")]
    UnknownWorker(WorkerId),
    /// A session broke its protocol (e.g. did not start with `hello`).
    #[error("session: {0}")]
    Protocol(String),
    /// The journal failed or refused.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The coordinator is shutting down.
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    /// A bug or a lost internal task.
    #[error("internal: {0}")]
    Internal(String),
    /// A token is missing or wrong; says which token is expected, never the token.
    #[error("{0}")]
    Unauthenticated(String),
}

impl From<MembershipError> for ServiceError {
    fn from(err: MembershipError) -> Self {
        match err {
            MembershipError::Unknown(id) => Self::UnknownWorker(id),
            MembershipError::AlreadyRegistered(id) => {
                Self::Internal(format!("worker id {id} was issued twice"))
            }
        }
    }
}

/// The longest status message sent (the client's whole header block is 16 KiB by default).
const MAX_MESSAGE_BYTES: usize = 2048;

impl From<ServiceError> for Status {
    fn from(err: ServiceError) -> Self {
        // gRPC carries the message in a header: a message echoing a huge input must not
        // outgrow the client's header limit and turn into a dropped connection.
        let mut message = err.to_string();
        if message.len() > MAX_MESSAGE_BYTES {
            let mut end = MAX_MESSAGE_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            let total = message.len();
            message.truncate(end);
            message.push_str(&format!("... ({total} bytes in all)"));
        }
        match err {
            ServiceError::InvalidArgument { .. } | ServiceError::Proto(_) => {
                Status::invalid_argument(message)
            }
            ServiceError::UnknownJob(_) | ServiceError::UnknownWorker(_) => {
                Status::not_found(message)
            }
            ServiceError::Protocol(_) => Status::failed_precondition(message),
            ServiceError::Journal(JournalError::UnknownJob(_)) => Status::not_found(message),
            ServiceError::Journal(JournalError::Duplicate(_)) => Status::already_exists(message),
            ServiceError::Journal(JournalError::Transition { source, .. }) => match source {
                TransitionError::Finished { .. }
                | TransitionError::Illegal { .. }
                | TransitionError::WrongIteration { .. } => Status::failed_precondition(message),
            },
            ServiceError::Journal(_) | ServiceError::Internal(_) => Status::internal(message),
            ServiceError::ShuttingDown => Status::unavailable(message),
            ServiceError::Unauthenticated(_) => Status::unauthenticated(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_maps_to_its_code_and_keeps_the_field() {
        let status = Status::from(ServiceError::InvalidArgument {
            field: "GetJobRequest.job_id",
            reason: "is empty".into(),
        });
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("GetJobRequest.job_id"));
        let id = JobId::new();
        assert_eq!(
            Status::from(ServiceError::UnknownJob(id)).code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            Status::from(ServiceError::ShuttingDown).code(),
            tonic::Code::Unavailable
        );
    }
}
