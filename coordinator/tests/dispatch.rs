//! Task dispatch end to end: the coordinator served on a port-0 listener, fake workers (tokio
//! tasks speaking the real session protocol) that answer every task after a short delay as a
//! script says, and a toy dataset on disk (see `common`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use spin_common::proto::v1::{self, job_event::Event, task::Kind};
use spin_common::store::{Store, StoreError};

#[tokio::test]
async fn a_spin_job_runs_every_phase_on_two_workers() {
    use v1::PhaseKind as K;
    let sandbox = Sandbox::start("spin", 2).await;
    let a = Fake::join(&sandbox, "a", always_ok()).await;
    let b = Fake::join(&sandbox, "b", always_ok()).await;
    let mut jobs = sandbox.jobs().await;
    let spec = sandbox.spec("spin", &[4, 3]);
    let n = shard_count(&spec);
    assert_eq!(n, 4, "10 prompts in shards of 3");
    let id = submit(&mut jobs, &spec).await;
    let events = events_until_end(&mut jobs, &id).await;

    assert_eq!(
        phases(&events),
        [
            (K::Pending, 0),
            (K::Preparing, 0),
            (K::Sampling, 0),
            (K::Training, 0),
            (K::Snapshot, 0),
            (K::Sampling, 1),
            (K::Training, 1),
            (K::Snapshot, 1),
            (K::Done, 0)
        ]
    );
    // Workers were told the job's absolute store directory.
    let dir = sandbox.job_dir(&id);
    for fake in [&a, &b] {
        let assigned = fake.assignments();
        assert_eq!(assigned.len(), 1);
        assert_eq!(assigned[0].job_id, id);
        assert_eq!(Path::new(&assigned[0].store_prefix), dir);
        assert!(Path::new(&assigned[0].store_prefix).is_absolute());
    }
    let all: Vec<v1::Task> = a.tasks().into_iter().chain(b.tasks()).collect();
    assert!(all.iter().all(|t| t.job_id == id));
    let ids: BTreeSet<&str> = all.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(ids.len(), all.len(), "task ids are unique");

    // Every shard encoded exactly once, the held-out one last; every shard sampled once per
    // iteration, with the job seed.
    let mut encoded: Vec<(u32, bool)> = encodes(&all)
        .iter()
        .map(|e| (e.shard, e.held_out))
        .collect();
    encoded.sort();
    let expected: Vec<(u32, bool)> = (0..=n).map(|i| (i, i == n)).collect();
    assert_eq!(encoded, expected);
    for k in 0..2 {
        let mut sampled: Vec<u32> = samples(&all, k).iter().map(|s| s.shard).collect();
        sampled.sort();
        assert_eq!(sampled, (0..n).collect::<Vec<_>>(), "iteration {k}");
        assert!(samples(&all, k).iter().all(|s| s.seed == 7));
    }
    // Both iterations trained by one ring of two, rank 0 the first worker to join.
    let (ta, tb) = (trains(&a.tasks()), trains(&b.tasks()));
    assert_eq!((ta.len(), tb.len()), (2, 2));
    for k in 0..2 {
        let (x, y) = (&ta[k], &tb[k]);
        assert_eq!((x.rank, y.rank, x.world, y.world), (0, 1, 2, 2));
        assert_eq!(x.collective_id, y.collective_id);
        assert_eq!((x.iteration, x.first_step), (k as u32, 0));
        assert_eq!(x.last_step, [3, 2][k]);
        assert_eq!(x.peer_addresses, ["a:7000", "b:7000"]);
    }
    assert_ne!(ta[0].collective_id, ta[1].collective_id);
    assert_eq!(snapshots(&a.tasks()), [0, 1]);
    assert!(snapshots(&b.tasks()).is_empty());

    // Progress, evaluations and snapshots in order; the final model is the last snapshot.
    let story: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Shards(p) => Some(format!("shards {}/{}", p.done, p.total)),
            Event::Metrics(m) => Some(format!("eval {}", m.iteration)),
            Event::SnapshotPublished(s) => Some(format!("snapshot {} {}", s.iteration, s.path)),
            Event::Done(d) => Some(format!("done {}", d.model_path)),
            _ => None,
        })
        .collect();
    let mut expected: Vec<String> = (1..=n + 1)
        .map(|d| format!("shards {d}/{}", n + 1))
        .collect();
    expected.push("eval 0".into());
    for k in 0..2u32 {
        expected.extend((1..=n).map(|d| format!("shards {d}/{n}")));
        expected.push(format!(
            "snapshot {k} {}",
            dir.join(format!("iteration-{}", k + 1)).display()
        ));
        expected.push(format!("eval {}", k + 1));
    }
    expected.push(format!("done {}", dir.join("iteration-2").display()));
    assert_eq!(story, expected);
    assert!(events.iter().any(|e| matches!(e, Event::Step(_))));
    sandbox.shutdown().await;
}

#[tokio::test]
async fn an_sft_job_skips_sampling() {
    use v1::PhaseKind as K;
    let sandbox = Sandbox::start("sft", 1).await;
    let a = Fake::join(&sandbox, "a", always_ok()).await;
    let mut jobs = sandbox.jobs().await;
    let id = submit(&mut jobs, &sandbox.spec("sft", &[3])).await;
    let events = events_until_end(&mut jobs, &id).await;
    assert_eq!(
        phases(&events),
        [
            (K::Pending, 0),
            (K::Preparing, 0),
            (K::Training, 0),
            (K::Snapshot, 0),
            (K::Done, 0)
        ]
    );
    assert!(samples(&a.tasks(), 0).is_empty());
    let steps = trains(&a.tasks());
    assert_eq!(
        steps
            .iter()
            .map(|s| (s.rank, s.world, s.first_step, s.last_step))
            .collect::<Vec<_>>(),
        [(0, 1, 0, 2)]
    );
    sandbox.shutdown().await;
}

#[tokio::test]
async fn a_retryable_shard_failure_is_retried_and_the_job_completes() {
    let sandbox = Sandbox::start("retry", 1).await;
    let failed_once = Arc::new(AtomicBool::new(false));
    let script: Script = Arc::new(move |task| match &task.kind {
        Some(Kind::Encode(e)) if e.shard == 1 && !failed_once.swap(true, Ordering::SeqCst) => {
            Reply::Fail {
                error: "flaky disk",
                retryable: true,
                completed: 0,
                after: Duration::from_millis(5),
            }
        }
        _ => Reply::Ok,
    });
    let a = Fake::join(&sandbox, "a", script).await;
    let mut jobs = sandbox.jobs().await;
    let id = submit(&mut jobs, &sandbox.spec("sft", &[2])).await;
    let events = events_until_end(&mut jobs, &id).await;
    assert!(matches!(events.last(), Some(Event::Done(_))), "{events:?}");
    let ones = encodes(&a.tasks()).iter().filter(|e| e.shard == 1).count();
    assert_eq!(ones, 2, "shard 1 was tried twice");
    let warned = warnings(&events);
    assert!(
        warned
            .iter()
            .any(|w| w.contains("encode shard 1") && w.contains("flaky disk")),
        "{warned:?}"
    );
    sandbox.shutdown().await;
}

#[tokio::test]
async fn a_fatal_shard_failure_fails_the_job_and_cancels_its_tasks() {
    let sandbox = Sandbox::start("fatal", 1).await;
    let script: Script = Arc::new(|task| match &task.kind {
        Some(Kind::Sample(s)) if s.shard == 0 => Reply::Fail {
            error: "disk full",
            retryable: false,
            completed: 0,
            after: Duration::from_millis(5),
        },
        _ => Reply::Ok,
    });
    let a = Fake::join(&sandbox, "a", script).await;
    let mut jobs = sandbox.jobs().await;
    let id = submit(&mut jobs, &sandbox.spec("spin", &[2])).await;
    let events = events_until_end(&mut jobs, &id).await;
    let Some(Event::Failed(failed)) = events.last() else {
        panic!("{events:?}")
    };
    for part in [
        "sampling shard 0 of iteration 0",
        "disk full",
        a.id.as_str(),
    ] {
        assert!(failed.error.contains(part), "{}", failed.error);
    }
    until("the cancel message", || !a.cancels().is_empty()).await;
    let cancels = a.cancels();
    assert_eq!(cancels[0].job_id, id);
    assert!(cancels[0].reason.contains("disk full"));
    let status = t(jobs.get_job(v1::GetJobRequest { job_id: id }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.phase.unwrap().kind, v1::PhaseKind::Failed as i32);
    assert!(status.error.contains("disk full"));
    sandbox.shutdown().await;
}

#[tokio::test]
async fn a_shard_of_a_worker_lost_mid_sampling_goes_to_the_other_worker() {
    let sandbox = Sandbox::start("lost-sampling", 2).await;
    let a = Fake::join(&sandbox, "a", always_ok()).await;
    let dies: Script = Arc::new(|task| match &task.kind {
        Some(Kind::Sample(_)) => Reply::Drop,
        _ => Reply::Ok,
    });
    let b = Fake::join(&sandbox, "b", dies).await;
    let mut jobs = sandbox.jobs().await;
    let spec = sandbox.spec("spin", &[2]);
    let n = shard_count(&spec);
    let id = submit(&mut jobs, &spec).await;
    let events = events_until_end(&mut jobs, &id).await;
    assert!(matches!(events.last(), Some(Event::Done(_))), "{events:?}");
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::WorkerLost(l) if l.worker_id == b.id)));
    let dropped = samples(&b.tasks(), 0);
    assert_eq!(dropped.len(), 1);
    let mut sampled: Vec<u32> = samples(&a.tasks(), 0).iter().map(|s| s.shard).collect();
    sampled.sort();
    assert_eq!(sampled, (0..n).collect::<Vec<_>>(), "A sampled every shard");
    assert!(sampled.contains(&dropped[0].shard));
    let steps = trains(&a.tasks());
    assert_eq!((steps[0].rank, steps[0].world), (0, 1));
    sandbox.shutdown().await;
}

#[tokio::test]
async fn a_worker_lost_mid_training_leaves_the_survivor_to_resume_from_its_step() {
    let sandbox = Sandbox::start("lost-training", 2).await;
    let script: Script = Arc::new(|task| match &task.kind {
        Some(Kind::Train(s)) if s.world == 2 && s.rank == 1 => Reply::Drop,
        Some(Kind::Train(s)) if s.world == 2 => Reply::Fail {
            error: "collective: peer closed the stream",
            retryable: true,
            completed: 2,
            after: Duration::from_millis(100),
        },
        _ => Reply::Ok,
    });
    let a = Fake::join(&sandbox, "a", script.clone()).await;
    let b = Fake::join(&sandbox, "b", script).await;
    let mut jobs = sandbox.jobs().await;
    let id = submit(&mut jobs, &sandbox.spec("sft", &[6])).await;
    let events = events_until_end(&mut jobs, &id).await;
    assert!(matches!(events.last(), Some(Event::Done(_))), "{events:?}");
    let steps = trains(&a.tasks());
    let shape: Vec<(u32, u32, u64, u64)> = steps
        .iter()
        .map(|s| (s.rank, s.world, s.first_step, s.last_step))
        .collect();
    assert_eq!(shape, [(0, 2, 0, 5), (0, 1, 2, 5)]);
    assert_ne!(steps[0].collective_id, steps[1].collective_id);
    assert_eq!(steps[1].peer_addresses, ["a:7000"]);
    let warned = warnings(&events);
    assert!(
        warned
            .iter()
            .any(|w| w.contains(&b.id) && w.contains("step 2")),
        "{warned:?}"
    );
    assert_eq!(snapshots(&a.tasks()), [0]);
    sandbox.shutdown().await;
}

#[tokio::test]
async fn a_job_waits_for_min_workers() {
    let sandbox = Sandbox::start("min-workers", 2).await;
    let a = Fake::join(&sandbox, "a", always_ok()).await;
    let mut jobs = sandbox.jobs().await;
    let id = submit(&mut jobs, &sandbox.spec("sft", &[1])).await;
    // Many ticks later the job is still pending and nobody was assigned it.
    t(tokio::time::sleep(Duration::from_millis(300))).await;
    let status = t(jobs.get_job(v1::GetJobRequest { job_id: id.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.phase.unwrap().kind, v1::PhaseKind::Pending as i32);
    assert!(a.assignments().is_empty());
    let b = Fake::join(&sandbox, "b", always_ok()).await;
    let events = events_until_end(&mut jobs, &id).await;
    assert!(matches!(events.last(), Some(Event::Done(_))), "{events:?}");
    assert_eq!((a.assignments().len(), b.assignments().len()), (1, 1));
    sandbox.shutdown().await;
}

#[tokio::test]
async fn cancelling_a_running_job_cancels_its_tasks() {
    let sandbox = Sandbox::start("cancel", 2).await;
    let hang: Script = Arc::new(|_| Reply::Hang);
    let a = Fake::join(&sandbox, "a", hang.clone()).await;
    let b = Fake::join(&sandbox, "b", hang).await;
    let mut jobs = sandbox.jobs().await;
    let id = submit(&mut jobs, &sandbox.spec("spin", &[1])).await;
    until("a task on each worker", || {
        !a.tasks().is_empty() && !b.tasks().is_empty()
    })
    .await;
    let cancelled = t(jobs.cancel_job(v1::CancelJobRequest { job_id: id.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        cancelled.phase.unwrap().kind,
        v1::PhaseKind::Cancelled as i32
    );
    until("cancel messages", || {
        !a.cancels().is_empty() && !b.cancels().is_empty()
    })
    .await;
    for fake in [&a, &b] {
        let c = &fake.cancels()[0];
        assert_eq!(
            (c.job_id.as_str(), c.reason.as_str()),
            (id.as_str(), "cancelled on request")
        );
    }
    let events = events_until_end(&mut jobs, &id).await;
    assert!(
        matches!(events.last(), Some(Event::Cancelled(_))),
        "{events:?}"
    );
    sandbox.shutdown().await;
}

#[tokio::test]
async fn a_registered_worker_that_never_works_is_dropped_after_one_task_deadline() {
    // Heartbeats keep it a member but do not extend its shard's deadline.
    let deadline = Duration::from_millis(600);
    let sandbox = Sandbox::start_with("rogue", 2, |c| c.lease_duration = deadline).await;
    let rogue = Fake::join(&sandbox, "rogue", Arc::new(|_| Reply::Hang)).await;
    let honest = Fake::join(&sandbox, "honest", always_ok()).await;
    let mut jobs = sandbox.jobs().await;
    let id = submit(&mut jobs, &sandbox.spec("sft", &[2])).await;
    let events = events_until_end(&mut jobs, &id).await;
    assert!(matches!(events.last(), Some(Event::Done(_))), "{events:?}");
    assert!(!rogue.tasks().is_empty(), "the rogue was given a shard");
    let lost: Vec<&v1::WorkerLost> = events
        .iter()
        .filter_map(|e| match e {
            Event::WorkerLost(l) if l.worker_id == rogue.id => Some(l),
            _ => None,
        })
        .collect();
    assert_eq!(lost.len(), 1, "{events:?}");
    assert!(
        lost[0].reason.contains("task deadline") && lost[0].reason.contains("shard"),
        "{}",
        lost[0].reason
    );
    assert!(
        honest.tasks().len() > rogue.tasks().len(),
        "the honest worker did the rogue's shard"
    );
    // Fenced: the job's store no longer publishes what the dropped rogue writes, and still
    // does what the honest worker writes.
    let prefix = &rogue.assignments()[0].store_prefix;
    let job_store = Store::open(prefix).unwrap();
    let late = job_store
        .clone()
        .fenced(&rogue.id)
        .put("cache/latents/shard-00000.safetensors", b"stale")
        .unwrap_err();
    assert!(
        matches!(late, StoreError::Fenced { .. }) && late.to_string().contains(&rogue.id),
        "{late}"
    );
    assert!(job_store.list("cache/latents").unwrap().is_empty());
    job_store
        .clone()
        .fenced(&honest.id)
        .put("cache/probe", b"ok")
        .unwrap();
    sandbox.shutdown().await;
}
