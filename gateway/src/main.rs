use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meshgate_gateway::synth::{SynthSpec, synthesise};

/// meshgate: one GraphQL API over a research consortium's imaging stores.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a synthetic partner: DICOM files and a ground-truth manifest.
    Synth {
        #[arg(long)]
        partner: String,
        #[arg(long, default_value_t = 100)]
        studies: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Synth {
            partner,
            studies,
            seed,
            out,
        } => {
            match synthesise(
                &SynthSpec {
                    partner,
                    studies,
                    seed,
                },
                &out,
            ) {
                Ok(rows) => {
                    println!("wrote {} studies to {}", rows.len(), out.display());
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("error: {error}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
