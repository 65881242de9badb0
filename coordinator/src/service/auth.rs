//! Who may call the coordinator. `JobService` calls carry the API token as
//! `authorization: Bearer <token>` metadata (checked by the [`TokenGate`] interceptor in front
//! of the service); a worker puts the join token in `RegisterWorkerRequest.join_token` and as
//! bearer metadata on its `Session`. A missing or wrong token is refused with
//! `unauthenticated`, saying which token is expected and never echoing one; `grpc.health`
//! stays open. Tokens are compared in constant time ([`ExpectedToken`]).

use spin_common::auth::{bearer_token, ExpectedToken, Refused, Token};
use tonic::metadata::MetadataMap;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::config::CoordinatorConfig;
use crate::error::ServiceError;

/// Which of the coordinator's tokens a gate expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// `api_token`, for `spinctl`.
    Api,
    /// `join_token`, for workers.
    Join,
}

impl TokenKind {
    fn name(self) -> &'static str {
        match self {
            Self::Api => "API token",
            Self::Join => "join token",
        }
    }

    /// Where the caller sets it.
    fn hint(self) -> &'static str {
        match self {
            Self::Api => "spinctl --token or SPIN_TOKEN",
            Self::Join => "spin-worker --join-token or SPIN_JOIN_TOKEN",
        }
    }
}

/// Checks one of the coordinator's tokens; as an interceptor, on every call's metadata.
#[derive(Clone, Debug)]
pub struct TokenGate {
    kind: TokenKind,
    expected: ExpectedToken,
}

impl TokenGate {
    /// A gate for `token` (one that is empty lets everything through).
    pub fn new(kind: TokenKind, token: &Token) -> Self {
        Self {
            kind,
            expected: ExpectedToken::new(token),
        }
    }

    /// The gate for `config.api_token`.
    pub fn api(config: &CoordinatorConfig) -> Self {
        Self::new(TokenKind::Api, &config.api_token)
    }

    /// The gate for `config.join_token`.
    pub fn join(config: &CoordinatorConfig) -> Self {
        Self::new(TokenKind::Join, &config.join_token)
    }

    /// Whether a token is required at all.
    pub fn is_required(&self) -> bool {
        self.expected.is_required()
    }

    /// Checks the `authorization: Bearer` metadata of a `call` (e.g. `Session`).
    pub fn check_metadata(&self, call: &str, metadata: &MetadataMap) -> Result<(), ServiceError> {
        self.expected
            .check(bearer_token(metadata))
            .map_err(|refused| {
                let (name, hint) = (self.kind.name(), self.kind.hint());
                ServiceError::Unauthenticated(match refused {
                    Refused::Missing => format!(
                        "{call} needs the coordinator's {name} as `authorization: Bearer` \
                         metadata and none was sent (set it with {hint})"
                    ),
                    Refused::Wrong => format!(
                        "{call}: the bearer token sent is not the coordinator's {name} \
                         (check {hint})"
                    ),
                })
            })
    }

    /// Checks a token sent in a request `field` (e.g. `RegisterWorkerRequest.join_token`).
    pub fn check_field(&self, field: &str, value: &str) -> Result<(), ServiceError> {
        self.expected.check(Some(value)).map_err(|refused| {
            let (name, hint) = (self.kind.name(), self.kind.hint());
            ServiceError::Unauthenticated(match refused {
                Refused::Missing => format!(
                    "{field} is empty but the coordinator requires its {name} (set it with {hint})"
                ),
                Refused::Wrong => {
                    format!("{field} is not the coordinator's {name} (check {hint})")
                }
            })
        })
    }
}

impl Interceptor for TokenGate {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let call = match self.kind {
            TokenKind::Api => "JobService",
            TokenKind::Join => "ControlService",
        };
        self.check_metadata(call, request.metadata())?;
        Ok(request)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use spin_common::auth::Bearer;
    use tonic::Code;

    use super::*;

    fn call(gate: &mut TokenGate, token: &str) -> Result<(), Status> {
        let mut request = Request::new(());
        Bearer::new("token", &token.into())
            .unwrap()
            .apply(&mut request);
        gate.call(request).map(|_| ())
    }

    #[test]
    fn refusals_name_the_token_and_never_echo_one() {
        let mut gate = TokenGate::new(TokenKind::Api, &"right-token".into());
        assert!(call(&mut gate, "right-token").is_ok());
        for (sent, says) in [("", "none was sent"), ("wrong-token", "not the")] {
            let status = call(&mut gate, sent).unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated);
            let message = status.message();
            assert!(
                message.contains("API token") && message.contains(says),
                "{message}"
            );
            assert!(message.contains("--token"), "{message}");
            assert!(!message.contains("right-token") && !message.contains("wrong-token"));
        }
        let join = TokenGate::new(TokenKind::Join, &"j".into());
        let err = join
            .check_field("RegisterWorkerRequest.join_token", "x")
            .unwrap_err();
        let status = Status::from(err);
        assert_eq!(status.code(), Code::Unauthenticated);
        assert!(status.message().contains("join token"), "{status:?}");
        assert!(join.check_field("f", "j").is_ok());
    }

    #[test]
    fn an_empty_token_lets_everything_through() {
        let mut gate = TokenGate::new(TokenKind::Api, &Token::default());
        assert!(!gate.is_required());
        assert!(call(&mut gate, "").is_ok());
        assert!(call(&mut gate, "whatever").is_ok());
    }
}
