//! `spinctl`: the spin-diffusion command line.

use clap::{Parser, Subcommand};
use spin_cli::{demo, init_tracing, sample, train};

/// spin-diffusion: SPIN-Diffusion fine-tuning of diffusers text-to-image models.
#[derive(Parser, Debug)]
#[command(name = "spinctl", version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
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

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log_format);
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Sample(args) => sample::run(args),
        Command::Train(args) => train::run(args),
        Command::MakeToyDataset(args) => train::make_toy_dataset(args),
        Command::InitToyModel(args) => train::init_toy_model(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::from(2)
        }
    }
}
