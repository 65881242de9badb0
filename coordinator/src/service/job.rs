//! `JobService`: submit, get, list, cancel, resume and watch jobs, for `spinctl`.

use spin_common::ids::JobId;
use spin_common::proto::{parse_id, v1};
use spin_common::spec::{JobSpec, MAX_SUBMITTED_SPEC_BYTES};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{blocking, non_empty};
use crate::coordinator::Coordinator;
use crate::error::ServiceError;
use crate::events::is_final;

/// The largest spec text accepted.
pub const MAX_SPEC_BYTES: usize = MAX_SUBMITTED_SPEC_BYTES;

const SPEC_FIELD: &str = "SubmitJobRequest.spec_toml";

/// A submitted spec through [`JobSpec::from_submitted`] (the one parse every process shares),
/// its refusal as an invalid `SubmitJobRequest.spec_toml`.
pub fn parse_spec(text: &str) -> Result<JobSpec, ServiceError> {
    JobSpec::from_submitted(text).map_err(|e| ServiceError::InvalidArgument {
        field: SPEC_FIELD,
        reason: e.to_string(),
    })
}

fn job_id(field: &'static str, value: &str) -> Result<JobId, ServiceError> {
    non_empty(field, value)?;
    Ok(parse_id(field, value)?)
}

/// Who made `request`, for the events of what it changed: the call and the client's address
/// (callers share the one API token, so the address is what tells them apart).
fn requester<T>(call: &str, request: &Request<T>) -> String {
    match request.remote_addr() {
        Some(addr) => format!("a {call} request from {addr}"),
        None => format!("a {call} request"),
    }
}

/// The `spin.v1.JobService` implementation: only a handle on the coordinator.
#[derive(Clone)]
pub struct JobApi {
    coordinator: Coordinator,
}

impl JobApi {
    /// A service over `coordinator`.
    pub fn new(coordinator: Coordinator) -> Self {
        Self { coordinator }
    }
}

#[tonic::async_trait]
impl v1::job_service_server::JobService for JobApi {
    async fn submit_job(
        &self,
        request: Request<v1::SubmitJobRequest>,
    ) -> Result<Response<v1::SubmitJobResponse>, Status> {
        let text = request.into_inner().spec_toml;
        let spec = parse_spec(&text)?;
        let c = self.coordinator.clone();
        let id = blocking(move || c.submit(spec, text)).await?;
        Ok(Response::new(v1::SubmitJobResponse {
            job_id: id.to_string(),
        }))
    }

    async fn get_job(
        &self,
        request: Request<v1::GetJobRequest>,
    ) -> Result<Response<v1::JobStatus>, Status> {
        let id = job_id("GetJobRequest.job_id", &request.into_inner().job_id)?;
        let c = self.coordinator.clone();
        Ok(Response::new(blocking(move || c.job(id)).await?))
    }

    async fn list_jobs(
        &self,
        _request: Request<v1::ListJobsRequest>,
    ) -> Result<Response<v1::ListJobsResponse>, Status> {
        let c = self.coordinator.clone();
        let jobs = blocking(move || c.jobs()).await?;
        Ok(Response::new(v1::ListJobsResponse { jobs }))
    }

    async fn cancel_job(
        &self,
        request: Request<v1::CancelJobRequest>,
    ) -> Result<Response<v1::CancelJobResponse>, Status> {
        let id = job_id("CancelJobRequest.job_id", &request.into_inner().job_id)?;
        let c = self.coordinator.clone();
        let state = blocking(move || c.cancel(id)).await?;
        Ok(Response::new(v1::CancelJobResponse {
            phase: Some(state.into()),
        }))
    }

    async fn resume_job(
        &self,
        request: Request<v1::ResumeJobRequest>,
    ) -> Result<Response<v1::ResumeJobResponse>, Status> {
        let by = requester("ResumeJob", &request);
        let id = job_id("ResumeJobRequest.job_id", &request.into_inner().job_id)?;
        let c = self.coordinator.clone();
        let resumed = blocking(move || c.resume(id, &by)).await?;
        Ok(Response::new(v1::ResumeJobResponse {
            phase: Some(resumed.phase.into()),
            from_sequence: resumed.from_sequence,
            running_job_id: resumed.behind.map(|j| j.to_string()).unwrap_or_default(),
        }))
    }

    type WatchJobStream = ReceiverStream<Result<v1::JobEvent, Status>>;

    async fn watch_job(
        &self,
        request: Request<v1::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let request = request.into_inner();
        let id = job_id("WatchJobRequest.job_id", &request.job_id)?;
        let watch = self.coordinator.watch(id, request.from_sequence)?;
        let (tx, rx) = mpsc::channel(self.coordinator.config().watch_buffer);
        let feed = Feed {
            coordinator: self.coordinator.clone(),
            job: id,
            next: request.from_sequence,
            tx,
        };
        self.coordinator.spawn(feed.run(watch.backlog, watch.live));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// One watcher's feed: the backlog, then live events, recovering from the history on lag.
struct Feed {
    coordinator: Coordinator,
    job: JobId,
    /// The next sequence number the watcher has not seen.
    next: u64,
    tx: mpsc::Sender<Result<v1::JobEvent, Status>>,
}

/// Whether the feed goes on after an event.
enum Flow {
    More,
    Stop,
}

impl Feed {
    async fn run(
        mut self,
        backlog: Vec<v1::JobEvent>,
        mut live: broadcast::Receiver<v1::JobEvent>,
    ) {
        let closing = self.coordinator.closed();
        tokio::pin!(closing);
        if let Flow::Stop = self.send_all(backlog).await {
            return;
        }
        loop {
            let received = tokio::select! {
                received = live.recv() => received,
                () = &mut closing => {
                    let _ = self.tx.send(Err(Status::unavailable("the coordinator is shutting down"))).await;
                    return;
                }
                () = self.tx.closed() => return,
            };
            let events = match received {
                Ok(event) => vec![event],
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(job = %self.job, missed, "watcher lagged; replaying history");
                    self.coordinator.events_since(self.job, self.next)
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if let Flow::Stop = self.send_all(events).await {
                return;
            }
        }
    }

    /// Sends the events the watcher has not seen; stops after the job's last event or when
    /// the client left. A final event followed by more (the job failed, then was resumed) is
    /// not the last: the feed goes on with the resumed run.
    async fn send_all(&mut self, events: Vec<v1::JobEvent>) -> Flow {
        let count = events.len();
        for (i, event) in events.into_iter().enumerate() {
            if event.sequence < self.next {
                continue;
            }
            self.next = event.sequence + 1;
            let last = is_final(&event) && i + 1 == count;
            if self.tx.send(Ok(event)).await.is_err() {
                // The client left.
                return Flow::Stop;
            }
            if last {
                return Flow::Stop;
            }
        }
        Flow::More
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use super::*;

    const MINIMAL: &str =
        "[model]\nbase = \"base\"\n[data]\ntrain = [\"data\"]\n[[iteration]]\nlr = 2e-5\nsteps = 50\n";

    #[test]
    fn a_valid_spec_parses_and_relative_paths_stay_relative() {
        let spec = parse_spec(MINIMAL).unwrap();
        assert_eq!(spec.base_model, Path::new("base"));
        assert_eq!(spec.iterations.len(), 1);
    }

    #[test]
    fn bad_specs_name_the_field() {
        let err = parse_spec(&format!("{MINIMAL}[training]\nbatch_sise = 4\n")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("batch_sise") && msg.contains(SPEC_FIELD),
            "{msg}"
        );
        let err = parse_spec("").unwrap_err().to_string();
        assert!(err.contains(SPEC_FIELD), "{err}");
        let huge = format!("{MINIMAL}#{}", "x".repeat(MAX_SPEC_BYTES));
        let err = parse_spec(&huge).unwrap_err().to_string();
        assert!(err.contains("limit"), "{err}");
        let err = parse_spec(&format!("{MINIMAL}[sampling]\nsteps = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sampling.steps"), "{err}");
    }

    #[test]
    fn job_ids_must_be_present_and_well_formed() {
        let err = job_id("GetJobRequest.job_id", "").unwrap_err().to_string();
        assert!(
            err.contains("GetJobRequest.job_id") && err.contains("empty"),
            "{err}"
        );
        let err = job_id("GetJobRequest.job_id", "nope")
            .unwrap_err()
            .to_string();
        assert!(err.contains("GetJobRequest.job_id"), "{err}");
    }
}
