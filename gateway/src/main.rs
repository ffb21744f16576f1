//! The `meshgate` command. See `meshgate --help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use meshgate_gateway::config::{Config, ProcessEnvironment};
use meshgate_gateway::synth::{SynthSpec, synthesise};
use meshgate_gateway::{LoadedConfig, build_app, demo, federation, graphql, run};
use tokio::net::TcpListener;

/// meshgate: one GraphQL API over a research consortium's imaging stores.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway with a configuration file.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Synthesise three partners (first run only) and run a gateway over them.
    Demo {
        /// Where the demo partners' data lives.
        #[arg(long, default_value = "demo-data")]
        data: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Studies per partner when synthesising.
        #[arg(long, default_value_t = 300)]
        studies: usize,
    },
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
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print the GraphQL schema (SDL).
    Schema,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Check a configuration file; exit code 2 when it is invalid.
    Check { file: PathBuf },
}

/// Exit code for configuration errors.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Schema => {
            print!("{}", graphql::sdl());
            ExitCode::SUCCESS
        }
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
        Command::Config {
            command: ConfigCommand::Check { file },
        } => match Config::load(&file, &ProcessEnvironment) {
            Ok(loaded) => {
                println!(
                    "{}: ok ({} partners)",
                    file.display(),
                    loaded.config.partners.len()
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Serve { config } => {
            let loaded = match Config::load(&config, &ProcessEnvironment) {
                Ok(loaded) => loaded,
                Err(error) => {
                    eprintln!("error: {error}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            serve(loaded, Instant::now(), false)
        }
        Command::Demo {
            data,
            listen,
            studies,
        } => {
            let started = Instant::now();
            match demo::prepare(&data, listen, studies, &ProcessEnvironment) {
                Ok(loaded) => serve(loaded, started, true),
                Err(error) => {
                    eprintln!("error: {error}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn serve(loaded: LoadedConfig, started: Instant, demo: bool) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve_async(loaded, started, demo)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_async(loaded: LoadedConfig, started: Instant, demo: bool) -> anyhow::Result<()> {
    let federation = federation(&loaded).await?;
    let listener = TcpListener::bind(loaded.config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", loaded.config.listen))?;
    let address = listener.local_addr()?;
    println!(
        "meshgate listening on http://{address}/graphql (ready in {} ms)",
        started.elapsed().as_millis()
    );
    if demo {
        println!(
            "\nOpen http://{address}/graphql in a browser (GraphiQL) and try:\n\n{}\n",
            demo::SAMPLE_QUERY
        );
    }
    run(listener, build_app(federation), shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down: draining in-flight requests");
}
