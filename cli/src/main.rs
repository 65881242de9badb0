//! `spinctl`: the spin-diffusion command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use spin_cli::{client, demo, init_tracing, sample, train};
use spin_common::tls::TlsSettings;

/// spin-diffusion: SPIN-Diffusion fine-tuning of diffusers text-to-image models.
#[derive(Parser, Debug)]
#[command(name = "spinctl", version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// The coordinator that submit, status, list, cancel, resume and logs talk to.
    #[arg(long, global = true, env = "SPIN_COORDINATOR", default_value = client::DEFAULT_COORDINATOR)]
    coordinator: String,
    /// The coordinator's API token, sent on every call (prefer SPIN_TOKEN: a flag shows in the
    /// process list).
    #[arg(
        long,
        global = true,
        env = "SPIN_TOKEN",
        default_value = "",
        hide_default_value = true,
        hide_env_values = true
    )]
    token: String,
    /// CA certificate (PEM) that verifies an https:// coordinator (an address without a scheme
    /// is then dialled over https).
    #[arg(long, global = true, env = "SPIN_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a coordinator that requires one (mutual TLS); with
    /// --tls-key.
    #[arg(long, global = true, env = "SPIN_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, global = true, env = "SPIN_TLS_KEY")]
    tls_key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Submit a job spec to the coordinator; prints the job id.
    Submit(client::SubmitArgs),
    /// One job in detail, or every job as a table.
    Status(client::StatusArgs),
    /// Every job, newest first: id, name, phase, workers, latest step and loss, submitted.
    List,
    /// Cancel a job; prints its phase afterwards.
    Cancel(client::CancelArgs),
    /// Resume a failed job from what its store holds (its newest verified checkpoint) once the
    /// cause of the failure is gone; prints the phase it is back in.
    Resume(client::ResumeArgs),
    /// A job's events: phases, progress, workers, snapshots, evaluations, how it ended.
    Logs(client::LogsArgs),
    /// Run a small SPIN job on the synthetic dataset, start to end, in this process.
    Demo(demo::DemoArgs),
    /// Generate images from a diffusers pipeline folder with DDIM.
    Sample(sample::SampleArgs),
    /// Run a SPIN job: `--local` runs the whole self-play loop in this process.
    Train(train::TrainArgs),
    /// Write the synthetic shapes dataset (Pick-a-Pic schema) as parquet shards.
    MakeToyDataset(train::ToyDatasetArgs),
    /// Write a randomly initialised pixel-space toy pipeline (the SFT starting point).
    InitToyModel(train::ToyModelArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log_format);
    // Read only by the commands that talk to the coordinator.
    let remote = || {
        let tls = TlsSettings::load(
            cli.tls_ca.as_deref(),
            cli.tls_cert.as_deref(),
            cli.tls_key.as_deref(),
            ["--tls-cert", "--tls-key"],
        )?;
        client::Remote::new(&cli.coordinator, &cli.token.as_str().into(), tls)
    };
    let done = |result: anyhow::Result<()>| result.map(|()| ExitCode::SUCCESS);
    let result = match cli.command {
        Command::Submit(args) => remote().and_then(|r| client::submit(&r, args)),
        Command::Status(args) => remote().and_then(|r| client::status(&r, args)),
        Command::List => remote().and_then(|r| client::list(&r)),
        Command::Cancel(args) => remote().and_then(|r| client::cancel(&r, args)),
        Command::Resume(args) => remote().and_then(|r| client::resume(&r, args)),
        Command::Logs(args) => remote().and_then(|r| client::logs(&r, args)),
        Command::Demo(args) => done(demo::run(args)),
        Command::Sample(args) => done(sample::run(args)),
        Command::Train(args) => done(train::run(args)),
        Command::MakeToyDataset(args) => done(train::make_toy_dataset(args)),
        Command::InitToyModel(args) => done(train::init_toy_model(args)),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
