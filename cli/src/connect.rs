//! How `spinctl` reaches a coordinator's `JobService`: the [`Remote`] (URL, API token, TLS
//! material), connecting to it as a [`JobClient`], and the error for a refused call.

use std::time::Duration;

use anyhow::Context;
use spin_common::auth::{Bearer, Token};
use spin_common::proto::v1::job_service_client::JobServiceClient;
use spin_common::tls::{status_text, TlsSettings};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// The coordinator when neither `--coordinator` nor `SPIN_COORDINATOR` names one.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7070";

/// How long connecting to the coordinator may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `http://` prepended when `url` names no scheme (`127.0.0.1:7070` works too).
pub fn normalize_url(url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

/// A `JobService` client whose every call carries the API token.
pub type JobClient = JobServiceClient<InterceptedService<Channel, Bearer>>;

/// How `spinctl` reaches the coordinator: its URL, the API token and the TLS material.
#[derive(Clone, Debug)]
pub struct Remote {
    url: String,
    bearer: Bearer,
    tls: TlsSettings,
}

impl Remote {
    /// The coordinator at `url` (a URL without a scheme gets `https://` when TLS material is
    /// given, `http://` otherwise), sent `token` on every call (nothing when it is empty).
    pub fn new(url: &str, token: &Token, tls: TlsSettings) -> anyhow::Result<Self> {
        let url = if url.contains("://") || !tls.is_configured() {
            normalize_url(url)
        } else {
            format!("https://{url}")
        };
        let bearer = Bearer::new("--token (SPIN_TOKEN)", token)?;
        Ok(Self { url, bearer, tls })
    }

    /// The coordinator's URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// Connects to the coordinator at `url` without a token or TLS material (see [`connect_to`]).
pub async fn connect(url: &str) -> anyhow::Result<JobClient> {
    connect_to(&Remote::new(
        url,
        &Token::default(),
        TlsSettings::default(),
    )?)
    .await
}

/// Connects to the coordinator `remote` names; the error names the URL and what to check.
pub async fn connect_to(remote: &Remote) -> anyhow::Result<JobClient> {
    let url = remote.url();
    if url.starts_with("https://") && remote.tls.ca.is_none() {
        anyhow::bail!(
            "the coordinator URL {url} is https:// but no CA certificate was given to verify \
             it: pass --tls-ca or SPIN_TLS_CA"
        );
    }
    let endpoint = remote
        .tls
        .endpoint(url)
        .with_context(|| format!("invalid coordinator URL {url:?}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        // A long `logs --follow` notices a coordinator that vanished without closing.
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let channel = endpoint.connect().await.with_context(|| unreachable(url))?;
    Ok(JobServiceClient::with_interceptor(
        channel,
        remote.bearer.clone(),
    ))
}

fn unreachable(url: &str) -> String {
    format!(
        "cannot reach the coordinator at {url}: check that spin-coordinator is running and \
         listening there, or name another with --coordinator URL or SPIN_COORDINATOR"
    )
}

/// The error for a refused call: what was asked, the coordinator's reason, and for a lost
/// connection the URL and what to check.
pub(crate) fn refused(url: &str, what: &str, status: &Status) -> anyhow::Error {
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded => {
            anyhow::anyhow!("{what}: {}", status.message()).context(unreachable(url))
        }
        Code::Unauthenticated => anyhow::anyhow!(
            "{what}: the coordinator at {url} refused the token: {}",
            status.message()
        ),
        // The connection broke under the call; with TLS that is most often a certificate.
        code @ (Code::Unknown | Code::Cancelled | Code::Internal)
            if std::error::Error::source(status).is_some() =>
        {
            let hint = if url.starts_with("https://") {
                "a coordinator that requires client certificates needs --tls-cert and --tls-key"
            } else {
                "a coordinator that serves TLS needs an https:// URL and --tls-ca"
            };
            anyhow::anyhow!(
                "{what}: the connection to the coordinator at {url} broke: {} ({code:?}; {hint})",
                status_text(status)
            )
        }
        code => anyhow::anyhow!("{what}: {} ({code:?})", status.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_a_scheme() {
        assert_eq!(normalize_url("127.0.0.1:7070"), "http://127.0.0.1:7070");
        assert_eq!(normalize_url("https://c:1"), "https://c:1");
    }
}
