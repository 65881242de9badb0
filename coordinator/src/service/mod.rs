//! The tonic services: thin adapters that extract a request, convert it, call the
//! [`Coordinator`](crate::coordinator::Coordinator) and map its [`ServiceError`] to a status.
//! [`auth`] checks the tokens.

pub mod auth;
pub mod control;
pub mod job;

use crate::error::ServiceError;

/// Runs `f` (which may write the journal) on the blocking pool, off the async runtime.
async fn blocking<T, F>(f: F) -> Result<T, ServiceError>
where
    F: FnOnce() -> Result<T, ServiceError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServiceError::Internal(format!("blocking task: {e}")))?
}

/// Refuses an empty required string field, naming it.
fn non_empty<'a>(field: &'static str, value: &'a str) -> Result<&'a str, ServiceError> {
    if value.trim().is_empty() {
        Err(ServiceError::InvalidArgument {
            field,
            reason: "is empty".into(),
        })
    } else {
        Ok(value)
    }
}
