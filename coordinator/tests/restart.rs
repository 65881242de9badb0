//! The coordinator survives its own restart and the loss of every worker at once: a job
//! interrupted in training or sampling resumes on the same journal and store with new
//! workers, from what the store holds; its event log goes on with the same sequence numbers;
//! a ring whose every member died restarts from the latest checkpoint. Fake workers and the
//! sandbox are in `common`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use spin_common::proto::v1::{
    self, job_event::Event, job_service_client::JobServiceClient, task::Kind,
};
use spin_common::store::layout;
use tonic::transport::Channel;

/// A fake worker's script: `stuck` for training tasks of iteration 0 that start at step 0,
/// success for everything else.
fn stuck_in_first_training(stuck: Reply) -> Script {
    Arc::new(move |task| match &task.kind {
        Some(Kind::Train(s)) if s.iteration == 0 && s.first_step == 0 => stuck.clone(),
        _ => Reply::Ok,
    })
}

fn steps_of(events: &[v1::JobEvent]) -> Vec<(u32, u64)> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Step(m)) => Some((m.iteration, m.step)),
            _ => None,
        })
        .collect()
}

async fn phase(jobs: &mut JobServiceClient<Channel>, id: &str) -> v1::PhaseKind {
    let status = t(jobs.get_job(v1::GetJobRequest { job_id: id.into() }))
        .await
        .unwrap()
        .into_inner();
    v1::PhaseKind::try_from(status.phase.unwrap().kind).unwrap()
}

#[tokio::test]
async fn a_job_interrupted_in_training_resumes_from_its_checkpoint_after_a_restart() {
    use v1::PhaseKind as K;
    let mut sandbox = Sandbox::start("restart-training", 2).await;
    let script = stuck_in_first_training(Reply::Stall);
    let a = Fake::join(&sandbox, "a", script.clone()).await;
    let b = Fake::join(&sandbox, "b", script).await;
    let mut jobs = sandbox.jobs().await;
    let id = submit(&mut jobs, &sandbox.spec("spin", &[4, 3])).await;

    // Follow the job until rank 0 reported steps 0 and 1 of iteration 0.
    let mut follow = watch(&mut jobs, &id, 0).await;
    let mut before = Vec::new();
    while steps_of(&before).len() < 2 {
        before.push(t(follow.message()).await.unwrap().expect("stream ended"));
    }
    assert_eq!(steps_of(&before), [(0, 0), (0, 1)]);
    // Rank 0 published the checkpoint after step 1 before the coordinator went down.
    let dir = sandbox.job_dir(&id);
    write_checkpoint(&dir, 0, 1);

    sandbox.restart().await;
    // The follower saw whatever it saw before its stream ended.
    while let Ok(Some(event)) = t(follow.message()).await {
        before.push(event);
    }
    drop((a, b));
    let mut jobs = sandbox.jobs().await;
    assert_eq!(
        phase(&mut jobs, &id).await,
        K::Training,
        "journaled state kept"
    );

    // Workers come back as new workers; the job resumes once two are connected.
    let c = Fake::join(&sandbox, "c", always_ok()).await;
    let d = Fake::join(&sandbox, "d", always_ok()).await;

    // The follower reconnects after the last event it saw and gets the very next one.
    let last = before.last().unwrap().sequence;
    let after = job_events_until_end(&mut jobs, &id, last + 1).await;
    assert_eq!(after[0].sequence, last + 1, "{:?}", after[0]);
    assert!(matches!(after.last().unwrap().event, Some(Event::Done(_))));

    // From 0: one log, numbered without a gap or a reuse, what came before unchanged.
    let all = job_events_until_end(&mut jobs, &id, 0).await;
    let sequences: Vec<u64> = all.iter().map(|e| e.sequence).collect();
    let expected: Vec<u64> = (0..all.len() as u64).collect();
    assert_eq!(sequences, expected);
    assert_eq!(&all[..before.len()], &before[..]);
    assert_eq!(&all[before.len()..], &after[..]);
    let steps = steps_of(&all);
    assert_eq!(
        &steps[..2],
        [(0, 0), (0, 1)],
        "steps before the restart kept"
    );
    assert!(steps.contains(&(0, 2)), "{steps:?}");
    let events = bare(&all);
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
    let warned = warnings(&events);
    assert!(
        warned.iter().any(|w| w.contains("goes on from its store")
            && w.contains("resuming from step 2")
            && w.contains("step-00000001")),
        "{warned:?}"
    );

    // The resumed ring starts after the checkpoint; the next iteration from its start.
    let (tc, td) = (trains(&c.tasks()), trains(&d.tasks()));
    let shape = |s: &v1::TrainSteps| (s.iteration, s.first_step, s.last_step, s.rank, s.world);
    assert_eq!(
        tc.iter().map(shape).collect::<Vec<_>>(),
        [(0, 2, 3, 0, 2), (1, 0, 2, 0, 2)]
    );
    assert_eq!(
        td.iter().map(shape).collect::<Vec<_>>(),
        [(0, 2, 3, 1, 2), (1, 0, 2, 1, 2)]
    );
    assert_eq!(snapshots(&c.tasks()), [0, 1]);
    // Nothing of the finished phases was handed out again.
    let redone: Vec<v1::Task> = c.tasks().into_iter().chain(d.tasks()).collect();
    assert!(encodes(&redone).is_empty());
    assert!(samples(&redone, 0).is_empty());
    sandbox.shutdown().await;
}

#[tokio::test]
async fn a_job_interrupted_in_sampling_hands_out_only_the_missing_shards() {
    let mut sandbox = Sandbox::start("restart-sampling", 2).await;
    let hang_sampling: Script = Arc::new(|task| match &task.kind {
        Some(Kind::Sample(_)) => Reply::Hang,
        _ => Reply::Ok,
    });
    let a = Fake::join(&sandbox, "a", hang_sampling.clone()).await;
    let b = Fake::join(&sandbox, "b", hang_sampling).await;
    let mut jobs = sandbox.jobs().await;
    let spec = sandbox.spec("spin", &[2]);
    assert_eq!(shard_count(&spec), 4);
    let id = submit(&mut jobs, &spec).await;
    until("a sampling task on each worker", || {
        !samples(&a.tasks(), 0).is_empty() && !samples(&b.tasks(), 0).is_empty()
    })
    .await;
    // Two shards' opponents were written before the coordinator went down.
    let dir = sandbox.job_dir(&id);
    write_file(&dir, &layout::opponents(0, 0));
    write_file(&dir, &layout::opponents(0, 2));

    sandbox.restart().await;
    drop((a, b));
    let c = Fake::join(&sandbox, "c", always_ok()).await;
    let d = Fake::join(&sandbox, "d", always_ok()).await;
    let mut jobs = sandbox.jobs().await;
    let events = events_until_end(&mut jobs, &id).await;
    assert!(matches!(events.last(), Some(Event::Done(_))), "{events:?}");

    let all: Vec<v1::Task> = c.tasks().into_iter().chain(d.tasks()).collect();
    let mut sampled: Vec<u32> = samples(&all, 0).iter().map(|s| s.shard).collect();
    sampled.sort_unstable();
    assert_eq!(sampled, [1, 3], "only the missing shards");
    assert!(encodes(&all).is_empty(), "preparing was done");
    let warned = warnings(&events);
    assert!(
        warned
            .iter()
            .any(|w| w.contains("resuming sampling 0") && w.contains("2 of 4 shard(s)")),
        "{warned:?}"
    );
    // Progress picks up where the store is.
    let progress: Vec<(u32, u32)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Shards(p) if p.phase.unwrap().kind == v1::PhaseKind::Sampling as i32 => {
                Some((p.done, p.total))
            }
            _ => None,
        })
        .collect();
    assert_eq!(&progress[progress.len() - 3..], [(2, 4), (3, 4), (4, 4)]);
    sandbox.shutdown().await;
}

#[tokio::test]
async fn a_ring_whose_every_worker_died_restarts_from_the_checkpoint_with_new_workers() {
    use v1::PhaseKind as K;
    let sandbox = Sandbox::start("all-lost", 2).await;
    let script = stuck_in_first_training(Reply::Drop);
    let a = Fake::join(&sandbox, "a", script.clone()).await;
    let b = Fake::join(&sandbox, "b", script).await;
    let mut jobs = sandbox.jobs().await;
    let id = submit(&mut jobs, &sandbox.spec("sft", &[4])).await;
    // The ring's rank 0 had published the checkpoint after step 1 when both died.
    write_checkpoint(&sandbox.job_dir(&id), 0, 1);

    let mut follow = watch(&mut jobs, &id, 0).await;
    let mut seen = Vec::new();
    let waiting = |seen: &[v1::JobEvent]| {
        warnings(&bare(seen))
            .iter()
            .any(|w| w.contains("every replica was lost"))
    };
    while !waiting(&seen) {
        seen.push(t(follow.message()).await.unwrap().expect("stream ended"));
    }
    assert_eq!(trains(&a.tasks()).len(), 1);
    assert_eq!(trains(&b.tasks()).len(), 1);

    // The job waits in training: one worker is not enough (min_workers is 2).
    let c = Fake::join(&sandbox, "c", always_ok()).await;
    t(tokio::time::sleep(Duration::from_millis(300))).await;
    assert_eq!(phase(&mut jobs, &id).await, K::Training);
    assert!(trains(&c.tasks()).is_empty(), "{:?}", c.tasks());
    let d = Fake::join(&sandbox, "d", always_ok()).await;

    while let Some(event) = t(follow.message()).await.unwrap() {
        seen.push(event);
    }
    let events = bare(&seen);
    assert!(matches!(events.last(), Some(Event::Done(_))), "{events:?}");
    let warned = warnings(&events);
    assert!(
        warned
            .iter()
            .any(|w| w.contains("resuming from step 2") && w.contains("step-00000001")),
        "{warned:?}"
    );
    assert_eq!(train_ranks(&c.tasks()), [(2, 3, 0, 2)]);
    assert_eq!(train_ranks(&d.tasks()), [(2, 3, 1, 2)]);
    // A worker of the new ring writes the snapshot.
    assert_eq!(snapshots(&c.tasks()), [0]);
    assert!(!events.iter().any(|e| matches!(e, Event::Failed(_))));
    sandbox.shutdown().await;
}

#[test]
fn transitions_journaled_without_their_events_are_told_once_on_open() {
    use spin_common::ids::JobId;
    use spin_coordinator::journal::{JobRecord, Journal};
    use spin_coordinator::state::{JobShape, Trigger};
    use spin_coordinator::{Coordinator, CoordinatorConfig};
    use v1::PhaseKind as K;

    let dir = std::env::temp_dir().join(format!(
        "spin-restart-untold-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let config = CoordinatorConfig {
        journal_path: dir.join("journal.redb"),
        store: dir.join("store").display().to_string(),
        ..CoordinatorConfig::default()
    };
    let shape = JobShape {
        iterations: 1,
        self_play: true,
    };
    let id = JobId::new();
    // A journal written before events were stored: the job and its transitions only.
    {
        let journal = Journal::open(&config.journal_path).unwrap();
        let job = JobRecord::pending(id, "old".into(), String::new(), shape, 1);
        journal.accept(&job).unwrap();
        journal.apply(id, Trigger::Start, 2).unwrap();
        journal.apply(id, Trigger::Prepared, 3).unwrap();
    }
    let told = |config: &CoordinatorConfig| {
        let coordinator = Coordinator::open(config.clone()).unwrap();
        let events = coordinator.watch(id, 0).unwrap().backlog;
        let numbered: Vec<u64> = events.iter().map(|e| e.sequence).collect();
        assert_eq!(numbered, (0..events.len() as u64).collect::<Vec<_>>());
        phases(&bare(&events))
    };
    let first = told(&config);
    assert_eq!(
        first,
        [(K::Pending, 0), (K::Preparing, 0), (K::Sampling, 0)]
    );
    assert_eq!(told(&config), first, "stored once, not told again");
    // A crash between journaling a transition and storing its events.
    Journal::open(&config.journal_path)
        .unwrap()
        .apply(id, Trigger::Sampled { iteration: 0 }, 4)
        .unwrap();
    let expected = [
        (K::Pending, 0),
        (K::Preparing, 0),
        (K::Sampling, 0),
        (K::Training, 0),
    ];
    assert_eq!(told(&config), expected);
    assert_eq!(told(&config), expected);
    let _ = std::fs::remove_dir_all(&dir);
}
