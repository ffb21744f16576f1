//! The partner registry: the partners, their connectors, the policies,
//! projects and trusted issuers in force, as one immutable [`Snapshot`]
//! swapped atomically by a reload. A request takes the snapshot current
//! when it arrives and runs entirely on it, so its partner set, decisions
//! and audit record all come from one configuration, never a mix.
//!
//! A reload ([`Registry::reload`]) reads the configuration file and its
//! policy files again and rebuilds only what changed: an unchanged
//! partner keeps its connector (connection pool, measured capabilities),
//! its circuit breaker and its cached answers; a changed partner starts
//! fresh and a removed one's cached answers are dropped. An invalid
//! configuration or policy is refused with the same file:line errors as
//! `meshgate config check`, and the running snapshot keeps serving.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::assemble::{build_partner, check_and_watch};
use crate::audit::AuditLog;
use crate::auth::Authenticator;
use crate::cache::AnswerCache;
use crate::config::{Config, ConfigError, Fingerprints, LoadedConfig, ProcessEnvironment};
use crate::federation::Federation;
use crate::graphql::Services;
use crate::metrics::METRICS;
use crate::partner::Partner;

/// One configuration in force: what every request that started on it uses.
#[derive(Debug)]
pub struct Snapshot {
    pub services: Services,
    pub authenticator: Arc<Authenticator>,
    pub fingerprints: Fingerprints,
    /// When it came into force.
    pub since: SystemTime,
}

impl Snapshot {
    /// The content hash of its configuration and policy texts, which audit
    /// records and the API name.
    pub fn hash(&self) -> &str {
        &self.fingerprints.snapshot
    }
}

/// The snapshot in force, and how to replace it.
#[derive(Debug)]
pub struct Registry {
    current: RwLock<Arc<Snapshot>>,
    /// The configuration file a reload reads…
    source: PathBuf,
    /// …with these connector kinds.
    kinds: Vec<meshgate_connectors::kind::Kind>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    /// The watched files as the last reload (or start-up) found them, so
    /// that a refused change is not tried again until the files change.
    seen: Mutex<String>,
}

/// How often the watched files are compared with what was last loaded.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Reloaded {
    /// The hash of the snapshot now in force.
    pub snapshot: String,
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    /// Partners kept as they were (connector, breaker and cache entries).
    pub kept: Vec<String>,
    /// Whether the issuers were rebuilt.
    pub issuers_changed: bool,
}

/// Why a reload was refused; the running snapshot keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The configuration or a policy file is not valid (file:line).
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    /// A part read at start-up only changed.
    #[error(
        "{} changed; {} read at start-up only: restart the gateway to apply the change",
        .0.join(", "),
        if .0.len() == 1 { "it is" } else { "they are" }
    )]
    NeedsRestart(Vec<String>),
    /// A partner's connector or the issuers could not be built.
    #[error("{0}")]
    Build(String),
}

impl ReloadError {
    /// A stable code for the refusal.
    pub fn code(&self) -> &'static str {
        match self {
            ReloadError::Invalid(_) => "CONFIG_INVALID",
            ReloadError::NeedsRestart(_) => "RESTART_REQUIRED",
            ReloadError::Build(_) => "CONFIG_UNUSABLE",
        }
    }
}

impl Registry {
    /// A registry whose first snapshot is `loaded`'s, with `audit`: every
    /// partner built and probed (see [`check_and_watch`]).
    pub async fn start(
        loaded: &LoadedConfig,
        audit: Arc<AuditLog>,
    ) -> Result<Registry, crate::app::StartError> {
        let mut partners = Vec::with_capacity(loaded.config.partners.len());
        for index in 0..loaded.config.partners.len() {
            partners.push(Arc::new(build_partner(loaded, index).await?));
        }
        check_and_watch(&partners).await;
        tracing::info!(
            policies = loaded.authorizer.policy_count(),
            snapshot = %loaded.fingerprints.snapshot,
            "policies loaded"
        );
        let services = Services {
            federation: Federation::new(
                partners,
                AnswerCache::new(loaded.config.cache),
                Default::default(),
            ),
            authorizer: Arc::clone(&loaded.authorizer),
            pseudonym_key: loaded.pseudonym_key.clone(),
            audit,
            // At least one largest page, so that one can always be asked.
            studies_in_flight: Arc::new(tokio::sync::Semaphore::new(
                loaded
                    .config
                    .server
                    .max_studies_in_flight
                    .max(crate::graphql::MAX_PAGE_SIZE as usize),
            )),
        };
        let snapshot = Snapshot {
            services,
            authenticator: Arc::new(Authenticator::new(loaded.issuers.clone())?),
            fingerprints: loaded.fingerprints.clone(),
            since: SystemTime::now(),
        };
        METRICS.snapshot_in_force(snapshot.services.federation.partners().len());
        Ok(Registry {
            seen: Mutex::new(on_disk(&snapshot.fingerprints.watched)),
            current: RwLock::new(Arc::new(snapshot)),
            source: loaded.file.clone(),
            kinds: loaded.kinds.clone(),
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    /// The snapshot in force now.
    pub fn current(&self) -> Arc<Snapshot> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Reads the configuration and policies again and puts them in force,
    /// rebuilding only what changed; refused (and counted) when they are
    /// not valid or change a part read at start-up only.
    pub async fn reload(&self) -> Result<Reloaded, ReloadError> {
        let _one_at_a_time = self.reloading.lock().await;
        let before = on_disk(&self.current().fingerprints.watched);
        let outcome = self.rebuild().await;
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = match &outcome {
            Ok(_) => on_disk(&self.current().fingerprints.watched),
            Err(_) => before,
        };
        match &outcome {
            Ok(reloaded) => {
                METRICS.reload(true);
                tracing::info!(
                    snapshot = %reloaded.snapshot,
                    added = reloaded.added.len(),
                    changed = reloaded.changed.len(),
                    removed = reloaded.removed.len(),
                    kept = reloaded.kept.len(),
                    "configuration reloaded"
                );
            }
            Err(error) => {
                METRICS.reload(false);
                tracing::error!(code = error.code(), %error, "configuration reload refused; the running configuration stays in force");
            }
        }
        outcome
    }

    async fn rebuild(&self) -> Result<Reloaded, ReloadError> {
        let old = self.current();
        let loaded = Config::load_with(&self.source, &ProcessEnvironment, &self.kinds)?;
        let fingerprints = &loaded.fingerprints;
        let mut restart: Vec<String> = old
            .fingerprints
            .sections
            .keys()
            .chain(fingerprints.sections.keys())
            .filter(|key| old.fingerprints.sections.get(*key) != fingerprints.sections.get(*key))
            .map(|key| {
                if key == "listen" {
                    "listen".to_owned()
                } else {
                    format!("[{key}]")
                }
            })
            .collect();
        restart.sort();
        restart.dedup();
        if !restart.is_empty() {
            return Err(ReloadError::NeedsRestart(restart));
        }
        let mut reloaded = Reloaded {
            snapshot: fingerprints.snapshot.clone(),
            ..Reloaded::default()
        };
        let mut partners: Vec<Arc<Partner>> = Vec::with_capacity(loaded.config.partners.len());
        let mut fresh = Vec::new();
        for (index, config) in loaded.config.partners.iter().enumerate() {
            let id = config.id.get_ref();
            let unchanged = old.fingerprints.partners.get(id) == fingerprints.partners.get(id);
            match old.services.federation.partner(id).filter(|_| unchanged) {
                Some(partner) => {
                    reloaded.kept.push(id.clone());
                    partners.push(Arc::clone(partner));
                }
                None => {
                    let partner = build_partner(&loaded, index)
                        .await
                        .map_err(|error| ReloadError::Build(error.to_string()))?;
                    if old.services.federation.partner(id).is_some() {
                        reloaded.changed.push(id.clone());
                    } else {
                        reloaded.added.push(id.clone());
                    }
                    let partner = Arc::new(partner);
                    fresh.push(Arc::clone(&partner));
                    partners.push(partner);
                }
            }
        }
        let authenticator = if old.fingerprints.auth == fingerprints.auth {
            Arc::clone(&old.authenticator)
        } else {
            reloaded.issuers_changed = true;
            let authenticator = Arc::new(
                Authenticator::new(loaded.issuers.clone())
                    .map_err(|error| ReloadError::Build(error.to_string()))?,
            );
            // The new issuers' keys before they serve, as at start-up.
            authenticator.warm_up().await;
            authenticator
        };
        // New and changed partners are probed before they serve, as at
        // start-up.
        check_and_watch(&fresh).await;
        let federation = &old.services.federation;
        for partner in federation.partners() {
            if !reloaded.kept.contains(&partner.id) {
                if !reloaded.changed.contains(&partner.id) {
                    reloaded.removed.push(partner.id.clone());
                }
                federation
                    .cache()
                    .forget_partner(&partner.id, partner.generation);
            }
        }
        let services = crate::graphql::Services {
            federation: Federation::new(
                partners,
                federation.cache().clone(),
                federation.budgets().clone(),
            ),
            authorizer: Arc::clone(&loaded.authorizer),
            // Read at start-up only ([deidentification], [server]).
            pseudonym_key: old.services.pseudonym_key.clone(),
            audit: Arc::clone(&old.services.audit),
            studies_in_flight: Arc::clone(&old.services.studies_in_flight),
        };
        let snapshot = Arc::new(Snapshot {
            services,
            authenticator,
            fingerprints: loaded.fingerprints.clone(),
            since: SystemTime::now(),
        });
        METRICS.snapshot_in_force(snapshot.services.federation.partners().len());
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = snapshot;
        Ok(reloaded)
    }
}

/// What the watched files and folders hold now, hashed: each file's text,
/// each folder's `*.cedar` files with theirs (a missing one counts too).
fn on_disk(watched: &[PathBuf]) -> String {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    let mut add = |path: &Path| {
        hasher.update(path.as_os_str().as_encoded_bytes());
        match std::fs::read(path) {
            Ok(bytes) => {
                hasher.update((bytes.len() as u64).to_be_bytes());
                hasher.update(bytes);
            }
            Err(_) => hasher.update(b"-"),
        }
    };
    for path in watched {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .into_iter()
                .flatten()
                .flatten()
                .map(|entry| entry.path())
                .filter(|p| p.extension().is_some_and(|e| e == "cedar"))
                .collect();
            found.sort();
            found.iter().for_each(|file| add(file));
        } else {
            add(path);
        }
    }
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Reloads `registry` whenever its watched files change, checked every
/// [`WATCH_INTERVAL`]; ends with the registry.
pub fn watch(registry: &Arc<Registry>) {
    let registry = Arc::downgrade(registry);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(WATCH_INTERVAL).await;
            let Some(registry) = registry.upgrade() else {
                return;
            };
            let watched = registry.current().fingerprints.watched.clone();
            let now = tokio::task::spawn_blocking(move || on_disk(&watched))
                .await
                .unwrap_or_default();
            let changed = *registry.seen.lock().unwrap_or_else(PoisonError::into_inner) != now;
            if changed {
                tracing::info!("the configuration or a policy file changed on disk; reloading");
                let _ = registry.reload().await;
            }
        }
    });
}

/// `SIGHUP`s from now on (no longer the end of the process), for
/// [`reload_on_hangup`]: taken before start-up, so that one sent while the
/// gateway starts is not fatal.
#[cfg(unix)]
pub fn hangups() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

/// Reloads `registry` on every `SIGHUP` of `hangups`; ends with the registry.
#[cfg(unix)]
pub fn reload_on_hangup(mut hangups: tokio::signal::unix::Signal, registry: &Arc<Registry>) {
    let registry = Arc::downgrade(registry);
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let Some(registry) = registry.upgrade() else {
                return;
            };
            tracing::info!("SIGHUP: reloading the configuration");
            let _ = registry.reload().await;
        }
    });
}

/// A reload's outcome as the control socket answers it: `200` with what
/// changed, or `422` with the refusal's code and message (file:line).
pub fn outcome_response(outcome: &Result<Reloaded, ReloadError>) -> Response {
    match outcome {
        Ok(reloaded) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({"outcome": "applied", "reloaded": reloaded})),
        )
            .into_response(),
        Err(error) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(serde_json::json!({
                "outcome": "refused",
                "code": error.code(),
                "message": error.to_string(),
            })),
        )
            .into_response(),
    }
}

/// Serves `POST /reload` on the Unix socket at `path` (made readable and
/// writable by the gateway's user only; a stale one is replaced), for
/// `meshgate reload`.
#[cfg(unix)]
pub async fn serve_control_socket(registry: Arc<Registry>, path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let router = axum::Router::new().route(
        "/reload",
        axum::routing::post(move || {
            let registry = Arc::clone(&registry);
            async move { outcome_response(&registry.reload().await) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(())
}

/// Asks the gateway listening on the control socket at `path` to reload:
/// the HTTP status and the JSON answer.
#[cfg(unix)]
pub async fn request_reload(path: &Path) -> std::io::Result<(u16, serde_json::Value)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::UnixStream::connect(path).await?;
    stream
        .write_all(
            b"POST /reload HTTP/1.1\r\nHost: meshgate\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer);
    let invalid = || std::io::Error::other("the gateway's answer is not HTTP");
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(invalid)?;
    let (_, body) = text.split_once("\r\n\r\n").ok_or_else(invalid)?;
    Ok((status, serde_json::from_str(body).map_err(|_| invalid())?))
}
