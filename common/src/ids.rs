//! Typed ids: `JobId` and `WorkerId` are newtypes over `Uuid`; they are strings only on the wire.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a string is not an id.
#[derive(Debug, thiserror::Error)]
#[error("invalid {kind} {value:?}: {source}")]
pub struct IdError {
    /// What the id names ("job id", "worker id").
    pub kind: &'static str,
    /// The text given.
    pub value: String,
    /// The parser's reason.
    #[source]
    pub source: uuid::Error,
}

/// `s` as it is if short, else its first 64 characters and its length: errors echo what was
/// given, and a huge value must not make a huge error (gRPC carries it in a header).
pub fn shorten(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        return s.to_string();
    }
    let head: String = s.chars().take(MAX).collect();
    format!("{head}... ({} bytes)", s.len())
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh random id.
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }

            /// The id's sixteen bytes (big-endian), e.g. as a database key.
            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }

            /// The id with these sixteen bytes.
            pub fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(Uuid::from_bytes(bytes))
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(s: &str) -> Result<Self, IdError> {
                Uuid::parse_str(s).map(Self).map_err(|source| IdError {
                    kind: $kind,
                    value: shorten(s),
                    source,
                })
            }
        }
    };
}

uuid_id!(
    /// Names one job for its whole life, across coordinator restarts.
    JobId,
    "job id"
);
uuid_id!(
    /// Names one registered worker; a worker that re-registers gets a new id.
    WorkerId,
    "worker id"
);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text_and_bytes() {
        let id = JobId::new();
        assert_eq!(id.to_string().parse::<JobId>().unwrap(), id);
        assert_eq!(JobId::from_bytes(*id.as_bytes()), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
    }

    #[test]
    fn a_bad_id_names_its_kind_and_text() {
        let err = "nope".parse::<WorkerId>().unwrap_err();
        let message = err.to_string();
        assert!(message.contains("worker id"), "{message}");
        assert!(message.contains("\"nope\""), "{message}");
    }
}
