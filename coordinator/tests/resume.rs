//! `ResumeJob`: a job that failed mid-training (a worker could not write its checkpoint: the
//! disk was full; or its dataset was gone when a restarted coordinator went on with it) is
//! resumed once the cause is gone, into the phase it failed in, from the newest verified
//! checkpoint its store holds, and completes; the resume is journaled (a coordinator restart
//! keeps it), says who asked in an event, waits behind a running job, and is refused for any
//! job that is not failed. Fake workers and the sandbox are in `common`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use spin_common::proto::v1::{
    self, job_event::Event, job_service_client::JobServiceClient, task::Kind, PhaseKind as K,
};
use tonic::transport::Channel;
use tonic::Code;

/// What a fake rank 0 says when it cannot write its checkpoint.
const DISK_FULL: &str =
    "writing checkpoints/iteration-0/step-00000003: No space left on device (os error 28)";

/// A fake worker's script for the jobs under the store `jobs`: while `full` is set, rank 0 of
/// a ring of iteration 0 publishes the checkpoint after step 1 (as a real rank 0 does before
/// step 2), then fails for good writing the next one; the other ranks wait for the ring. Every
/// other task, and every task once `full` is cleared, succeeds.
fn disk_fills_up(jobs: PathBuf, full: Arc<AtomicBool>) -> Script {
    Arc::new(move |task| match &task.kind {
        Some(Kind::Train(s)) if s.iteration == 0 && full.load(Ordering::SeqCst) => {
            if s.rank != 0 {
                return Reply::Hang;
            }
            write_checkpoint(&jobs.join(&task.job_id), 0, 1);
            Reply::Fail {
                error: DISK_FULL,
                retryable: false,
                completed: 2,
                after: Duration::from_millis(20),
            }
        }
        _ => Reply::Ok,
    })
}

async fn status(jobs: &mut JobServiceClient<Channel>, id: &str) -> v1::JobStatus {
    t(jobs.get_job(v1::GetJobRequest { job_id: id.into() }))
        .await
        .unwrap()
        .into_inner()
}

async fn phase(jobs: &mut JobServiceClient<Channel>, id: &str) -> (K, u32) {
    let phase = status(jobs, id).await.phase.unwrap();
    (K::try_from(phase.kind).unwrap(), phase.iteration)
}

async fn resume(
    jobs: &mut JobServiceClient<Channel>,
    id: &str,
) -> Result<v1::ResumeJobResponse, tonic::Status> {
    t(jobs.resume_job(v1::ResumeJobRequest { job_id: id.into() }))
        .await
        .map(tonic::Response::into_inner)
}

/// Follows job `id` from event `from` until its next failure, and returns the events.
async fn until_failed(jobs: &mut JobServiceClient<Channel>, id: &str, from: u64) -> Vec<Event> {
    let mut stream = watch(jobs, id, from).await;
    let mut seen = Vec::new();
    loop {
        let event = t(stream.message()).await.unwrap().expect("stream ended");
        let event = event.event.unwrap();
        let failed = matches!(event, Event::Failed(_));
        seen.push(event);
        if failed {
            return seen;
        }
    }
}

fn failure(events: &[Event]) -> String {
    match events.last() {
        Some(Event::Failed(f)) => f.error.clone(),
        other => panic!("the job did not fail: {other:?}"),
    }
}

fn first_steps(tasks: &[v1::Task], job: &str) -> Vec<(u64, u32)> {
    let of_job: Vec<v1::Task> = tasks.iter().filter(|t| t.job_id == job).cloned().collect();
    trains(&of_job)
        .iter()
        .map(|s| (s.first_step, s.rank))
        .collect()
}

#[tokio::test]
async fn a_job_failed_mid_training_resumes_from_its_newest_checkpoint_and_completes() {
    let sandbox = Sandbox::start("resume-training", 2).await;
    let full = Arc::new(AtomicBool::new(true));
    let script = disk_fills_up(sandbox.dir.join("store/jobs"), full.clone());
    let a = Fake::join(&sandbox, "a", script.clone()).await;
    let b = Fake::join(&sandbox, "b", script).await;
    let mut jobs = sandbox.jobs().await;
    let id = submit(&mut jobs, &sandbox.spec("spin", &[4, 2])).await;

    let before = until_failed(&mut jobs, &id, 0).await;
    let error = failure(&before);
    assert!(
        error.contains("training iteration 0")
            && error.contains(&a.id)
            && error.contains(DISK_FULL),
        "{error}"
    );
    let failed = status(&mut jobs, &id).await;
    assert_eq!(failed.error, failure(&before));
    let told = before.len() as u64;
    let encoded = encodes(&a.tasks()).len() + encodes(&b.tasks()).len();
    let sampled = samples(&a.tasks(), 0).len() + samples(&b.tasks(), 0).len();

    // Space is back.
    full.store(false, Ordering::SeqCst);
    let resumed = resume(&mut jobs, &id).await.unwrap();
    let back = resumed.phase.unwrap();
    assert_eq!(
        (K::try_from(back.kind).unwrap(), back.iteration),
        (K::Training, 0)
    );
    assert_eq!(resumed.from_sequence, told, "the resume's events come next");
    assert_eq!(resumed.running_job_id, "", "no other job runs");

    let after = job_events_until_end(&mut jobs, &id, resumed.from_sequence).await;
    assert_eq!(after[0].sequence, resumed.from_sequence);
    assert_eq!(
        after[0].event,
        Some(Event::PhaseChanged(v1::PhaseChanged {
            from: Some(v1::Phase {
                kind: K::Failed as i32,
                iteration: 0
            }),
            to: Some(back),
        }))
    );
    let events = bare(&after);
    assert!(matches!(events.last(), Some(Event::Done(_))), "{events:?}");
    let warned = warnings(&events);
    assert!(
        warned.iter().any(
            |w| w.contains("resumed by a ResumeJob request from 127.0.0.1")
                && w.contains("failed in training 0")
                && w.contains("No space left on device")
        ),
        "{warned:?}"
    );
    // The resume point: after the newest verified checkpoint, not step 0.
    assert!(
        warned
            .iter()
            .any(|w| w.contains("resuming from step 2 of 4") && w.contains("step-00000001")),
        "{warned:?}"
    );
    assert_eq!(
        first_steps(&a.tasks(), &id),
        [(0, 0), (2, 0), (0, 0)],
        "iteration 0 from step 0, again from step 2, then iteration 1"
    );
    assert_eq!(first_steps(&b.tasks(), &id), [(0, 1), (2, 1), (0, 1)]);
    // What the store held was not handed out again.
    assert_eq!(
        encodes(&a.tasks()).len() + encodes(&b.tasks()).len(),
        encoded
    );
    assert_eq!(
        samples(&a.tasks(), 0).len() + samples(&b.tasks(), 0).len(),
        sampled
    );

    // One log from 0, numbered without a gap; the old failure in it does not end it.
    let all = job_events_until_end(&mut jobs, &id, 0).await;
    let sequences: Vec<u64> = all.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (0..all.len() as u64).collect::<Vec<_>>());
    let events = bare(&all);
    let phases = phases(&events);
    assert_eq!(
        phases[3..],
        [
            (K::Training, 0),
            (K::Failed, 0),
            (K::Training, 0),
            (K::Snapshot, 0),
            (K::Sampling, 1),
            (K::Training, 1),
            (K::Snapshot, 1),
            (K::Done, 0)
        ]
    );
    assert_eq!(status(&mut jobs, &id).await.error, "", "no longer failed");

    // A finished job is not resumed; an unknown or malformed id is refused as such.
    let err = resume(&mut jobs, &id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains(&id) && err.message().contains("a job that is done"),
        "{}",
        err.message()
    );
    let stranger = spin_common::ids::JobId::new().to_string();
    let err = resume(&mut jobs, &stranger).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains(&stranger), "{}", err.message());
    let err = resume(&mut jobs, "not-a-job").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("ResumeJobRequest.job_id"),
        "{}",
        err.message()
    );
    sandbox.shutdown().await;
}

#[tokio::test]
async fn a_resume_is_journaled_retried_while_the_cause_remains_and_survives_a_restart() {
    let mut sandbox = Sandbox::start("resume-restart", 2).await;
    let stall: Script = Arc::new(|task| match &task.kind {
        Some(Kind::Train(s)) if s.first_step == 0 => Reply::Stall,
        _ => Reply::Ok,
    });
    let a = Fake::join(&sandbox, "a", stall.clone()).await;
    let b = Fake::join(&sandbox, "b", stall).await;
    let mut jobs = sandbox.jobs().await;
    let id = submit(&mut jobs, &sandbox.spec("sft", &[4])).await;
    until("rank 0 reported two steps", || {
        trains(&a.tasks()).len() + trains(&b.tasks()).len() == 2
    })
    .await;
    write_checkpoint(&sandbox.job_dir(&id), 0, 1);

    // The coordinator restarts while the dataset's volume is gone: the job cannot go on.
    let data = sandbox.dir.join("data");
    let away = sandbox.dir.join("data-unmounted");
    std::fs::rename(&data, &away).unwrap();
    sandbox.restart().await;
    drop((a, b));
    let c = Fake::join(&sandbox, "c", always_ok()).await;
    let d = Fake::join(&sandbox, "d", always_ok()).await;
    let mut jobs = sandbox.jobs().await;
    let first = until_failed(&mut jobs, &id, 0).await;
    let error = failure(&first);
    assert!(
        error.contains("training 0") && error.contains(&data.display().to_string()),
        "{error}"
    );

    // Resumed while the cause remains: it starts and fails again, saying why.
    let again = resume(&mut jobs, &id).await.unwrap();
    let second = until_failed(&mut jobs, &id, again.from_sequence).await;
    assert_eq!(phases(&second)[..2], [(K::Training, 0), (K::Failed, 0)]);
    assert!(
        failure(&second).contains(&data.display().to_string()),
        "{second:?}"
    );
    assert!(trains(&c.tasks()).is_empty() && trains(&d.tasks()).is_empty());

    // The volume is back; the resume is asked for with no worker connected (their sessions
    // ended with the coordinator), then the coordinator restarts before any comes: the
    // journal keeps the job resumed.
    std::fs::rename(&away, &data).unwrap();
    sandbox.restart().await;
    drop((c, d));
    let mut jobs = sandbox.jobs().await;
    let resumed = resume(&mut jobs, &id).await.unwrap();
    assert_eq!(resumed.phase.unwrap().kind, K::Training as i32);
    assert_eq!(phase(&mut jobs, &id).await, (K::Training, 0));
    sandbox.restart().await;
    let mut jobs = sandbox.jobs().await;
    assert_eq!(phase(&mut jobs, &id).await, (K::Training, 0), "journaled");
    let e = Fake::join(&sandbox, "e", always_ok()).await;
    let f = Fake::join(&sandbox, "f", always_ok()).await;
    let after = job_events_until_end(&mut jobs, &id, resumed.from_sequence).await;
    let events = bare(&after);
    assert!(matches!(events.last(), Some(Event::Done(_))), "{events:?}");
    assert!(
        warnings(&events)
            .iter()
            .any(|w| w.contains("resuming from step 2 of 4") && w.contains("step-00000001")),
        "{events:?}"
    );
    assert_eq!(train_ranks(&e.tasks()), [(2, 3, 0, 2)]);
    assert_eq!(train_ranks(&f.tasks()), [(2, 3, 1, 2)]);
    let all = bare(&job_events_until_end(&mut jobs, &id, 0).await);
    let resumes = warnings(&all)
        .iter()
        .filter(|w| w.contains("job resumed by"))
        .count();
    assert_eq!(resumes, 2, "one event per resume");
    sandbox.shutdown().await;
}

#[tokio::test]
async fn a_resumed_job_waits_for_the_running_job_then_goes_on() {
    let sandbox = Sandbox::start("resume-queued", 2).await;
    let full = Arc::new(AtomicBool::new(true));
    let disk = disk_fills_up(sandbox.dir.join("store/jobs"), full.clone());
    // Once set, encoding never ends: the next job stays running.
    let hold = Arc::new(AtomicBool::new(false));
    let script: Script = {
        let hold = hold.clone();
        Arc::new(move |task| match &task.kind {
            Some(Kind::Encode(_)) if hold.load(Ordering::SeqCst) => Reply::Hang,
            _ => disk(task),
        })
    };
    let a = Fake::join(&sandbox, "a", script.clone()).await;
    let b = Fake::join(&sandbox, "b", script).await;
    let mut jobs = sandbox.jobs().await;
    let first = submit(&mut jobs, &sandbox.spec("sft", &[4])).await;
    until_failed(&mut jobs, &first, 0).await;

    hold.store(true, Ordering::SeqCst);
    full.store(false, Ordering::SeqCst);
    let second = submit(&mut jobs, &sandbox.spec("sft", &[4])).await;
    let encoding = |fake: &Fake| {
        let tasks: Vec<v1::Task> = fake
            .tasks()
            .into_iter()
            .filter(|t| t.job_id == second)
            .collect();
        !encodes(&tasks).is_empty()
    };
    until("the second job's encode tasks", || {
        encoding(&a) && encoding(&b)
    })
    .await;
    let resumed = resume(&mut jobs, &first).await.unwrap();
    assert_eq!(resumed.running_job_id, second);
    // It waits in its phase, with no worker, while the other job runs.
    let waiting = status(&mut jobs, &first).await;
    assert_eq!(waiting.phase.unwrap().kind, K::Training as i32);
    assert_eq!(waiting.workers, 0);
    assert_eq!(status(&mut jobs, &second).await.workers, 2);
    assert_eq!(first_steps(&a.tasks(), &first), [(0, 0)]);
    // Live again (if waiting): a second resume is refused, naming the job and its phase.
    let err = resume(&mut jobs, &first).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains(&first)
            && err.message().contains("a job that is training 0")
            && err.message().contains("only a failed job can be resumed"),
        "{}",
        err.message()
    );
    let err = resume(&mut jobs, &second).await.unwrap_err();
    assert!(
        err.message().contains("a job that is preparing"),
        "{}",
        err.message()
    );

    t(jobs.cancel_job(v1::CancelJobRequest {
        job_id: second.clone(),
    }))
    .await
    .unwrap();
    let after = bare(&job_events_until_end(&mut jobs, &first, resumed.from_sequence).await);
    assert!(matches!(after.last(), Some(Event::Done(_))), "{after:?}");
    assert!(
        warnings(&after)
            .iter()
            .any(|w| w.contains(&format!("it starts once job {second} ends"))),
        "{after:?}"
    );
    assert_eq!(first_steps(&a.tasks(), &first), [(0, 0), (2, 0)]);
    assert_eq!(first_steps(&b.tasks(), &first), [(0, 1), (2, 1)]);
    sandbox.shutdown().await;
}
