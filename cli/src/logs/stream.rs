//! Following a job's event stream: [`follow`] until the job ends (reconnecting when the
//! stream breaks) or [`show`] of the kept events, writing what the [`Renderer`] makes.

use std::io::Write;

use spin_common::proto::v1;
use tokio::time::Instant;
use tonic::{Code, Status};

use super::format::{format_duration, Renderer};
use super::{FollowOptions, Outcome};
use crate::connect::JobClient;

/// Prints job `job_id`'s events from `opts.from_sequence` until the job ends, reconnecting with
/// `from_sequence` = last seen + 1 when the stream breaks (a coordinator restart). Errors: the
/// job is unknown, the request is refused, the coordinator stays unreachable for
/// `opts.backoff.attempts` tries, or `out` fails.
pub async fn follow(
    client: &mut JobClient,
    job_id: &str,
    out: &mut impl Write,
    opts: &FollowOptions,
) -> anyhow::Result<Outcome> {
    let mut watcher = Watcher::new(job_id, out, opts);
    let mut failures = 0u32;
    loop {
        let received_before = watcher.received;
        let status = match watcher.attempt(client, true).await {
            Ok(Some(outcome)) => return watcher.end(outcome),
            Ok(None) => Status::unavailable("the stream stopped before the job ended"),
            Err(Broken::Write(err)) => return Err(err.into()),
            Err(Broken::Rpc(status)) => status,
        };
        if !transient(&status) {
            return Err(watcher.refused(&status));
        }
        if watcher.received > received_before {
            failures = 0;
        }
        failures += 1;
        if failures > opts.backoff.attempts {
            return Err(watcher.refused(&status).context(format!(
                "gave up after {} attempts to reconnect",
                opts.backoff.attempts
            )));
        }
        let delay = opts.backoff.delay(failures);
        watcher.note(&format!(
            "stream broken ({}); reconnecting in {}",
            status.message(),
            format_duration(delay.as_secs_f64())
        ))?;
        tokio::time::sleep(delay).await;
    }
}

/// Prints the events the coordinator has kept for job `job_id` and stops: at the job's final
/// event, or at the first pause of `opts.quiet` (the kept events come in one burst, live ones
/// at the job's pace), or after `opts.show_limit`. A job still running gives
/// [`Outcome::Running`]; one that ended gives how, from its final event or its status.
pub async fn show(
    client: &mut JobClient,
    job_id: &str,
    out: &mut impl Write,
    opts: &FollowOptions,
) -> anyhow::Result<Outcome> {
    let mut watcher = Watcher::new(job_id, out, opts);
    match watcher.attempt(client, false).await {
        Ok(Some(outcome)) => watcher.end(outcome),
        Ok(None) => {
            let next_sequence = watcher.next;
            watcher.end(Outcome::Running { next_sequence })
        }
        Err(Broken::Write(err)) => Err(err.into()),
        Err(Broken::Rpc(status)) => Err(watcher.refused(&status)),
    }
}

/// Why one attempt stopped early.
enum Broken {
    /// The coordinator refused or the connection broke.
    Rpc(Status),
    /// Writing the output failed (e.g. a closed pipe): never retried.
    Write(std::io::Error),
}

impl From<Status> for Broken {
    fn from(status: Status) -> Self {
        Self::Rpc(status)
    }
}

/// Codes worth a retry: the coordinator or the connection went away, not a refusal.
fn transient(status: &Status) -> bool {
    !matches!(
        status.code(),
        Code::NotFound
            | Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::Unimplemented
            | Code::OutOfRange
            | Code::AlreadyExists
    )
}

/// One watch of one job: the stream position, the renderer and the output.
struct Watcher<'a, W: Write> {
    job_id: &'a str,
    out: &'a mut W,
    opts: &'a FollowOptions,
    renderer: Renderer,
    /// The next sequence number to ask for.
    next: u64,
    /// Events received over all attempts.
    received: u64,
}

impl<'a, W: Write> Watcher<'a, W> {
    fn new(job_id: &'a str, out: &'a mut W, opts: &'a FollowOptions) -> Self {
        Self {
            job_id,
            out,
            opts,
            renderer: Renderer::new(opts.style),
            next: opts.from_sequence,
            received: 0,
        }
    }

    /// One connection: the job's status, then its stream from `next`. A job already ended,
    /// or `live == false`, is read like [`show`] reads it (the stream may not end by itself
    /// when `next` is past the final event). `Ok(None)`: stopped with the job still running,
    /// or the stream closed without a final event.
    async fn attempt(
        &mut self,
        client: &mut JobClient,
        live: bool,
    ) -> Result<Option<Outcome>, Broken> {
        let status = client
            .get_job(v1::GetJobRequest {
                job_id: self.job_id.to_string(),
            })
            .await?
            .into_inner();
        let ended = Outcome::of_status(&status);
        let bounded = !live || ended.is_some();
        let mut stream = client
            .watch_job(v1::WatchJobRequest {
                job_id: self.job_id.to_string(),
                from_sequence: self.next,
            })
            .await?
            .into_inner();
        let limit = Instant::now() + self.opts.show_limit;
        // The outcome of the last event read, if it was a final one. A final event is the end
        // only if nothing follows it: a failed job that was resumed goes on after its failure,
        // and the coordinator closes the stream after the real last event.
        let mut last_final: Option<Outcome> = None;
        loop {
            let message = if bounded {
                let deadline = limit.min(Instant::now() + self.opts.quiet);
                match tokio::time::timeout_at(deadline, stream.message()).await {
                    Ok(message) => message,
                    Err(_) => return Ok(last_final.or(ended)),
                }
            } else {
                stream.message().await
            };
            let Some(event) = message? else {
                if last_final.is_some() {
                    return Ok(last_final);
                }
                // Closed without a final event: the coordinator went away between events.
                return if bounded {
                    Ok(ended)
                } else {
                    Err(Status::unavailable("the stream closed before the job ended").into())
                };
            };
            self.next = event.sequence + 1;
            self.received += 1;
            let text = self.renderer.render(&event);
            self.write(&text).map_err(Broken::Write)?;
            last_final = Outcome::of_event(&event);
        }
    }

    fn write(&mut self, text: &str) -> std::io::Result<()> {
        self.out.write_all(text.as_bytes())?;
        self.out.flush()
    }

    /// A line of our own (not an event) between the event lines.
    fn note(&mut self, text: &str) -> anyhow::Result<()> {
        let text = self.renderer.note(text);
        Ok(self.write(&text)?)
    }

    fn end(mut self, outcome: Outcome) -> anyhow::Result<Outcome> {
        let text = self.renderer.finish();
        self.write(&text)?;
        Ok(outcome)
    }

    /// The error for a refused request, after closing any open progress line.
    fn refused(&mut self, status: &Status) -> anyhow::Error {
        let text = self.renderer.finish();
        // The request's error matters more than a failed write of a newline.
        let _ = self.write(&text);
        let refused = if status.code() == Code::Unauthenticated {
            "the coordinator refused the token: "
        } else {
            ""
        };
        anyhow::anyhow!(
            "watching job {}: {refused}{} ({:?})",
            self.job_id,
            status.message(),
            status.code()
        )
    }
}
