//! `spinctl resume` refuses, with exit code 2 and the reason, a job that has not failed and a
//! job that does not exist. A failed job resumed with real processes to the weights of a run
//! that never failed is `full_disk.rs`; resuming across a coordinator restart, behind a running
//! job and from the newest checkpoint is `coordinator/tests/resume.rs`.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Output;
use std::time::Duration;

use common::process::{self, run_with_timeout};
use common::server::Server;
use spin_common::proto::v1;
use spin_coordinator::CoordinatorConfig;

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
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
