//! Bearer tokens on gRPC calls: a client adds `authorization: Bearer <token>` to its requests
//! ([`Bearer`]); a server compares what arrives with the token it expects, in constant time
//! ([`ExpectedToken`]). [`Token`] holds a token without ever printing it.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The metadata key that carries the token.
pub const AUTHORIZATION: &str = "authorization";

/// The scheme in front of the token (compared case-insensitively, as RFC 7235 asks).
const SCHEME: &str = "Bearer";

/// A secret token (an API or join token); empty means none. `Debug` never shows it.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Token(String);

impl Token {
    /// The token itself, to send or compare.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether no token is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Refuses a token that cannot travel in a gRPC header: only visible ASCII, no spaces.
    /// `what` names the setting in the error.
    pub fn check(&self, what: &'static str) -> Result<(), TokenError> {
        if self.0.bytes().all(|b| b.is_ascii_graphic()) {
            Ok(())
        } else {
            Err(TokenError::Invalid { what })
        }
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "Token(none)"
        } else {
            "Token(<redacted>)"
        })
    }
}

impl Token {
    /// A fresh random secret (128 bits from the thread's CSPRNG, as hex), e.g. a ring's.
    pub fn random() -> Self {
        Self(hex::encode(rand::random::<[u8; 16]>()))
    }
}

impl From<&str> for Token {
    fn from(token: &str) -> Self {
        Self(token.to_owned())
    }
}

impl From<String> for Token {
    fn from(token: String) -> Self {
        Self(token)
    }
}

/// Why a token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// It has characters a header cannot carry.
    #[error("{what}: a token must be visible ASCII characters without spaces (it travels in a gRPC header)")]
    Invalid {
        /// The setting that holds it.
        what: &'static str,
    },
}

/// A client interceptor that adds `authorization: Bearer <token>` to every request, or
/// nothing when the token is empty.
#[derive(Clone, Default)]
pub struct Bearer {
    value: Option<AsciiMetadataValue>,
}

impl Bearer {
    /// Sends `token`; `what` names the setting in the error for a token a header cannot carry.
    pub fn new(what: &'static str, token: &Token) -> Result<Self, TokenError> {
        if token.is_empty() {
            return Ok(Self::default());
        }
        token.check(what)?;
        let value = format!("{SCHEME} {}", token.expose())
            .parse()
            .map_err(|_| TokenError::Invalid { what })?;
        Ok(Self { value: Some(value) })
    }

    /// Adds the token to `request`'s metadata.
    pub fn apply<T>(&self, request: &mut Request<T>) {
        if let Some(value) = &self.value {
            request.metadata_mut().insert(AUTHORIZATION, value.clone());
        }
    }
}

impl fmt::Debug for Bearer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.value.is_some() {
            "Bearer(<redacted>)"
        } else {
            "Bearer(none)"
        })
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        self.apply(&mut request);
        Ok(request)
    }
}

/// Why a presented token was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// None was presented.
    Missing,
    /// One was presented and it is not the expected one.
    Wrong,
}

/// The token a server expects, kept as its SHA-256 digest: comparing two digests takes the
/// same time whatever was sent, including its length. An empty token requires nothing.
#[derive(Clone)]
pub struct ExpectedToken {
    digest: Option<[u8; 32]>,
}

impl ExpectedToken {
    /// Expects `token` (nothing when it is empty).
    pub fn new(token: &Token) -> Self {
        let digest = (!token.is_empty()).then(|| digest(token.expose()));
        Self { digest }
    }

    /// Whether callers must present a token.
    pub fn is_required(&self) -> bool {
        self.digest.is_some()
    }

    /// Checks a presented token (`None` or empty: none presented).
    pub fn check(&self, presented: Option<&str>) -> Result<(), Refused> {
        let Some(expected) = &self.digest else {
            return Ok(());
        };
        let presented = presented
            .filter(|t| !t.is_empty())
            .ok_or(Refused::Missing)?;
        if bool::from(digest(presented).ct_eq(expected)) {
            Ok(())
        } else {
            Err(Refused::Wrong)
        }
    }

    /// Checks the bearer token of `metadata` (see [`bearer_token`]).
    pub fn check_metadata(&self, metadata: &MetadataMap) -> Result<(), Refused> {
        self.check(bearer_token(metadata))
    }
}

impl fmt::Debug for ExpectedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExpectedToken")
            .field("required", &self.is_required())
            .finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The token of the `authorization: Bearer <token>` entry of `metadata`, if there is one.
pub fn bearer_token(metadata: &MetadataMap) -> Option<&str> {
    let value = metadata.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case(SCHEME)
        .then(|| token.trim_start())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sent(token: &str) -> MetadataMap {
        let mut request = Request::new(());
        Bearer::new("token", &token.into())
            .unwrap()
            .apply(&mut request);
        request.metadata().clone()
    }

    #[test]
    fn the_token_sent_is_the_token_checked() {
        let expected = ExpectedToken::new(&"s3cret".into());
        assert!(expected.is_required());
        assert_eq!(expected.check_metadata(&sent("s3cret")), Ok(()));
        assert_eq!(
            expected.check_metadata(&sent("s3cret-not")),
            Err(Refused::Wrong)
        );
        assert_eq!(
            expected.check_metadata(&MetadataMap::new()),
            Err(Refused::Missing)
        );
        // An empty token sends nothing.
        assert_eq!(expected.check_metadata(&sent("")), Err(Refused::Missing));
        let open = ExpectedToken::new(&Token::default());
        assert!(!open.is_required());
        assert_eq!(open.check_metadata(&MetadataMap::new()), Ok(()));
        assert_eq!(open.check_metadata(&sent("anything")), Ok(()));
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_others_do_not_count() {
        let mut metadata = MetadataMap::new();
        metadata.insert(AUTHORIZATION, "bearer  abc".parse().unwrap());
        assert_eq!(bearer_token(&metadata), Some("abc"));
        metadata.insert(AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&metadata), None);
        metadata.insert(AUTHORIZATION, "abc".parse().unwrap());
        assert_eq!(bearer_token(&metadata), None);
    }

    #[test]
    fn tokens_never_print_and_must_fit_a_header() {
        let token = Token::from("s3cret");
        assert!(!format!("{token:?}").contains("s3cret"));
        let bearer = Bearer::new("token", &token).unwrap();
        assert!(!format!("{bearer:?}").contains("s3cret"));
        let err = Bearer::new("--token", &"two words".into()).unwrap_err();
        assert!(err.to_string().contains("--token"), "{err}");
        assert!(Token::from("é").check("x").is_err());
        assert!(Token::default().check("x").is_ok());
    }
}
