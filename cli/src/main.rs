//! `spinctl`: the spin-diffusion command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use spin_cli::{client, demo, init_tracing, sample, train};

/// spin-diffusion: SPIN-Diffusion fine-tuning of diffusers text-to-image models.
#[derive(Parser, Debug)]
#[command(name = "spinctl", version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// The coordinator that submit, status, list, cancel and logs talk to.
    #[arg(long, global = true, env = "SPIN_COORDINATOR", default_value = client::DEFAULT_COORDINATOR)]
    coordinator: String,
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
    let url = client::normalize_url(&cli.coordinator);
    let done = |result: anyhow::Result<()>| result.map(|()| ExitCode::SUCCESS);
    let result = match cli.command {
        Command::Submit(args) => client::submit(&url, args),
        Command::Status(args) => client::status(&url, args),
        Command::List => client::list(&url),
        Command::Cancel(args) => client::cancel(&url, args),
        Command::Logs(args) => client::logs(&url, args),
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
