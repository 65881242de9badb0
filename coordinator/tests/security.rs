//! The coordinator's tokens and TLS, served in-process on port-0 listeners with certificates
//! made at test time: `JobService` needs the API token, `RegisterWorker` and `Session` the join
//! token, health stays open; a TLS port refuses plain text and clients that cannot verify it,
//! and with a client CA it refuses clients without a certificate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use spin_common::auth::Bearer;
use spin_common::proto::v1::{
    self, control_service_client::ControlServiceClient, job_service_client::JobServiceClient,
    worker_message,
};
use spin_common::test_pki::TestPki;
use spin_common::tls::{KeyPair, PemFile, TlsSettings};
use spin_coordinator::CoordinatorConfig;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};

const API_TOKEN: &str = "api-7f3c9e";
const JOIN_TOKEN: &str = "join-21ab44";

/// Every await of these tests goes through this.
async fn t<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("timed out")
}

fn temp_dir(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!(
        "spin-coord-sec-{}-{name}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A coordinator with tokens on a port-0 listener, stopped on drop.
struct Sandbox {
    addr: SocketAddr,
    dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
}

impl Sandbox {
    /// Starts with both tokens and whatever `tls` adds to the settings.
    async fn start(name: &str, tls: impl FnOnce(&mut CoordinatorConfig)) -> Self {
        let dir = temp_dir(name);
        let mut config = CoordinatorConfig {
            journal_path: dir.join("journal.redb"),
            store: dir.join("store").display().to_string(),
            api_token: API_TOKEN.into(),
            join_token: JOIN_TOKEN.into(),
            ..CoordinatorConfig::default()
        };
        tls(&mut config);
        let listener = t(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(async move {
            let served = spin_coordinator::run(config, listener, async {
                let _ = stopped.await;
            })
            .await;
            served.expect("coordinator serves");
        });
        Self {
            addr,
            dir,
            stop: Some(stop),
        }
    }

    async fn channel(&self) -> Channel {
        t(Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect())
        .await
        .unwrap()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn bearer(token: &str) -> Bearer {
    Bearer::new("token", &token.into()).unwrap()
}

/// `ListJobs` over `channel` with `token` as bearer metadata (none when empty).
async fn list(channel: Channel, token: &str) -> Result<usize, Status> {
    let mut jobs = JobServiceClient::with_interceptor(channel, bearer(token));
    let listed = t(jobs.list_jobs(v1::ListJobsRequest {})).await?;
    Ok(listed.into_inner().jobs.len())
}

fn assert_unauthenticated(result: Result<impl std::fmt::Debug, Status>, says: &[&str]) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    for part in says {
        assert!(status.message().contains(part), "{status:?}");
    }
    // A refusal names the token it wants, never a token.
    for token in [API_TOKEN, JOIN_TOKEN, "wrong"] {
        assert!(!status.message().contains(token), "{status:?}");
    }
}

#[tokio::test]
async fn job_service_needs_the_api_token_and_health_stays_open() {
    let sandbox = Sandbox::start("api", |_| {}).await;
    let channel = sandbox.channel().await;
    assert_unauthenticated(
        list(channel.clone(), "").await,
        &["API token", "none was sent"],
    );
    assert_unauthenticated(list(channel.clone(), "wrong").await, &["API token"]);
    // The join token is not the API token.
    assert_unauthenticated(list(channel.clone(), JOIN_TOKEN).await, &["API token"]);
    assert_eq!(list(channel.clone(), API_TOKEN).await.unwrap(), 0);

    let mut jobs = JobServiceClient::with_interceptor(channel.clone(), bearer("wrong"));
    let submitted = t(jobs.submit_job(v1::SubmitJobRequest {
        spec_toml: "[job]\n".into(),
    }))
    .await;
    assert_unauthenticated(submitted, &["API token"]);

    let mut health = HealthClient::new(channel);
    let status = t(health.check(tonic_health::pb::HealthCheckRequest {
        service: "spin.v1.JobService".into(),
    }))
    .await
    .unwrap()
    .into_inner()
    .status;
    assert_eq!(status, ServingStatus::Serving as i32);
}

fn registration(join_token: &str) -> v1::RegisterWorkerRequest {
    v1::RegisterWorkerRequest {
        join_token: join_token.into(),
        collective_address: "127.0.0.1:9999".into(),
        device: None,
    }
}

/// Opens a session for `worker` with `token` as bearer metadata: the first message from the
/// coordinator, or the refusal.
async fn session(
    control: &mut ControlServiceClient<Channel>,
    worker: &str,
    token: &str,
) -> Result<(), Status> {
    let (up, rx) = mpsc::channel(4);
    t(up.send(v1::WorkerMessage {
        message: Some(worker_message::Message::Hello(v1::Hello {
            worker_id: worker.into(),
        })),
    }))
    .await
    .unwrap();
    let mut request = Request::new(ReceiverStream::new(rx));
    bearer(token).apply(&mut request);
    let _down = t(control.session(request)).await?;
    drop(up);
    Ok(())
}

#[tokio::test]
async fn workers_need_the_join_token_to_register_and_to_open_a_session() {
    let sandbox = Sandbox::start("join", |_| {}).await;
    let mut control = ControlServiceClient::new(sandbox.channel().await);
    assert_unauthenticated(
        t(control.register_worker(registration("wrong"))).await,
        &["RegisterWorkerRequest.join_token", "join token"],
    );
    assert_unauthenticated(
        t(control.register_worker(registration(""))).await,
        &["join token", "--join-token"],
    );
    // The API token does not let a worker in.
    assert_unauthenticated(
        t(control.register_worker(registration(API_TOKEN))).await,
        &["join token"],
    );
    let worker = t(control.register_worker(registration(JOIN_TOKEN)))
        .await
        .unwrap()
        .into_inner()
        .worker_id;

    assert_unauthenticated(
        session(&mut control, &worker, "").await,
        &["Session", "join token", "none was sent"],
    );
    assert_unauthenticated(
        session(&mut control, &worker, "wrong").await,
        &["Session", "join token"],
    );
    session(&mut control, &worker, JOIN_TOKEN).await.unwrap();
}

/// `ListJobs` with the API token through a client that dials `url` with `tls`; a refused
/// connection and a refused call both come back as the error's text.
async fn list_over(url: &str, tls: &TlsSettings) -> Result<usize, String> {
    let endpoint = tls.endpoint(url).map_err(|e| e.to_string())?;
    let endpoint = endpoint.connect_timeout(Duration::from_secs(5));
    let channel = t(endpoint.connect())
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    list(channel, API_TOKEN)
        .await
        .map_err(|status| format!("call: {status:?}"))
}

fn ca(path: &Path) -> Option<PemFile> {
    Some(PemFile::certificates("CA", path).unwrap())
}

#[tokio::test]
async fn a_tls_port_refuses_plain_text_and_unverified_clients() {
    let dir = temp_dir("pki-tls");
    let pki = TestPki::generate(&dir);
    let sandbox = Sandbox::start("tls", |c| {
        c.tls_cert = Some(pki.server_cert.clone());
        c.tls_key = Some(pki.server_key.clone());
    })
    .await;
    let port = sandbox.addr.port();

    let plain = list_over(&format!("http://127.0.0.1:{port}"), &TlsSettings::default()).await;
    assert!(plain.is_err(), "plain text answered: {plain:?}");

    let trusted = TlsSettings {
        ca: ca(&pki.ca),
        identity: None,
    };
    for host in ["127.0.0.1", "localhost"] {
        let url = format!("https://{host}:{port}");
        assert_eq!(list_over(&url, &trusted).await, Ok(0), "{url}");
    }

    let untrusted = TlsSettings {
        ca: ca(&pki.other_ca),
        identity: None,
    };
    let refused = list_over(&format!("https://127.0.0.1:{port}"), &untrusted).await;
    let refused = refused.expect_err("a client that cannot verify the server");
    assert!(refused.contains("UnknownIssuer"), "{refused}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate() {
    let dir = temp_dir("pki-mtls");
    let pki = TestPki::generate(&dir);
    let sandbox = Sandbox::start("mtls", |c| {
        c.tls_cert = Some(pki.server_cert.clone());
        c.tls_key = Some(pki.server_key.clone());
        c.tls_client_ca = Some(pki.ca.clone());
    })
    .await;
    let url = format!("https://127.0.0.1:{}", sandbox.addr.port());

    let anonymous = TlsSettings {
        ca: ca(&pki.ca),
        identity: None,
    };
    let refused = list_over(&url, &anonymous).await;
    let refused = refused.expect_err("a client without a certificate");
    assert!(refused.contains("CertificateRequired"), "{refused}");

    let client =
        KeyPair::load(Some(&pki.client_cert), Some(&pki.client_key), "cert", "key").unwrap();
    let certified = TlsSettings {
        ca: ca(&pki.ca),
        identity: client,
    };
    assert_eq!(list_over(&url, &certified).await, Ok(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn unreadable_tls_files_are_named_before_serving() {
    let dir = temp_dir("missing");
    let config = CoordinatorConfig {
        journal_path: dir.join("journal.redb"),
        store: dir.join("store").display().to_string(),
        tls_cert: Some(dir.join("nowhere.pem")),
        tls_key: Some(dir.join("nowhere.key")),
        ..CoordinatorConfig::default()
    };
    let listener = t(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .await
        .unwrap();
    let err = t(spin_coordinator::run(
        config,
        listener,
        std::future::pending(),
    ))
    .await
    .expect_err("a missing certificate")
    .to_string();
    assert!(err.contains("nowhere.pem"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
