//! `spinctl submit`, `status`, `list`, `cancel`, `resume` and `logs`: the commands that talk
//! to a coordinator's `JobService`. Exit codes: 0 success (and `logs` of a job that is done or
//! still running), 1 a job that failed or was cancelled (`logs`, `submit --follow`, `resume
//! --follow`), 2 anything refused: a bad spec, an unknown job, a job that cannot be resumed,
//! an unreachable coordinator, a refused token. Every call
//! carries the API token of the [`Remote`], over TLS to an `https://` coordinator.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use spin_common::ids::JobId;
use spin_common::proto::v1;
use spin_common::spec::{JobSpec, RawJobSpec};

use crate::connect::refused;
pub use crate::connect::{
    connect, connect_to, normalize_url, JobClient, Remote, DEFAULT_COORDINATOR,
};
use crate::logs::{self, format_utc, phase_label, FollowOptions, Outcome, Style};

/// Arguments of `spinctl submit`.
#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    /// The job spec (TOML); relative paths in it are relative to this file.
    spec: PathBuf,
    /// After printing the id, print the job's events until it ends (as `logs --follow`).
    #[arg(long)]
    follow: bool,
}

/// Arguments of `spinctl status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The job; every job as a table when omitted.
    job: Option<JobId>,
}

/// Arguments of `spinctl cancel`.
#[derive(clap::Args, Debug)]
pub struct CancelArgs {
    /// The job.
    job: JobId,
}

/// Arguments of `spinctl resume`.
#[derive(clap::Args, Debug)]
pub struct ResumeArgs {
    /// The job (a failed one).
    job: JobId,
    /// Then print the resumed run's events until the job ends (as `logs --follow`).
    #[arg(long)]
    follow: bool,
}

/// Arguments of `spinctl logs`.
#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// The job.
    job: JobId,
    /// Keep printing until the job ends, reconnecting if the coordinator restarts.
    #[arg(long)]
    follow: bool,
    /// First event sequence number to print.
    #[arg(long, default_value_t = 0)]
    from: u64,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the tokio runtime")
}

/// The spec at `path` as it is submitted: read with the `SPIN_JOB__*` overrides of `env`,
/// written back as TOML with every path made absolute against the spec file's folder (so the
/// job means the same thing wherever it runs), then checked with [`JobSpec::from_submitted`],
/// the parse the coordinator and the workers apply to it. An absent `job.output` becomes the
/// default `spin-runs` beside the spec.
pub fn submission_toml(path: &Path, env: &HashMap<String, String>) -> anyhow::Result<String> {
    let raw = RawJobSpec::load(path, &RawJobSpec::overrides_from_env(env))?;
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = std::path::absolute(parent.unwrap_or(Path::new(".")))
        .with_context(|| format!("resolving the folder of {}", path.display()))?;
    let raw = absolute_paths(raw, &dir);
    let text = toml::to_string(&raw)
        .with_context(|| format!("writing {} back as TOML", path.display()))?;
    // The coordinator and the workers read exactly this text this way: refuse it here first.
    JobSpec::from_submitted(&text).with_context(|| format!("job spec {}", path.display()))?;
    Ok(text)
}

/// `raw` with `job.output`, `model.base` and each `data.train` entry resolved against `dir`.
fn absolute_paths(mut raw: RawJobSpec, dir: &Path) -> RawJobSpec {
    let resolve = |p: &Path| dir.join(p);
    let output = raw
        .job
        .output
        .take()
        .unwrap_or_else(|| PathBuf::from("spin-runs"));
    raw.job.output = Some(resolve(&output));
    raw.model.base = resolve(&raw.model.base);
    raw.data.train = raw.data.train.iter().map(|p| resolve(p)).collect();
    raw
}

/// Runs `spinctl submit`: prints the new job's id alone on a line, then follows it if asked.
pub fn submit(remote: &Remote, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let url = remote.url();
    let env: HashMap<String, String> = std::env::vars().collect();
    let spec_toml = submission_toml(&args.spec, &env)?;
    runtime()?.block_on(async {
        let mut client = connect_to(remote).await?;
        let id = client
            .submit_job(v1::SubmitJobRequest { spec_toml })
            .await
            .map_err(|s| refused(url, &format!("submitting {}", args.spec.display()), &s))?
            .into_inner()
            .job_id;
        println!("{id}");
        if !args.follow {
            return Ok(ExitCode::SUCCESS);
        }
        watch(url, &mut client, &id, true, 0).await
    })
}

/// Runs `spinctl status`: one job in detail, or the table of all.
pub fn status(remote: &Remote, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let url = remote.url();
    runtime()?.block_on(async {
        let mut client = connect_to(remote).await?;
        match args.job {
            Some(job) => {
                let status = get_job(url, &mut client, job).await?;
                print!("{}", status_detail(&status));
            }
            None => print!("{}", jobs_table(&list_jobs(url, &mut client).await?)),
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Runs `spinctl list`: the table of every job, newest first.
pub fn list(remote: &Remote) -> anyhow::Result<ExitCode> {
    let url = remote.url();
    runtime()?.block_on(async {
        let mut client = connect_to(remote).await?;
        print!("{}", jobs_table(&list_jobs(url, &mut client).await?));
        Ok(ExitCode::SUCCESS)
    })
}

/// Runs `spinctl cancel`: prints the job's phase after the request.
pub fn cancel(remote: &Remote, args: CancelArgs) -> anyhow::Result<ExitCode> {
    let url = remote.url();
    runtime()?.block_on(async {
        let mut client = connect_to(remote).await?;
        let phase = client
            .cancel_job(v1::CancelJobRequest {
                job_id: args.job.to_string(),
            })
            .await
            .map_err(|s| refused(url, &format!("cancelling job {}", args.job), &s))?
            .into_inner()
            .phase;
        println!("{}", phase_label(phase.as_ref()));
        Ok(ExitCode::SUCCESS)
    })
}

/// Runs `spinctl resume`: asks the coordinator to go on with a failed job from what its store
/// holds, prints the phase it is back in, whether it waits for another job, and where its
/// resumed run's events start; then follows them if asked.
pub fn resume(remote: &Remote, args: ResumeArgs) -> anyhow::Result<ExitCode> {
    let url = remote.url();
    runtime()?.block_on(async {
        let mut client = connect_to(remote).await?;
        let id = args.job.to_string();
        let resumed = client
            .resume_job(v1::ResumeJobRequest { job_id: id.clone() })
            .await
            .map_err(|s| refused(url, &format!("resuming job {id}"), &s))?
            .into_inner();
        print!("{}", resumed_text(&id, &resumed));
        if !args.follow {
            return Ok(ExitCode::SUCCESS);
        }
        // From the resume on: the failure before it is not the end of this run.
        watch(url, &mut client, &id, true, resumed.from_sequence).await
    })
}

/// What `spinctl resume` prints for job `id` resumed as `resumed` says.
pub fn resumed_text(id: &str, resumed: &v1::ResumeJobResponse) -> String {
    let phase = phase_label(resumed.phase.as_ref());
    let start = if resumed.running_job_id.is_empty() {
        "it starts as soon as enough workers are connected".to_string()
    } else {
        format!("it starts once job {} ends", resumed.running_job_id)
    };
    format!(
        "job {id} resumed: FAILED -> {phase} (the phase it failed in), going on from what its \
         store holds; {start}\nits events from #{seq}: spinctl logs {id} --follow --from {seq}\n",
        seq = resumed.from_sequence
    )
}

/// Runs `spinctl logs`.
pub fn logs(remote: &Remote, args: LogsArgs) -> anyhow::Result<ExitCode> {
    let url = remote.url();
    runtime()?.block_on(async {
        let mut client = connect_to(remote).await?;
        watch(
            url,
            &mut client,
            &args.job.to_string(),
            args.follow,
            args.from,
        )
        .await
    })
}

/// Prints job `id`'s events to stdout ([`logs::follow`] or [`logs::show`]) and turns how the
/// job ended into the exit code, telling stderr why a job failed or was cancelled.
async fn watch(
    url: &str,
    client: &mut JobClient,
    id: &str,
    follow: bool,
    from_sequence: u64,
) -> anyhow::Result<ExitCode> {
    let opts = FollowOptions {
        style: Style::for_stdout(),
        from_sequence,
        ..FollowOptions::default()
    };
    let mut out = std::io::stdout();
    let outcome = if follow {
        logs::follow(client, id, &mut out, &opts).await
    } else {
        logs::show(client, id, &mut out, &opts).await
    }
    .with_context(|| format!("coordinator at {url}"))?;
    match &outcome {
        Outcome::Failed { error } => eprintln!("error: job {id} failed: {error}"),
        Outcome::Cancelled { reason } if reason.is_empty() => {
            eprintln!("job {id} was cancelled")
        }
        Outcome::Cancelled { reason } => eprintln!("job {id} was cancelled: {reason}"),
        Outcome::Done { .. } | Outcome::Running { .. } => {}
    }
    Ok(ExitCode::from(outcome.exit_code()))
}

async fn get_job(url: &str, client: &mut JobClient, job: JobId) -> anyhow::Result<v1::JobStatus> {
    Ok(client
        .get_job(v1::GetJobRequest {
            job_id: job.to_string(),
        })
        .await
        .map_err(|s| refused(url, &format!("getting job {job}"), &s))?
        .into_inner())
}

async fn list_jobs(url: &str, client: &mut JobClient) -> anyhow::Result<Vec<v1::JobStatus>> {
    Ok(client
        .list_jobs(v1::ListJobsRequest {})
        .await
        .map_err(|s| refused(url, "listing jobs", &s))?
        .into_inner()
        .jobs)
}

/// `12/50` and `0.6931` for the latest step, dashes before training reported any.
fn step_and_loss(last: Option<&v1::StepMetrics>) -> (String, String) {
    match last {
        Some(m) => (
            format!("k={} {}/{}", m.iteration, m.step + 1, m.steps),
            format!("{:.4}", m.loss),
        ),
        None => ("-".into(), "-".into()),
    }
}

/// Every job as an aligned table, one row each, in the order given.
pub fn jobs_table(jobs: &[v1::JobStatus]) -> String {
    if jobs.is_empty() {
        return "no jobs\n".into();
    }
    let header = [
        "ID",
        "NAME",
        "PHASE",
        "WORKERS",
        "STEP",
        "LOSS",
        "SUBMITTED",
    ]
    .map(String::from);
    let mut rows = vec![header.to_vec()];
    for job in jobs {
        let (step, loss) = step_and_loss(job.last_step.as_ref());
        rows.push(vec![
            job.job_id.clone(),
            job.name.clone(),
            phase_label(job.phase.as_ref()),
            job.workers.to_string(),
            step,
            loss,
            format_utc(job.submitted_at_ms),
        ]);
    }
    table(&rows)
}

/// `rows` with each column padded to its widest cell.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, &width)| format!("{cell:<width$}"))
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    text
}

/// One job, a field per line.
pub fn status_detail(job: &v1::JobStatus) -> String {
    let mut rows = vec![
        ("job", job.job_id.clone()),
        ("name", job.name.clone()),
        ("phase", phase_label(job.phase.as_ref())),
        ("iterations", job.iterations.to_string()),
        ("workers", job.workers.to_string()),
        ("submitted", format_utc(job.submitted_at_ms)),
        ("updated", format_utc(job.updated_at_ms)),
    ];
    if let Some(m) = &job.last_step {
        let (step, loss) = step_and_loss(Some(m));
        rows.push((
            "last step",
            format!(
                "{step} loss {loss} lr {:.2e} grad norm {:.3} {:.1} img/s",
                m.lr, m.grad_norm, m.images_per_sec
            ),
        ));
    }
    if !job.error.is_empty() {
        rows.push(("error", job.error.clone()));
    }
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|(k, v)| vec![k.to_string(), v])
        .collect();
    table(&rows)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn write_spec(name: &str, text: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("spinctl-client-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("job.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    const SPEC: &str = "[job]\nname = \"toy\"\n[model]\nbase = \"base\"\n[data]\ntrain = [\"data/a.parquet\", \"/abs/b\"]\n[training]\nobjective = \"spin-exact\"\n[[iteration]]\nlr = 2e-5\nsteps = 50\n";

    #[test]
    fn submitted_specs_carry_absolute_paths_and_overrides() {
        let path = write_spec("abs", SPEC);
        let dir = path.parent().unwrap();
        let env = HashMap::from([
            (
                "SPIN_JOB__TRAINING__BATCH_SIZE".to_string(),
                "3".to_string(),
            ),
            ("UNRELATED".to_string(), "x".to_string()),
        ]);
        let text = submission_toml(&path, &env).unwrap();
        // The coordinator parses it the way it parses any submission.
        let spec = JobSpec::from_submitted(&text).unwrap();
        assert_eq!(spec.base_model, dir.join("base"));
        assert_eq!(
            spec.train_data,
            vec![dir.join("data/a.parquet"), PathBuf::from("/abs/b")]
        );
        assert_eq!(spec.output, dir.join("spin-runs"));
        assert_eq!(spec.training.batch_size, 3);
        assert_eq!(spec.name, "toy");
        assert_eq!(
            spec.training.objective,
            spin_common::spec::Objective::SpinExact
        );
        assert_eq!(spec.iterations[0].lr, 2e-5);
    }

    #[test]
    fn every_path_field_is_resolved_against_the_folder() {
        let raw = absolute_paths(
            RawJobSpec {
                job: spin_common::spec::RawJob {
                    output: Some("out".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
            Path::new("/specs"),
        );
        assert_eq!(raw.job.output, Some(PathBuf::from("/specs/out")));
        assert_eq!(raw.model.base, PathBuf::from("/specs/"));
    }

    #[test]
    fn bad_specs_are_refused_before_any_connection() {
        let path = write_spec("bad", &format!("{SPEC}batch_sise = 4\n"));
        let err = format!("{:#}", submission_toml(&path, &HashMap::new()).unwrap_err());
        assert!(err.contains("batch_sise"), "{err}");
        let path = write_spec("range", &SPEC.replace("steps = 50", "steps = 0"));
        let err = format!("{:#}", submission_toml(&path, &HashMap::new()).unwrap_err());
        assert!(err.contains("iteration[0].steps"), "{err}");
    }

    #[test]
    fn resume_says_the_phase_what_it_waits_for_and_where_its_events_start() {
        let mut resumed = v1::ResumeJobResponse {
            phase: Some(v1::Phase {
                kind: v1::PhaseKind::Training as i32,
                iteration: 1,
            }),
            from_sequence: 42,
            running_job_id: String::new(),
        };
        let text = resumed_text("j-1", &resumed);
        assert_eq!(
            text,
            "job j-1 resumed: FAILED -> TRAINING k=1 (the phase it failed in), going on from \
             what its store holds; it starts as soon as enough workers are connected\n\
             its events from #42: spinctl logs j-1 --follow --from 42\n"
        );
        resumed.running_job_id = "j-0".into();
        let text = resumed_text("j-1", &resumed);
        assert!(text.contains("it starts once job j-0 ends"), "{text}");
    }

    #[test]
    fn tables_align_and_show_the_latest_step() {
        let job = v1::JobStatus {
            job_id: "id-1".into(),
            name: "toy".into(),
            phase: Some(v1::Phase {
                kind: v1::PhaseKind::Training as i32,
                iteration: 1,
            }),
            submitted_at_ms: 0,
            workers: 2,
            last_step: Some(v1::StepMetrics {
                iteration: 1,
                step: 9,
                steps: 50,
                loss: 0.5,
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = jobs_table(std::slice::from_ref(&job));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].starts_with("ID    NAME  PHASE         WORKERS  STEP"),
            "{text}"
        );
        assert!(
            lines[1]
                .starts_with("id-1  toy   TRAINING k=1  2        k=1 10/50  0.5000  1970-01-01"),
            "{text}"
        );
        assert_eq!(jobs_table(&[]), "no jobs\n");
        let detail = status_detail(&job);
        assert!(detail.contains("phase       TRAINING k=1"), "{detail}");
        assert!(
            detail.contains("last step   k=1 10/50 loss 0.5000"),
            "{detail}"
        );
        assert!(!detail.contains("error"), "{detail}");
    }
}
