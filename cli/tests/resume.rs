//! `spinctl resume` with real processes: a job is running on two workers when the coordinator
//! is killed (SIGKILL) and the volume holding the job's dataset goes away; the coordinator,
//! started again, cannot go on with the job and fails it naming the dataset. Once the volume
//! is back, `spinctl resume JOB --follow` resumes it from its newest verified checkpoint (not
//! from step 0) and follows it to the end, and its final UNet is the one the uninterrupted
//! run made, within 1e-5 relative L2. A second test: `spinctl resume` refuses, with exit code
//! 2, a job that has not failed and a job that does not exist.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::process::{self, cluster_logs, run_with_timeout, Guard};
use common::server::Server;
use common::Shape;
use spin_common::proto::v1::{self, job_event::Event};
use spin_coordinator::CoordinatorConfig;

const UNET: &str = "unet/diffusion_pytorch_model.safetensors";

fn shape() -> Shape {
    Shape {
        iterations: 2,
        steps: 6,
        batch: 2,
        accumulation: 2,
        checkpoint_every: 2,
        // The paper's learning rate (see chaos.rs on why the tolerance scales with it).
        lr: 2e-5,
    }
}

/// Job `job`'s events at `url` from sequence `from`, until a step of iteration `k` at or past
/// `step` (when `stop_at` is `Some((k, step))`) or the job's final event, whichever is first.
async fn events(
    url: &str,
    job: &str,
    from: u64,
    stop_at: Option<(u32, u64)>,
    deadline: Instant,
) -> Vec<Event> {
    let seen = process::follow(url, job, from, deadline, |event| {
        matches!((&event.event, stop_at), (Some(Event::Step(m)), Some((k, step))) if m.iteration == k && m.step >= step)
    })
    .await;
    seen.into_iter().filter_map(|e| e.event).collect()
}

fn warnings(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Warning(w) => Some(w.message.clone()),
            _ => None,
        })
        .collect()
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The `N` of the `its events from #N` line `spinctl resume` prints.
fn from_sequence(stdout: &str) -> u64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("its events from #"))
        .unwrap_or_else(|| panic!("no events line in {stdout:?}"));
    let number = line.trim_start_matches("its events from #");
    number[..number.find(':').unwrap()].parse().unwrap()
}

#[test]
fn a_failed_job_resumed_by_spinctl_goes_on_from_its_checkpoint_to_the_same_weights() {
    let (_, base) = common::toy_inputs();
    let dir = common::temp_dir("resume");
    // The job's own copy of the toy data, on a "volume" the test can take away.
    let data = dir.join("data");
    spin_common::toy::write_toy_dataset(&data, 48, 5).unwrap();
    let spec_text = common::spec(&data, base, &dir.join("reference"), &shape());
    common::run_reference(&dir, &spec_text);

    let (coordinator, url) = process::coordinator(&dir, "127.0.0.1:0", 2);
    let listen = url.trim_start_matches("http://").to_string();
    let _workers: Vec<Guard> = (0..2)
        .map(|i| process::worker(&url, &dir, &format!("worker-{i}.log"), 5))
        .collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let job = process::submit(&runtime, &url, &spec_text);
    let early = runtime.block_on(events(&url, &job, 0, Some((0, 3)), deadline));
    assert!(
        matches!(early.last(), Some(Event::Step(_))),
        "the job ended before the kill: {early:?}\n{}",
        cluster_logs(&dir, 2)
    );

    // The coordinator dies and comes back while the dataset's volume is gone.
    drop(coordinator);
    let away = dir.join("data-unmounted");
    std::fs::rename(&data, &away).unwrap();
    let (_coordinator, url2) = process::coordinator(&dir, &listen, 2);
    assert_eq!(url2, url);
    let failed = runtime.block_on(events(&url, &job, 0, None, deadline));
    let error = match failed.last() {
        Some(Event::Failed(f)) => f.error.clone(),
        other => panic!("not failed: {other:?}\n{}", cluster_logs(&dir, 2)),
    };
    assert!(
        error.contains(&data.display().to_string()),
        "the failure does not name the dataset: {error}"
    );

    // The volume is back: resume from the newest checkpoint the store verifies.
    std::fs::rename(&away, &data).unwrap();
    let job_dir = dir.join("store/jobs").join(&job);
    let (found, _) = spin_common::checkpoint::latest_verified(&job_dir, 0);
    let step = found
        .expect("no verified checkpoint of iteration 0")
        .state
        .step;
    let mut resume = process::spinctl(&url);
    resume.args(["resume", &job, "--follow"]);
    let ran = run_with_timeout(resume, Duration::from_secs(300));
    let logs = || format!("{}\n{}", text(&ran), cluster_logs(&dir, 2));
    assert_eq!(ran.status.code(), Some(0), "{}", logs());
    let stdout = String::from_utf8_lossy(&ran.stdout).to_string();
    assert!(
        stdout.contains(&format!(
            "job {job} resumed: FAILED -> TRAINING k=0 (the phase it failed in)"
        )),
        "{}",
        logs()
    );
    assert!(stdout.contains("done: final model at"), "{}", logs());

    // The resumed run, as its events tell it: it started after the checkpoint, not at 0.
    let from = from_sequence(&stdout);
    let after = runtime.block_on(events(&url, &job, from, None, deadline));
    assert!(matches!(after.last(), Some(Event::Done(_))), "{after:?}");
    let warned = warnings(&after);
    assert!(
        warned
            .iter()
            .any(|w| w.contains("job resumed by a ResumeJob request from 127.0.0.1")),
        "{warned:#?}"
    );
    let name = format!("step-{step:08}");
    assert!(
        warned.iter().any(
            |w| w.contains(&format!("resuming from step {} of 6", step + 1)) && w.contains(&name)
        ),
        "no event says training resumed after {name}: {warned:#?}\n{}",
        logs()
    );
    let first_step = after.iter().find_map(|e| match e {
        Event::Step(m) if m.iteration == 0 => Some(m.step),
        _ => None,
    });
    if step + 1 < 6 {
        assert_eq!(first_step, Some(step + 1), "{}", logs());
    } else {
        assert_eq!(first_step, None, "iteration 0 was trained already");
    }

    let ours = job_dir.join("iteration-2").join(UNET);
    let reference = dir.join("reference/iteration-2").join(UNET);
    let rel = common::relative_l2(&ours, &reference);
    println!("resumed after step {step}; relative L2 to the uninterrupted run: {rel:e}");
    assert!(rel <= 1e-5, "relative L2 {rel:e}\n{}", logs());
}

#[test]
fn spinctl_resume_refuses_a_job_that_has_not_failed_or_does_not_exist() {
    let dir = common::temp_dir("resume-refused");
    let server = Server::start(
        CoordinatorConfig {
            journal_path: dir.join("journal.redb"),
            store: dir.join("store").display().to_string(),
            tick_interval: Duration::from_millis(50),
            ..CoordinatorConfig::default()
        },
        "127.0.0.1:0",
    );
    let url = server.url();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // No worker: the job stays pending.
    let spec = "[job]\nname = \"waits\"\n[model]\nbase = \"base\"\n[data]\ntrain = [\"data\"]\n\
                [[iteration]]\nlr = 2e-5\nsteps = 5\n";
    let job = process::submit(&runtime, &url, spec);
    let resume = |job: &str| {
        let mut command = process::spinctl(&url);
        command.args(["resume", job]);
        run_with_timeout(command, Duration::from_secs(20))
    };
    let refused = |ran: &Output, needles: &[&str]| {
        assert_eq!(ran.status.code(), Some(2), "{}", text(ran));
        let stderr = String::from_utf8_lossy(&ran.stderr);
        for needle in needles {
            assert!(stderr.contains(needle), "no {needle:?} in {}", text(ran));
        }
        assert!(ran.stdout.is_empty(), "{}", text(ran));
    };
    refused(
        &resume(&job),
        &[
            &format!("resuming job {job}"),
            "a job that is pending (only a failed job can be resumed)",
            "FailedPrecondition",
        ],
    );
    let mut cancel = process::spinctl(&url);
    cancel.args(["cancel", &job]);
    let cancelled = run_with_timeout(cancel, Duration::from_secs(20));
    assert_eq!(cancelled.status.code(), Some(0), "{}", text(&cancelled));
    refused(
        &resume(&job),
        &["a job that is cancelled", "FailedPrecondition"],
    );
    let stranger = spin_common::ids::JobId::new().to_string();
    refused(
        &resume(&stranger),
        &[&format!("job {stranger} is not known"), "NotFound"],
    );
    // Nothing changed: the job is still cancelled.
    let status = runtime.block_on(async {
        let mut client = spin_cli::client::connect(&url).await.unwrap();
        client
            .get_job(v1::GetJobRequest {
                job_id: job.clone(),
            })
            .await
            .unwrap()
            .into_inner()
    });
    assert_eq!(status.phase.unwrap().kind, v1::PhaseKind::Cancelled as i32);
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
