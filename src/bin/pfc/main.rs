//! `pfc`: train a PartialFC head on synthetic identities, plan a deployment's memory and
//! communication, or benchmark its training step.

mod bench;
mod plan;
mod records;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "pfc", version, about = "PartialFC classification-head runtime: train a head on synthetic identities, plan per-GPU memory and communication, benchmark steps against the reference (CPU backend, or CUDA on a GPU)")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Train a head and a small backbone end to end on synthetic identities (the default command).
    Train(train::TrainArgs),
    /// Time training steps, side by side with the reference PartialFC_V2 when it is available.
    Bench(bench::BenchArgs),
    /// Per-GPU memory and communication of one step: data parallel vs model parallel vs PartialFC, exact to the byte.
    Plan(plan::PlanArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or_else(|| Command::Train(train::TrainArgs::parse_from(["train"]))) {
        Command::Train(args) => train::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Plan(args) => plan::run(args),
    };
    if let Err(e) = result {
        eprintln!("pfc: error: {e}");
        std::process::exit(1);
    }
}
