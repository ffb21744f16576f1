//! The `meshgate` command. See `meshgate --help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use meshgate_gateway::config::{Config, ProcessEnvironment};
use meshgate_gateway::dev_issuer::DevIssuer;
use meshgate_gateway::synth::{SynthSpec, synthesise};
use meshgate_gateway::telemetry::{self, TelemetrySection};
use meshgate_gateway::{LoadedConfig, audit, build_app, demo, graphql, registry, run, start};
use tokio::net::TcpListener;

/// The request path allocates many small strings, maps and vectors from
/// several threads at once; mimalloc serves those with less contention and
/// fragmentation than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Ask a running gateway to reload its configuration and policies
    /// through its `[reload] control_socket`, after checking `--config`
    /// as `config check` does. Exit code 0 when the new configuration is in
    /// force, 1 when the gateway refused it (the running one stays), 2 when
    /// it is invalid here or the gateway cannot be reached.
    Reload {
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
    /// Run a DEVELOPMENT token issuer on loopback and print one token:
    /// lines `issuer URL`, `jwks_url URL`, `token JWT`. For local testing
    /// and benchmarks only; stops on Ctrl-C or SIGTERM.
    DevIssuer {
        /// Claims to add to iss, aud (`meshgate`), iat, nbf and exp, as JSON.
        #[arg(long, default_value = "{}")]
        claims: String,
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: u64,
    },
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Print the GraphQL schema (SDL).
    Schema,
    /// Partner tools.
    Partners {
        #[command(subcommand)]
        command: PartnersCommand,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the audit log's hash chain and its signed checkpoints (the
    /// store's, and the published checkpoint file or `--checkpoints`).
    /// Exit code 0 when intact, 1 naming the first bad record, 2 when the
    /// configuration is invalid or the log cannot be read.
    Verify {
        #[arg(long)]
        config: PathBuf,
        /// A copy of published checkpoints (JSON lines), kept outside the
        /// gateway; default: the configured checkpoint file, if any.
        #[arg(long)]
        checkpoints: Option<PathBuf>,
    },
    /// Make a new Ed25519 checkpoint key (PKCS#8 PEM) for `[audit]
    /// checkpoint_key`: written to `--out` readable by its owner only
    /// (mode 0600, never over an existing file), or printed.
    Keygen {
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum PartnersCommand {
    /// Connect to every configured partner, probe what it supports, and
    /// print a table: reachable, authenticated, latency, capabilities.
    /// Exit code 1 when a partner fails its check, 2 when the
    /// configuration is invalid.
    Check {
        #[arg(long)]
        config: PathBuf,
        /// How long to wait for each partner.
        #[arg(long, default_value_t = 20)]
        timeout_seconds: u64,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Run policy test cases (TOML files of expected decisions) against the
    /// policies, partners and projects of a configuration. Exit code 1 when
    /// a case fails, 2 when the configuration or a policy is invalid.
    Test {
        #[arg(long)]
        config: PathBuf,
        /// A case file, or a folder of them.
        cases: PathBuf,
    },
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
    // `serve` exports traces as its configuration says; it installs the
    // subscriber once that is loaded.
    if !matches!(cli.command, Command::Serve { .. })
        && let Err(error) = telemetry::init(&TelemetrySection::default())
    {
        eprintln!("error: logging could not be set up: {error}");
    }
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
        Command::Policy {
            command: PolicyCommand::Test { config, cases },
        } => policy_test(&config, &cases),
        Command::Audit {
            command:
                AuditCommand::Verify {
                    config,
                    checkpoints,
                },
        } => run_to_exit(audit_verify(config, checkpoints)),
        Command::Audit {
            command: AuditCommand::Keygen { out },
        } => match audit::new_checkpoint_key_pem() {
            Ok(pem) => match out {
                None => {
                    print!("{pem}");
                    ExitCode::SUCCESS
                }
                Some(path) => match audit::write_key_file(&path, pem.as_bytes()) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => {
                        eprintln!("error: cannot write {}: {error}", path.display());
                        ExitCode::FAILURE
                    }
                },
            },
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Partners {
            command:
                PartnersCommand::Check {
                    config,
                    timeout_seconds,
                },
        } => run_to_exit(partners_check(config, Duration::from_secs(timeout_seconds))),
        Command::DevIssuer {
            claims,
            ttl_seconds,
        } => block_on(dev_issuer(claims, ttl_seconds)),
        Command::Serve { config } => {
            let loaded = match Config::load(&config, &ProcessEnvironment) {
                Ok(loaded) => loaded,
                Err(error) => {
                    eprintln!("error: {error}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let telemetry = match telemetry::init(&loaded.config.telemetry) {
                Ok(telemetry) => telemetry,
                Err(error) => {
                    eprintln!("error: telemetry could not be set up: {error}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let exit = block_on(serve(loaded, Instant::now(), false));
            telemetry.shutdown();
            exit
        }
        Command::Demo {
            data,
            listen,
            studies,
        } => block_on(run_demo(data, listen, studies)),
        Command::Reload { config } => run_to_exit(reload(config)),
    }
}

async fn audit_verify(config: PathBuf, checkpoints: Option<PathBuf>) -> ExitCode {
    let loaded = match Config::load(&config, &ProcessEnvironment) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let started = Instant::now();
    let store = match audit::Store::open(&loaded.audit.store).await {
        Ok(store) => store,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let file = checkpoints.or(loaded.audit.checkpoint_file.clone());
    let mut external = Vec::new();
    if let Some(file) = &file {
        match std::fs::read_to_string(file) {
            Ok(text) => {
                for (number, line) in text.lines().enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    match serde_json::from_str::<audit::Checkpoint>(line) {
                        Ok(checkpoint) => external.push(checkpoint),
                        Err(_) => {
                            eprintln!("error: {}:{}: not a checkpoint", file.display(), number + 1);
                            return ExitCode::from(EXIT_CONFIG);
                        }
                    }
                }
            }
            // No checkpoint published yet is not an error; a named file
            // that cannot be read is.
            Err(error)
                if error.kind() == std::io::ErrorKind::NotFound
                    && checkpoints_optional(&loaded, file) => {}
            Err(error) => {
                eprintln!("error: {}: {error}", file.display());
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    let key = loaded.audit.signing_key.verifying_key();
    match audit::verify(&store, &key, &external).await {
        Ok(report) => {
            let elapsed = started.elapsed();
            match report.first_bad {
                None => {
                    println!(
                        "intact: {} records, {} checkpoints checked in {:.1} s",
                        report.entries,
                        report.checkpoints,
                        elapsed.as_secs_f64()
                    );
                    ExitCode::SUCCESS
                }
                Some(finding) => {
                    println!(
                        "TAMPERED: first bad record {}: {}",
                        finding.seq, finding.reason
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// Whether `file` is the configured checkpoint file (which may not exist
/// yet), rather than one named on the command line.
fn checkpoints_optional(loaded: &meshgate_gateway::LoadedConfig, file: &std::path::Path) -> bool {
    loaded.audit.checkpoint_file.as_deref() == Some(file)
}

async fn partners_check(config: PathBuf, timeout: Duration) -> ExitCode {
    let loaded = match Config::load(&config, &ProcessEnvironment) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut partners = Vec::new();
    for index in 0..loaded.config.partners.len() {
        match meshgate_gateway::assemble::build_partner(&loaded, index).await {
            Ok(partner) => partners.push(Arc::new(partner)),
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    let checks = meshgate_gateway::partner::check_partners(&partners, timeout).await;
    print!("{}", meshgate_gateway::checks::table(&checks));
    if checks.iter().all(|check| check.outcome.is_ok()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn policy_test(config: &std::path::Path, cases: &std::path::Path) -> ExitCode {
    let loaded = match Config::load(config, &ProcessEnvironment) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let files = match meshgate_policies::cases::load(cases) {
        Ok(files) => files,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_default();
    let results = meshgate_policies::cases::run(&loaded.authorizer, &files, now);
    let failed = results.iter().filter(|r| r.failure.is_some()).count();
    for result in &results {
        match &result.failure {
            None => println!("ok      {}", result.name),
            Some(failure) => println!(
                "FAILED  {} ({}): {failure}",
                result.name,
                result.file.display()
            ),
        }
    }
    println!(
        "\n{} cases: {} passed, {failed} failed",
        results.len(),
        results.len() - failed
    );
    if failed == 0 && !results.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn block_on(task: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    run_to_exit(async {
        match task.await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// How much lower the query threads' scheduling priority is.
const WORK_NICENESS: i32 = 5;

fn run_to_exit(task: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    // Queries run on these threads, at a lower scheduling priority than
    // the threads that accept connections and answer health checks and
    // refusals (see `server::run`), so that a machine saturated with queries
    // still answers those at once. Linux sets `nice` per thread.
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(|| {
            let _ = rustix::process::setpriority_process(None, WORK_NICENESS);
        })
        .build()
    {
        Ok(runtime) => runtime.block_on(task),
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn dev_issuer(claims: String, ttl_seconds: u64) -> anyhow::Result<()> {
    let claims: serde_json::Value =
        serde_json::from_str(&claims).context("--claims must be a JSON object")?;
    anyhow::ensure!(claims.is_object(), "--claims must be a JSON object");
    let issuer = DevIssuer::start(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    println!("issuer {}", issuer.issuer());
    println!("jwks_url {}", issuer.jwks_url());
    println!(
        "token {}",
        issuer.token(&claims, std::time::Duration::from_secs(ttl_seconds))
    );
    shutdown_signal().await;
    Ok(())
}

async fn run_demo(data: PathBuf, listen: SocketAddr, studies: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let issuer = DevIssuer::start(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let loaded = demo::prepare(
        &data,
        listen,
        studies,
        &demo::DemoIssuer::from(&issuer),
        &ProcessEnvironment,
    )?;
    println!(
        "DEVELOPMENT token issuer (loopback only, never for real data): {}",
        issuer.issuer()
    );
    println!("Tokens, valid for 8 hours:");
    for (who, token) in demo::tokens(&issuer, std::time::Duration::from_secs(8 * 3600)) {
        println!("\n  {who}:\n  {token}");
    }
    println!();
    serve(loaded, started, true).await
}

async fn serve(loaded: LoadedConfig, started: Instant, demo: bool) -> anyhow::Result<()> {
    let hangups = registry::hangups().context("cannot handle SIGHUP")?;
    let gateway = start(&loaded).await?;
    gateway.registry.current().authenticator.warm_up().await;
    // Reloads: on SIGHUP, when the files change (`[reload] watch`), and
    // when `meshgate reload` asks on the control socket.
    registry::reload_on_hangup(hangups, &gateway.registry);
    if loaded.config.reload.watch {
        registry::watch(&gateway.registry);
    }
    if let Some(socket) = &loaded.config.reload.control_socket {
        registry::serve_control_socket(Arc::clone(&gateway.registry), socket)
            .await
            .with_context(|| format!("cannot listen on {}", socket.display()))?;
    }
    let listener = meshgate_gateway::server::listen(loaded.config.listen)
        .with_context(|| format!("cannot listen on {}", loaded.config.listen))?;
    let address = listener.local_addr()?;
    println!(
        "meshgate listening on http://{address}/graphql (ready in {} ms)",
        started.elapsed().as_millis()
    );
    if demo {
        println!(
            "\nOpen http://{address}/graphql in a browser (GraphiQL), add the header\n  \
             {{\"Authorization\": \"Bearer <the researcher token>\"}}\nand try:\n\n{}\n",
            demo::SAMPLE_QUERY
        );
    }
    if let Some(metrics_address) = loaded.config.metrics.listen {
        let metrics = TcpListener::bind(metrics_address)
            .await
            .with_context(|| format!("cannot listen on {metrics_address} for /metrics"))?;
        let router = meshgate_gateway::app::metrics_router(Arc::clone(&gateway.registry));
        println!("metrics on http://{}/metrics", metrics.local_addr()?);
        tokio::spawn(async move { axum::serve(metrics, router).await });
    }
    let server = gateway.server;
    let (tally, audit) = (Arc::clone(&gateway.auth_failures), gateway.audit());
    run(listener, build_app(gateway), &server, shutdown_signal()).await?;
    // Failed authentications counted and not yet recorded go in the log
    // before the process ends.
    meshgate_gateway::app::record_failed_authentications(
        &tally,
        &audit,
        &meshgate_gateway::app::exit_on_audit_storage_failure(),
        true,
    )
    .await;
    Ok(())
}

async fn reload(config: PathBuf) -> ExitCode {
    let loaded = match Config::load(&config, &ProcessEnvironment) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let Some(socket) = loaded.config.reload.control_socket else {
        eprintln!(
            "error: {} sets no [reload] control_socket; set one (and restart), or send SIGHUP to the gateway",
            config.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    match registry::request_reload(&socket).await {
        Ok((200, answer)) => {
            let reloaded = &answer["reloaded"];
            println!(
                "reloaded: snapshot {}",
                reloaded["snapshot"].as_str().unwrap_or("?")
            );
            for what in ["added", "changed", "removed", "kept"] {
                let ids: Vec<&str> = reloaded[what]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|id| id.as_str())
                    .collect();
                if !ids.is_empty() {
                    println!("  {what}: {}", ids.join(", "));
                }
            }
            ExitCode::SUCCESS
        }
        Ok((_, answer)) => {
            eprintln!(
                "refused ({}): {}",
                answer["code"].as_str().unwrap_or("?"),
                answer["message"].as_str().unwrap_or("?")
            );
            eprintln!("the running configuration stays in force");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!(
                "error: cannot reach the gateway at {}: {error}",
                socket.display()
            );
            ExitCode::from(EXIT_CONFIG)
        }
    }
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
