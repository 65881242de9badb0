//! The coordinator's settings: read from a TOML file with unknown fields refused, then layered
//! with `SPIN_COORDINATOR__*` entries of an environment map the caller passes in.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use spin_common::auth::Token;

/// Everything a coordinator process is told.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// The `redb` journal file (created if absent).
    pub journal_path: PathBuf,
    /// A worker silent for longer than this is lost.
    #[serde(rename = "heartbeat_timeout_ms", with = "millis")]
    pub heartbeat_timeout: Duration,
    /// A shard task's deadline: how long it may go without reporting progress (from its grant
    /// or its last progress report) before the shard is handed to another worker and its
    /// worker is dropped. Heartbeats do not extend it.
    #[serde(rename = "lease_duration_ms", with = "millis")]
    pub lease_duration: Duration,
    /// How often the coordinator sweeps lost workers and expired leases.
    #[serde(rename = "tick_interval_ms", with = "millis")]
    pub tick_interval: Duration,
    /// Messages buffered per worker session before the worker counts as stuck.
    pub session_buffer: usize,
    /// Events buffered per watcher stream.
    pub watch_buffer: usize,
    /// Events kept per job for watchers that join late or lag.
    pub event_history: usize,
    /// The object store: a directory (or `file://` URL) the coordinator and every worker see;
    /// job `j` keeps its artifacts under `jobs/j` in it.
    pub store: String,
    /// Open worker sessions a pending job waits for before it starts.
    pub min_workers: usize,
    /// The bearer token every `JobService` call must carry (`spinctl --token`); empty: none.
    pub api_token: Token,
    /// The token workers present to register and open their session; empty: none.
    pub join_token: Token,
    /// The coordinator's TLS certificate chain (PEM). With `tls_key`, every port is TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls_cert` (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// A CA certificate (PEM): when set, every client (workers and `spinctl` alike) must
    /// present a certificate it signed (mutual TLS). Needs `tls_cert` and `tls_key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca: Option<PathBuf>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            journal_path: PathBuf::from("spin-journal.redb"),
            heartbeat_timeout: Duration::from_secs(15),
            lease_duration: Duration::from_secs(120),
            tick_interval: Duration::from_millis(500),
            session_buffer: 64,
            watch_buffer: 64,
            event_history: 4096,
            store: "spin-store".to_string(),
            min_workers: 1,
            api_token: Token::default(),
            join_token: Token::default(),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
        }
    }
}

/// Why the settings were refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed (an unknown field is named).
    #[error("coordinator config {path}: {message}")]
    Parse {
        /// The file, or `<env>` for the environment layer.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A value is out of range.
    #[error("coordinator config field `{field}`: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is allowed.
        reason: &'static str,
    },
}

impl CoordinatorConfig {
    /// Reads `path` (if given) over the defaults, then `SPIN_COORDINATOR__FIELD=value` entries
    /// of `env`, and checks the ranges.
    pub fn load(path: Option<&Path>, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let err = |path: &Path, message: String| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let mut builder = config::Config::builder();
        if let Some(path) = path {
            let text = std::fs::read_to_string(path).map_err(|e| err(path, e.to_string()))?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        let env_path = Path::new("<env>");
        for (key, value) in env {
            if let Some(field) = key.strip_prefix("SPIN_COORDINATOR__") {
                builder = builder
                    .set_override(field.to_lowercase(), value.as_str())
                    .map_err(|e| err(env_path, e.to_string()))?;
            }
        }
        let where_ = path.unwrap_or(env_path);
        let merged = builder.build().map_err(|e| err(where_, e.to_string()))?;
        let config: Self = merged
            .try_deserialize()
            .map_err(|e| err(where_, e.to_string()))?;
        config.validate()
    }

    /// Checks every range.
    pub fn validate(self) -> Result<Self, ConfigError> {
        let positive = |d: Duration, field| {
            if d.is_zero() {
                Err(ConfigError::Invalid {
                    field,
                    reason: "must be positive",
                })
            } else {
                Ok(())
            }
        };
        positive(self.heartbeat_timeout, "heartbeat_timeout_ms")?;
        positive(self.lease_duration, "lease_duration_ms")?;
        positive(self.tick_interval, "tick_interval_ms")?;
        for (n, field) in [
            (self.session_buffer, "session_buffer"),
            (self.watch_buffer, "watch_buffer"),
            (self.event_history, "event_history"),
            (self.min_workers, "min_workers"),
        ] {
            if n == 0 {
                return Err(ConfigError::Invalid {
                    field,
                    reason: "must be at least 1",
                });
            }
        }
        if self.store.trim().is_empty() {
            return Err(ConfigError::Invalid {
                field: "store",
                reason: "must name a directory or a file:// URL",
            });
        }
        for (token, field) in [
            (&self.api_token, "api_token"),
            (&self.join_token, "join_token"),
        ] {
            if token.check(field).is_err() {
                return Err(ConfigError::Invalid {
                    field,
                    reason: "must be visible ASCII characters without spaces",
                });
            }
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                return Err(ConfigError::Invalid {
                    field: "tls_key",
                    reason: "must be set with tls_cert (both or neither)",
                })
            }
            (None, Some(_)) => {
                return Err(ConfigError::Invalid {
                    field: "tls_cert",
                    reason: "must be set with tls_key (both or neither)",
                })
            }
            _ => {}
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err(ConfigError::Invalid {
                field: "tls_client_ca",
                reason: "needs tls_cert and tls_key: client certificates are checked over TLS",
            });
        }
        Ok(self)
    }
}

/// `Duration` as whole milliseconds.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("spin-coord-cfg-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("coordinator.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_file_and_the_environment_layer_over_the_defaults() {
        let path = write(
            "ok",
            "journal_path = \"/tmp/j.redb\"\nheartbeat_timeout_ms = 3000\nstore = \"/tmp/s\"\n",
        );
        let env = HashMap::from([
            (
                "SPIN_COORDINATOR__LEASE_DURATION_MS".to_string(),
                "9000".to_string(),
            ),
            ("UNRELATED".to_string(), "x".to_string()),
        ]);
        let c = CoordinatorConfig::load(Some(&path), &env).unwrap();
        assert_eq!(c.journal_path, PathBuf::from("/tmp/j.redb"));
        assert_eq!(c.heartbeat_timeout, Duration::from_secs(3));
        assert_eq!(c.lease_duration, Duration::from_secs(9));
        assert_eq!(c.tick_interval, CoordinatorConfig::default().tick_interval);
        assert_eq!((c.store.as_str(), c.min_workers), ("/tmp/s", 1));
    }

    #[test]
    fn unknown_fields_and_bad_ranges_are_named() {
        let path = write("unknown", "heartbeat_timout_ms = 3000\n");
        let err = CoordinatorConfig::load(Some(&path), &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("heartbeat_timout_ms"), "{err}");
        let path = write("zero", "tick_interval_ms = 0\n");
        let err = CoordinatorConfig::load(Some(&path), &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("tick_interval_ms"), "{err}");
        for (text, field) in [
            ("min_workers = 0\n", "min_workers"),
            ("store = \" \"\n", "store"),
        ] {
            let path = write(field, text);
            let err = CoordinatorConfig::load(Some(&path), &HashMap::new())
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn tokens_and_tls_files_come_from_the_file_or_the_environment() {
        let path = write(
            "tls",
            "tls_cert = \"/etc/spin/c.pem\"\ntls_key = \"/etc/spin/c.key\"\n",
        );
        let env = HashMap::from([
            ("SPIN_COORDINATOR__API_TOKEN".to_string(), "a-1".to_string()),
            (
                "SPIN_COORDINATOR__JOIN_TOKEN".to_string(),
                "j-2".to_string(),
            ),
            (
                "SPIN_COORDINATOR__TLS_CLIENT_CA".to_string(),
                "/etc/spin/ca.pem".to_string(),
            ),
        ]);
        let c = CoordinatorConfig::load(Some(&path), &env).unwrap();
        assert_eq!(
            (c.api_token.expose(), c.join_token.expose()),
            ("a-1", "j-2")
        );
        assert_eq!(c.tls_cert, Some(PathBuf::from("/etc/spin/c.pem")));
        assert_eq!(c.tls_key, Some(PathBuf::from("/etc/spin/c.key")));
        assert_eq!(c.tls_client_ca, Some(PathBuf::from("/etc/spin/ca.pem")));
        assert!(!format!("{c:?}").contains("a-1"), "tokens never print");

        for (text, field) in [
            ("tls_cert = \"c.pem\"\n", "tls_key"),
            ("tls_key = \"c.key\"\n", "tls_cert"),
            ("tls_client_ca = \"ca.pem\"\n", "tls_client_ca"),
            ("api_token = \"two words\"\n", "api_token"),
        ] {
            let path = write(field, text);
            let err = CoordinatorConfig::load(Some(&path), &HashMap::new())
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{err}");
        }
    }
}
