//! Dispatch walked through every phase without a network: workers are plain members, results
//! are built by hand, and the time is passed in.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use spin_common::ids::{JobId, WorkerId};
use spin_common::proto::v1;
use v1::job_event::Event;
use v1::task::Kind;
use v1::task_result::Outcome;

use super::resume::{Found, TrainingPoint};
use super::*;
use crate::membership::{Device, Member};
use crate::service::job::parse_spec;
use crate::state::{JobState, Trigger};

const TTL: Duration = Duration::from_secs(60);

fn members(n: usize, t0: Instant) -> Vec<Member> {
    (0..n)
        .map(|i| Member {
            id: WorkerId::new(),
            address: format!("w{i}:7000"),
            device: Device::default(),
            joined: i as u64,
            last_heartbeat: t0,
        })
        .collect()
}

/// `train` prompts in shards of `size`, with a held-out shard if `held_out`.
fn run(train: u64, size: u64, held_out: bool, steps: &[u64]) -> JobRun {
    let plan = Plan {
        seed: 42,
        steps: steps.to_vec(),
        shards: plan_shards(train, size).unwrap(),
        held_out,
        job_dir: PathBuf::from("/store/jobs/j"),
        max_world: usize::MAX,
    };
    JobRun::new(JobId::new(), plan, TTL)
}

fn sends(actions: &[Action]) -> Vec<(WorkerId, v1::Task)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { worker, task } => Some((*worker, v1::Task::from(task.clone()))),
            _ => None,
        })
        .collect()
}

/// The ring aborts among `actions`: (worker, collective id, reason).
fn aborts(actions: &[Action]) -> Vec<(WorkerId, String, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::AbortRing {
                worker,
                collective_id,
                reason,
            } => Some((*worker, collective_id.clone(), reason.clone())),
            _ => None,
        })
        .collect()
}

fn triggers(actions: &[Action]) -> Vec<Trigger> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Apply(t) => Some(t.clone()),
            _ => None,
        })
        .collect()
}

fn events(actions: &[Action]) -> Vec<Event> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Event(e) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

fn warnings(actions: &[Action]) -> Vec<String> {
    events(actions)
        .into_iter()
        .filter_map(|e| match e {
            Event::Warning(w) => Some(w.message),
            _ => None,
        })
        .collect()
}

fn ok(task: &v1::Task, outputs: &[&str], metrics: Vec<v1::EvalMetrics>) -> v1::TaskResult {
    v1::TaskResult {
        task_id: task.task_id.clone(),
        outcome: Some(Outcome::Succeeded(v1::TaskSucceeded {
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            metrics,
            completed_steps: match &task.kind {
                Some(Kind::Train(t)) => t.last_step - t.first_step + 1,
                _ => 0,
            },
        })),
    }
}

fn failed(task: &v1::Task, error: &str, retryable: bool, completed: u64) -> v1::TaskResult {
    v1::TaskResult {
        task_id: task.task_id.clone(),
        outcome: Some(Outcome::Failed(v1::TaskFailed {
            error: error.into(),
            retryable,
            completed_steps: completed,
        })),
    }
}

fn train(task: &v1::Task) -> v1::TrainSteps {
    match &task.kind {
        Some(Kind::Train(t)) => t.clone(),
        other => panic!("expected a train task, got {other:?}"),
    }
}

/// Answers every task with success until the phase ends; returns every task sent, every
/// event, and the trigger that ended the phase.
fn finish_phase(
    run: &mut JobRun,
    workers: &[Member],
    t0: Instant,
) -> (Vec<(WorkerId, v1::Task)>, Vec<Event>, Trigger) {
    let (mut sent, mut seen) = (Vec::new(), Vec::new());
    for _ in 0..100 {
        let batch = sends(&run.dispatch(workers, 1, t0));
        sent.extend(batch.clone());
        for (worker, task) in batch {
            let metrics = match &task.kind {
                Some(Kind::Encode(e)) if e.held_out => vec![v1::EvalMetrics::default()],
                _ => Vec::new(),
            };
            let actions = run.on_result(worker, ok(&task, &[], metrics));
            seen.extend(events(&actions));
            if let Some(t) = triggers(&actions).pop() {
                return (sent, seen, t);
            }
        }
    }
    panic!("the phase never ended");
}

#[test]
fn preparing_encodes_every_shard_once_then_the_held_out_prompts() {
    let t0 = Instant::now();
    let workers = members(2, t0);
    let mut run = run(10, 3, true, &[4]);
    assert!(run.enter(JobState::Preparing).is_empty());
    let first = sends(&run.dispatch(&workers, 1, t0));
    assert_eq!(first.len(), 2, "one shard per idle worker");
    assert!(
        sends(&run.dispatch(&workers, 1, t0)).is_empty(),
        "both busy"
    );
    for (worker, task) in first {
        run.on_result(worker, ok(&task, &[], Vec::new()));
    }
    let (sent, seen, trigger) = finish_phase(&mut run, &workers, t0);
    assert_eq!(trigger, Trigger::Prepared);
    let encodes: Vec<v1::EncodeShard> = sent
        .iter()
        .map(|(_, t)| match &t.kind {
            Some(Kind::Encode(e)) => *e,
            other => panic!("{other:?}"),
        })
        .collect();
    let shards: Vec<(u32, u64, u64, bool)> = encodes
        .iter()
        .map(|e| (e.shard, e.first_pair, e.end_pair, e.held_out))
        .collect();
    assert_eq!(
        shards,
        [(2, 6, 9, false), (3, 9, 10, false), (4, 0, 0, true)]
    );
    let progress: Vec<(u32, u32)> = seen
        .iter()
        .filter_map(|e| match e {
            Event::Shards(p) => Some((p.done, p.total)),
            _ => None,
        })
        .collect();
    assert_eq!(progress, [(3, 5), (4, 5), (5, 5)]);
    assert!(matches!(seen.last(), Some(Event::Metrics(_))), "{seen:?}");
    // Task ids are unique and name the job.
    let ids: std::collections::HashSet<&str> =
        sent.iter().map(|(_, t)| t.task_id.as_str()).collect();
    assert_eq!(ids.len(), sent.len());
    assert!(sent[0].1.task_id.starts_with(&run.job().to_string()));
}

#[test]
fn sampling_tasks_carry_the_iteration_the_seed_and_the_prompts() {
    let t0 = Instant::now();
    let workers = members(1, t0);
    let mut run = run(7, 3, true, &[4, 4]);
    run.enter(JobState::Sampling(1));
    let (sent, _, trigger) = finish_phase(&mut run, &workers, t0);
    assert_eq!(trigger, Trigger::Sampled { iteration: 1 });
    let samples: Vec<(u32, u32, u64, u64, u64)> = sent
        .iter()
        .map(|(_, t)| match &t.kind {
            Some(Kind::Sample(s)) => (s.iteration, s.shard, s.first_prompt, s.end_prompt, s.seed),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        samples,
        [(1, 0, 0, 3, 42), (1, 1, 3, 6, 42), (1, 2, 6, 7, 42)],
        "no held-out shard when sampling"
    );
}

#[test]
fn retryable_failures_reopen_a_shard_until_the_third() {
    let t0 = Instant::now();
    let workers = members(1, t0);
    let w = workers[0].id;
    let mut run = run(4, 2, false, &[1]);
    run.enter(JobState::Preparing);
    for attempt in 1..=3 {
        let (_, task) = sends(&run.dispatch(&workers, 1, t0)).pop().unwrap();
        assert!(task.task_id.contains("encode-0"), "{}", task.task_id);
        let actions = run.on_result(w, failed(&task, "disk hiccup", true, 0));
        if attempt < 3 {
            let warned = warnings(&actions);
            assert!(warned[0].contains("encode shard 0"), "{warned:?}");
            assert!(warned[0].contains(&format!("attempt {attempt} of 3")));
        } else {
            let t = triggers(&actions);
            let [Trigger::Fail { reason }] = t.as_slice() else {
                panic!("{t:?}")
            };
            assert!(reason.contains("encode shard 0 failed 3 times"), "{reason}");
            assert!(reason.contains("disk hiccup"), "{reason}");
        }
    }
}

#[test]
fn a_fatal_shard_failure_names_the_shard_the_worker_and_the_error() {
    let t0 = Instant::now();
    let workers = members(2, t0);
    let mut run = run(4, 2, false, &[1]);
    run.enter(JobState::Sampling(0));
    let sent = sends(&run.dispatch(&workers, 1, t0));
    let (worker, task) = &sent[1];
    let t = triggers(&run.on_result(*worker, failed(task, "corrupt latents", false, 0)));
    let [Trigger::Fail { reason }] = t.as_slice() else {
        panic!("{t:?}")
    };
    assert!(
        reason.contains("sampling shard 1 of iteration 0"),
        "{reason}"
    );
    assert!(reason.contains(&worker.to_string()), "{reason}");
    assert!(reason.contains("corrupt latents"), "{reason}");
}

#[test]
fn unknown_and_stale_results_are_ignored() {
    let t0 = Instant::now();
    let workers = members(2, t0);
    let (a, b) = (workers[0].id, workers[1].id);
    let mut run = run(4, 2, false, &[1]);
    run.enter(JobState::Preparing);
    let sent = sends(&run.dispatch(&workers, 1, t0));
    let mut wrong = ok(&sent[0].1, &[], Vec::new());
    wrong.task_id = "nope".into();
    assert!(run.on_result(a, wrong).is_empty());
    assert!(run.busy(a), "its real task is still in flight");
    // B's result arrives from A: not A's task.
    assert!(run.on_result(a, ok(&sent[1].1, &[], Vec::new())).is_empty());
    // A lost worker's late result is ignored, and its shard went back to the pool.
    run.on_lost(b, "session broke");
    assert!(run.on_result(b, ok(&sent[1].1, &[], Vec::new())).is_empty());
    run.on_result(a, ok(&sent[0].1, &[], Vec::new()));
    let again = sends(&run.dispatch(&workers[..1], 1, t0));
    assert!(again[0].1.task_id.contains("encode-1"), "{again:?}");
}

#[test]
fn a_lapsed_lease_goes_to_another_worker_and_the_late_report_is_ignored() {
    let t0 = Instant::now();
    let workers = members(2, t0);
    let (a, b) = (workers[0].id, workers[1].id);
    let mut run = run(1, 1, false, &[1]);
    run.enter(JobState::Preparing);
    let (_, slow) = sends(&run.dispatch(&workers, 1, t0)).pop().unwrap();
    assert_eq!(run.expire(t0 + TTL), [(0, a)]);
    let (to, redo) = sends(&run.dispatch(&workers, 1, t0 + TTL)).pop().unwrap();
    assert_eq!(to, b);
    assert!(run.on_result(a, ok(&slow, &[], Vec::new())).is_empty());
    let actions = run.on_result(b, ok(&redo, &[], Vec::new()));
    assert_eq!(triggers(&actions), [Trigger::Prepared]);
}

#[test]
fn training_waits_for_tasks_in_flight_then_forms_one_ring() {
    let t0 = Instant::now();
    let workers = members(2, t0);
    let mut run = run(4, 2, false, &[5]);
    run.enter(JobState::Sampling(0));
    let stale = sends(&run.dispatch(&workers, 1, t0));
    assert_eq!(stale.len(), 2);
    run.enter(JobState::Training(0));
    assert!(run.dispatch(&workers, 7, t0).is_empty(), "tasks in flight");
    for (worker, task) in &stale {
        assert!(run.on_result(*worker, ok(task, &[], Vec::new())).is_empty());
    }
    let ring = sends(&run.dispatch(&workers, 7, t0));
    let steps: Vec<v1::TrainSteps> = ring.iter().map(|(_, t)| train(t)).collect();
    assert_eq!(
        steps.iter().map(|s| (s.rank, s.world)).collect::<Vec<_>>(),
        [(0, 2), (1, 2)]
    );
    assert_eq!(ring[0].0, workers[0].id, "ranks follow join order");
    assert!(steps
        .iter()
        .all(|s| (s.iteration, s.first_step, s.last_step) == (0, 0, 4)));
    assert_eq!(steps[0].collective_id, steps[1].collective_id);
    let id = &steps[0].collective_id;
    assert!(
        id.starts_with(&format!("{}/run-", run.job())) && id.ends_with("/iteration-0/ring-7-1"),
        "{id}"
    );
    assert_eq!(steps[0].peer_addresses, ["w0:7000", "w1:7000"]);
    assert!(
        run.dispatch(&workers, 7, t0).is_empty(),
        "one ring at a time"
    );
    assert!(run
        .on_result(ring[1].0, ok(&ring[1].1, &[], Vec::new()))
        .is_empty());
    let actions = run.on_result(ring[0].0, ok(&ring[0].1, &[], Vec::new()));
    assert_eq!(triggers(&actions), [Trigger::Trained { iteration: 0 }]);

    // The snapshot goes to rank 0 of that ring and publishes what it wrote.
    run.enter(JobState::Snapshot(0));
    let sent = sends(&run.dispatch(&workers, 7, t0));
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, workers[0].id);
    assert_eq!(
        sent[0].1.kind,
        Some(Kind::Snapshot(v1::Snapshot { iteration: 0 }))
    );
    let metrics = v1::EvalMetrics {
        iteration: 1,
        held_out_loss: 0.5,
        mmd: 0.1,
        grid_path: "g.png".into(),
    };
    let actions = run.on_result(
        sent[0].0,
        ok(
            &sent[0].1,
            &["/store/jobs/j/iteration-1"],
            vec![metrics.clone()],
        ),
    );
    assert_eq!(
        events(&actions),
        [
            Event::SnapshotPublished(v1::SnapshotPublished {
                iteration: 0,
                path: "/store/jobs/j/iteration-1".into()
            }),
            Event::Metrics(metrics)
        ]
    );
    assert_eq!(
        triggers(&actions),
        [Trigger::SnapshotPublished { iteration: 0 }]
    );
}

#[test]
fn rings_are_no_larger_than_the_micro_batches_of_a_step() {
    let t0 = Instant::now();
    let workers = members(3, t0);
    let plan = Plan {
        seed: 42,
        steps: vec![4],
        shards: plan_shards(4, 2).unwrap(),
        held_out: false,
        job_dir: PathBuf::from("/store/jobs/j"),
        max_world: 2,
    };
    let mut run = JobRun::new(JobId::new(), plan, TTL);
    run.enter(JobState::Training(0));
    let ring = sends(&run.dispatch(&workers, 1, t0));
    let steps: Vec<v1::TrainSteps> = ring.iter().map(|(_, t)| train(t)).collect();
    assert_eq!(
        steps.iter().map(|s| (s.rank, s.world)).collect::<Vec<_>>(),
        [(0, 2), (1, 2)],
        "the third worker waits: 2 micro-batches per step"
    );
    assert_eq!(
        ring.iter().map(|(w, _)| *w).collect::<Vec<_>>(),
        [workers[0].id, workers[1].id]
    );
}

/// Forms the first ring of Training(0) over `workers`.
fn first_ring(run: &mut JobRun, workers: &[Member], t0: Instant) -> Vec<(WorkerId, v1::Task)> {
    run.enter(JobState::Training(0));
    sends(&run.dispatch(workers, 3, t0))
}

#[test]
fn a_lost_member_re_forms_the_ring_from_the_survivors_step() {
    let t0 = Instant::now();
    let mut workers = members(3, t0);
    let mut run = run(2, 2, false, &[10]);
    let ring = first_ring(&mut run, &workers[..2], t0);
    let (a, b) = (workers[0].id, workers[1].id);
    // B is lost: A, whose neighbour is gone, is told to abort its rank at once (rather than
    // wait for the ring timeout); nothing else happens until it reports.
    let lost = run.on_lost(b, "session broke");
    let told = aborts(&lost);
    assert_eq!(told.len(), 1, "{lost:?}");
    assert_eq!(told.len(), lost.len(), "only the abort: {lost:?}");
    let (worker, collective_id, reason) = &told[0];
    assert_eq!(
        (*worker, collective_id.as_str()),
        (a, train(&ring[0].1).collective_id.as_str())
    );
    assert!(
        reason.contains("session broke") && reason.contains("rank 1"),
        "{reason}"
    );
    assert!(
        run.dispatch(&workers[..1], 4, t0).is_empty(),
        "A still running"
    );
    let actions = run.on_result(a, failed(&ring[0].1, "collective: peer gone", true, 3));
    let warned = warnings(&actions);
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(warned[0].contains(&b.to_string()), "{warned:?}");
    assert!(warned[0].contains("at step 3"), "{warned:?}");
    assert!(triggers(&actions).is_empty());
    // A worker that joined meanwhile does not take part; the survivor resumes at step 3.
    workers.remove(1);
    let again = sends(&run.dispatch(&workers, 5, t0));
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].0, a);
    let steps = train(&again[0].1);
    assert_eq!(
        (steps.rank, steps.world, steps.first_step, steps.last_step),
        (0, 1, 3, 9)
    );
    assert_ne!(steps.collective_id, train(&ring[0].1).collective_id);
    assert!(
        steps.collective_id.ends_with("ring-5-2"),
        "{}",
        steps.collective_id
    );
    let actions = run.on_result(a, ok(&again[0].1, &[], Vec::new()));
    assert_eq!(triggers(&actions), [Trigger::Trained { iteration: 0 }]);
    run.enter(JobState::Snapshot(0));
    assert_eq!(sends(&run.dispatch(&workers, 5, t0))[0].0, a);
}

#[test]
fn survivors_that_disagree_resume_from_the_fewest_steps() {
    let t0 = Instant::now();
    let workers = members(3, t0);
    let mut run = run(2, 2, false, &[10]);
    let ring = first_ring(&mut run, &workers, t0);
    run.on_lost(workers[2].id, "missed heartbeats");
    run.on_result(workers[0].id, failed(&ring[0].1, "peer gone", true, 4));
    let actions = run.on_result(workers[1].id, failed(&ring[1].1, "peer gone", true, 3));
    let warned = warnings(&actions);
    assert!(warned[0].contains("disagree"), "{warned:?}");
    let again = sends(&run.dispatch(&workers[..2], 9, t0));
    let firsts: Vec<(u32, u32, u64)> = again
        .iter()
        .map(|(_, t)| train(t))
        .map(|s| (s.rank, s.world, s.first_step))
        .collect();
    assert_eq!(firsts, [(0, 2, 3), (1, 2, 3)]);
}

#[test]
fn a_retryable_rank_failure_retries_but_not_forever() {
    let t0 = Instant::now();
    let workers = members(1, t0);
    let w = workers[0].id;
    let mut run = run(2, 2, false, &[10]);
    let mut ring = first_ring(&mut run, &workers, t0);
    // Progress resets the count; three rings in a row stuck at the same step fail the job.
    let actions = run.on_result(w, failed(&ring[0].1, "oom", true, 2));
    assert!(warnings(&actions)[0].contains("failed: oom"));
    for attempt in 1..=3 {
        ring = sends(&run.dispatch(&workers, 3, t0));
        assert_eq!(train(&ring[0].1).first_step, 2);
        let actions = run.on_result(w, failed(&ring[0].1, "oom", true, 0));
        if attempt < 3 {
            assert!(triggers(&actions).is_empty());
        } else {
            let t = triggers(&actions);
            let [Trigger::Fail { reason }] = t.as_slice() else {
                panic!("{t:?}")
            };
            assert!(reason.contains("no progress past step 2"), "{reason}");
        }
    }
}

#[test]
fn a_fatal_rank_failure_fails_the_job() {
    let t0 = Instant::now();
    let workers = members(2, t0);
    let mut run_a = run(2, 2, false, &[10]);
    let ring = first_ring(&mut run_a, &workers, t0);
    let t = triggers(&run_a.on_result(workers[1].id, failed(&ring[1].1, "nan loss", false, 1)));
    let [Trigger::Fail { reason }] = t.as_slice() else {
        panic!("{t:?}")
    };
    assert!(
        reason.contains("nan loss") && reason.contains("rank 1"),
        "{reason}"
    );
}

/// A training point of iteration 0 after `step` (none: theta_0), with `refused` newer ones.
fn point(step: Option<u64>, refused: &[(&str, &str)]) -> TrainingPoint {
    TrainingPoint {
        iteration: 0,
        checkpoint: step.map(|s| (PathBuf::from(format!("/ck/step-{s}")), s)),
        refused: refused
            .iter()
            .map(|(d, r)| (PathBuf::from(d), r.to_string()))
            .collect(),
    }
}

#[test]
fn every_replica_lost_waits_then_restarts_from_the_checkpoint_with_new_workers() {
    let t0 = Instant::now();
    let workers = members(4, t0);
    let (old, new) = workers.split_at(2);
    let mut run = run(2, 2, false, &[10]);
    let ring = first_ring(&mut run, old, t0);
    let lost = run.on_lost(old[0].id, "gone");
    assert_eq!(aborts(&lost).len(), lost.len(), "only aborts: {lost:?}");
    assert_eq!(
        aborts(&lost)[0].0,
        old[1].id,
        "the survivor is told at once"
    );
    let actions = run.on_lost(old[1].id, "session broke");
    assert!(aborts(&actions).is_empty(), "nobody is left to tell");
    assert!(triggers(&actions).is_empty(), "the job does not fail");
    let warned = warnings(&actions);
    assert!(
        warned[0].contains("every replica was lost") && warned[0].contains("session broke"),
        "{warned:?}"
    );
    assert_eq!(run.checkpoint_wanted(), Some(0));
    assert!(run.dispatch(new, 4, t0).is_empty(), "waits for the restore");
    // A late result of the lost ring changes nothing.
    assert!(run
        .on_result(old[0].id, ok(&ring[0].1, &[], Vec::new()))
        .is_empty());

    let actions = run.restore(&point(Some(4), &[("/ck/step-6", "no manifest")]));
    let warned = warnings(&actions);
    assert_eq!(warned.len(), 2, "{warned:?}");
    assert!(
        warned[0].contains("torn or corrupt checkpoint skipped: /ck/step-6: no manifest"),
        "{warned:?}"
    );
    assert!(warned[1].contains("resuming from step 5"), "{warned:?}");
    assert!(warned[1].contains("/ck/step-4"), "{warned:?}");
    assert_eq!(run.checkpoint_wanted(), None);
    assert!(run.restore(&point(Some(4), &[])).is_empty(), "stale");
    let again = sends(&run.dispatch(new, 5, t0));
    let shape: Vec<(WorkerId, u32, u32, u64, u64)> = again
        .iter()
        .map(|(w, t)| {
            let s = train(t);
            (*w, s.rank, s.world, s.first_step, s.last_step)
        })
        .collect();
    assert_eq!(
        shape,
        [(new[0].id, 0, 2, 5, 9), (new[1].id, 1, 2, 5, 9)],
        "every connected worker, from the checkpoint"
    );
    run.on_result(again[1].0, ok(&again[1].1, &[], Vec::new()));
    let actions = run.on_result(again[0].0, ok(&again[0].1, &[], Vec::new()));
    assert_eq!(triggers(&actions), [Trigger::Trained { iteration: 0 }]);
}

#[test]
fn restarts_from_the_store_that_make_no_progress_fail_the_job_at_the_third() {
    let t0 = Instant::now();
    let workers = members(1, t0);
    let w = workers[0].id;
    let mut run = run(2, 2, false, &[10]);
    first_ring(&mut run, &workers, t0);
    for attempt in 1..=3 {
        run.on_lost(w, "oom killed");
        let actions = run.restore(&point(None, &[]));
        if attempt < 3 {
            assert!(warnings(&actions)[0].contains("resuming from step 0 of 10 with theta_0"));
            let ring = sends(&run.dispatch(&workers, 3, t0));
            assert_eq!(train(&ring[0].1).first_step, 0);
        } else {
            let t = triggers(&actions);
            let [Trigger::Fail { reason }] = t.as_slice() else {
                panic!("{t:?}")
            };
            assert!(reason.contains("no progress past step 0"), "{reason}");
            assert!(reason.contains("oom killed"), "{reason}");
        }
    }
}

#[test]
fn survivors_lost_before_their_next_ring_also_restart_from_the_store() {
    let t0 = Instant::now();
    let workers = members(2, t0);
    let mut run = run(2, 2, false, &[10]);
    let ring = first_ring(&mut run, &workers, t0);
    run.on_lost(workers[1].id, "gone");
    run.on_result(workers[0].id, failed(&ring[0].1, "peer gone", true, 3));
    // The survivor is lost too before the ring re-forms.
    let actions = run.on_lost(workers[0].id, "missed heartbeats");
    assert!(warnings(&actions)[0].contains("every replica was lost"));
    assert_eq!(run.checkpoint_wanted(), Some(0));
    // A checkpoint at the last step: the iteration is trained, and any worker snapshots it.
    let actions = run.restore(&point(Some(9), &[]));
    assert_eq!(triggers(&actions), [Trigger::Trained { iteration: 0 }]);
    run.enter(JobState::Snapshot(0));
    let newcomer = members(1, t0);
    let sent = sends(&run.dispatch(&newcomer, 4, t0));
    assert_eq!(sent[0].0, newcomer[0].id);
}

#[test]
fn a_job_resumed_in_a_shard_phase_hands_out_only_the_missing_shards() {
    let t0 = Instant::now();
    let workers = members(1, t0);
    let mut run = run(10, 3, true, &[4]);
    let actions = run.resume(
        JobState::Preparing,
        Found::Shards {
            done: vec![0, 2, 4],
        },
    );
    assert!(
        warnings(&actions)[0].contains("3 of 5 shard(s)"),
        "{actions:?}"
    );
    assert!(
        events(&actions).contains(&Event::Shards(v1::ShardsProgress {
            phase: Some(JobState::Preparing.into()),
            done: 3,
            total: 5
        }))
    );
    let (sent, _, trigger) = finish_phase(&mut run, &workers, t0);
    assert_eq!(trigger, Trigger::Prepared);
    let shards: Vec<(u32, bool)> = sent
        .iter()
        .map(|(_, t)| match &t.kind {
            Some(Kind::Encode(e)) => (e.shard, e.held_out),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(shards, [(1, false), (3, false)]);

    // Every sampling shard written already: the phase ends at once.
    let mut run = self::run(10, 3, true, &[4]);
    let actions = run.resume(
        JobState::Sampling(0),
        Found::Shards {
            done: vec![0, 1, 2, 3],
        },
    );
    assert_eq!(triggers(&actions), [Trigger::Sampled { iteration: 0 }]);
}

#[test]
fn a_job_resumed_in_training_forms_its_ring_from_the_checkpoint() {
    let t0 = Instant::now();
    let workers = members(2, t0);
    let mut run = run(2, 2, false, &[4, 3]);
    let actions = run.resume(JobState::Training(0), Found::Training(point(Some(1), &[])));
    let warned = warnings(&actions);
    assert!(
        warned[0].contains("goes on from its store") && warned[0].contains("step 2"),
        "{warned:?}"
    );
    assert!(triggers(&actions).is_empty());
    let ring = sends(&run.dispatch(&workers, 2, t0));
    let firsts: Vec<(u32, u64, u64)> = ring
        .iter()
        .map(|(_, t)| train(t))
        .map(|s| (s.world, s.first_step, s.last_step))
        .collect();
    assert_eq!(firsts, [(2, 2, 3), (2, 2, 3)]);
    // Past the last step: trained at once.
    let mut run = self::run(2, 2, false, &[4, 3]);
    let actions = run.resume(JobState::Training(0), Found::Training(point(Some(3), &[])));
    assert_eq!(triggers(&actions), [Trigger::Trained { iteration: 0 }]);
}

#[test]
fn a_job_resumed_in_snapshot_publishes_a_verified_one_or_writes_it() {
    let t0 = Instant::now();
    let workers = members(2, t0);
    let dir = PathBuf::from("/store/jobs/j/iteration-1");
    let mut run = run(2, 2, false, &[4]);
    let actions = run.resume(
        JobState::Snapshot(0),
        Found::Snapshot {
            dir: dir.clone(),
            verified: Ok(()),
        },
    );
    assert_eq!(
        events(&actions),
        [Event::SnapshotPublished(v1::SnapshotPublished {
            iteration: 0,
            path: dir.display().to_string()
        })]
    );
    assert_eq!(
        triggers(&actions),
        [Trigger::SnapshotPublished { iteration: 0 }]
    );
    let mut run = self::run(2, 2, false, &[4]);
    let actions = run.resume(
        JobState::Snapshot(0),
        Found::Snapshot {
            dir,
            verified: Err(Some("unet/x does not match".into())),
        },
    );
    assert!(warnings(&actions)[0].contains("does not match"));
    let sent = sends(&run.dispatch(&workers, 2, t0));
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, workers[0].id, "the first worker writes it");
}

#[test]
fn the_snapshot_moves_to_the_next_replica_when_its_writer_is_lost() {
    let t0 = Instant::now();
    let workers = members(2, t0);
    let mut run = run(2, 2, false, &[1]);
    let ring = first_ring(&mut run, &workers, t0);
    for (w, task) in &ring {
        run.on_result(*w, ok(task, &[], Vec::new()));
    }
    run.enter(JobState::Snapshot(0));
    let sent = sends(&run.dispatch(&workers, 3, t0));
    assert_eq!(sent[0].0, workers[0].id);
    assert!(run.on_lost(workers[0].id, "gone").is_empty());
    let sent = sends(&run.dispatch(&workers[1..], 4, t0));
    assert_eq!(sent[0].0, workers[1].id);
    // With no replica left, a worker that did not train writes it from the last checkpoint.
    let warned = warnings(&run.on_lost(workers[1].id, "gone"));
    assert!(warned[0].contains("last checkpoint"), "{warned:?}");
    let newcomer = members(1, t0);
    let sent = sends(&run.dispatch(&newcomer, 5, t0));
    assert_eq!(sent[0].0, newcomer[0].id);
    // Without outputs the path is the layout's.
    let actions = run.on_result(newcomer[0].id, ok(&sent[0].1, &[], Vec::new()));
    assert_eq!(
        events(&actions),
        [Event::SnapshotPublished(v1::SnapshotPublished {
            iteration: 0,
            path: "/store/jobs/j/iteration-1".into()
        })]
    );
}

#[test]
fn plans_come_from_the_spec_and_the_prompt_counts() {
    let spec = parse_spec(
        "[model]\nbase = \"b\"\n[data]\ntrain = [\"d\"]\n[sampling]\nshard_size = 4\n\
         [[iteration]]\nlr = 1e-5\nsteps = 3\n[[iteration]]\nlr = 1e-5\nsteps = 5\n",
    )
    .unwrap();
    let plan = Plan::new(&spec, 10, 2, PathBuf::from("/s/jobs/j")).unwrap();
    assert_eq!((plan.shards.len(), plan.encode_shards()), (3, 4));
    assert_eq!(plan.steps, [3, 5]);
    assert_eq!(plan.seed, spec.seed);
    let plan = Plan::new(&spec, 10, 0, PathBuf::from("/s/jobs/j")).unwrap();
    assert_eq!(plan.encode_shards(), 3);
}
