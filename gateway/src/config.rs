//! The gateway's one configuration file: TOML, typed with serde, unknown
//! fields refused, credentials only as `${env:NAME}` / `${file:PATH}`
//! references expanded at load time, and every error reported with file,
//! line and column — rendered from the unexpanded text, so no secret value
//! can appear in an error.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use meshgate_connectors::Secret;
use meshgate_connectors::kind::{self, ConnectorConfig, Kind, Setting};
use meshgate_policies::{
    Authorizer, CountControl, MasterKey, PartnerFacts, PolicyConfig, PolicyFile, ProjectFacts,
};
use meshgate_schema::Role;
use serde::Deserialize;

use crate::admission::RateLimit;
use toml::Spanned;

use crate::audit::{AuditSettings, StoreLocation};
use crate::auth::{
    Allowed, ClaimNames, DEFAULT_ALGORITHMS, DEFAULT_TOKEN_TYPES, IssuerSettings, Trust,
};
use crate::budget::BudgetConfig;
use crate::cache::CacheConfig;
use crate::limits::QueryLimits;
use crate::protection::ProtectionConfig;
use crate::telemetry::TelemetrySection;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the gateway listens, e.g. `127.0.0.1:8080`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Who may call: the trusted token issuers. Required: there is no
    /// anonymous access.
    pub auth: AuthSection,
    /// The consortium's Cedar policies.
    pub policies: PoliciesSection,
    pub deidentification: DeidentificationSection,
    /// The tamper-evident audit log.
    pub audit: AuditSection,
    /// How the HTTP server protects itself.
    #[serde(default)]
    pub server: ServerSection,
    /// How partners' answers are cached.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Where traces are exported.
    #[serde(default)]
    pub telemetry: TelemetrySection,
    /// Who may read `/metrics`.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// How a running gateway takes a changed configuration.
    #[serde(default)]
    pub reload: ReloadSection,
    /// The consortium's registered research projects.
    #[serde(default)]
    pub projects: Vec<ProjectConfig>,
    /// The consortium's partners, one connector each.
    pub partners: Vec<PartnerConfig>,
}

/// `[auth]`: trusted issuers of bearer tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    pub issuers: Vec<IssuerConfig>,
}

/// `[[auth.issuers]]`: one OIDC issuer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The exact `iss` of its tokens.
    pub issuer: String,
    /// Accepted `aud` values; a token must name one of them.
    pub audiences: Vec<String>,
    /// The issuer's JWKS: https, or http on a loopback address.
    pub jwks_url: Spanned<String>,
    /// Allowed signing algorithms (default: RS256/384/512, PS256/384/512,
    /// ES256/384, EdDSA). HMAC algorithms are refused.
    #[serde(default)]
    pub algorithms: Option<Spanned<Vec<String>>>,
    /// Accepted `typ` headers when a token states one (default: JWT, at+jwt).
    #[serde(default)]
    pub token_types: Option<Vec<String>>,
    /// Clock skew allowed on `exp` and `nbf`, at most 300 seconds.
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,
    /// Refuse tokens without `nbf` (default: true).
    #[serde(default = "default_true")]
    pub require_nbf: bool,
    /// The longest a token may be valid: `exp` less `iat` (or less now,
    /// without `iat`). Default 86,400 (24 hours).
    #[serde(default = "default_max_token_lifetime")]
    pub max_token_lifetime_seconds: u64,
    #[serde(default)]
    pub claims: ClaimsConfig,
    /// What this issuer is believed about: the institutions, roles,
    /// projects and data-use permissions its tokens may assert. Required:
    /// a claim outside these lists is dropped, so an issuer trusted for one
    /// institution cannot speak for another.
    pub trusted_for: TrustConfig,
    /// Least seconds between two JWKS fetches (unknown `kid`s trigger one).
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_interval_seconds: u64,
    /// Keys older than this are fetched again before use.
    #[serde(default = "default_jwks_max_age")]
    pub jwks_max_age_seconds: u64,
}

fn default_leeway() -> u64 {
    30
}
fn default_true() -> bool {
    true
}
fn default_max_token_lifetime() -> u64 {
    24 * 3600
}
fn default_jwks_refresh() -> u64 {
    30
}
fn default_jwks_max_age() -> u64 {
    600
}

/// `trusted_for`: the values an issuer may assert, each list exact values
/// or `"*"` for any. Empty (the default of each): nothing of that kind.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrustConfig {
    pub institutions: Vec<String>,
    pub roles: Vec<String>,
    pub projects: Vec<String>,
    pub permissions: Vec<String>,
}

/// Which claims carry the principal's attributes (dotted paths allowed).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClaimsConfig {
    pub institution: String,
    pub roles: String,
    pub projects: String,
    pub permissions: String,
}

impl Default for ClaimsConfig {
    fn default() -> Self {
        let names = ClaimNames::default();
        ClaimsConfig {
            institution: names.institution,
            roles: names.roles,
            projects: names.projects,
            permissions: names.permissions,
        }
    }
}

/// `[policies]`: the consortium's Cedar policy files or folders of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoliciesSection {
    pub consortium: Vec<PathBuf>,
}

/// `[deidentification]`: the master key of keyed pseudonyms.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeidentificationSection {
    /// At least 32 bytes, as `${env:NAME}` or `${file:PATH}`.
    pub key: SecretRef,
}

/// `[metrics]`: who may read the Prometheus metrics. With neither key,
/// `/metrics` is not served at all: metrics say how busy and healthy each
/// partner is, which is not for whoever reaches the API port.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// A listener of its own serving only `/metrics`, without a token
    /// (bind it to an address only the scraper reaches).
    pub listen: Option<SocketAddr>,
    /// `/metrics` on the API listener, for `Authorization: Bearer` with
    /// this token (`${env:NAME}` or `${file:PATH}`).
    pub token: Option<SecretRef>,
}

/// `[reload]`: how a running gateway takes a changed configuration. It
/// always reloads on `SIGHUP`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadSection {
    /// Reload when the configuration file or a policy file (or folder)
    /// changes on disk, checked every second.
    pub watch: bool,
    /// A Unix socket (mode 0600) where `meshgate reload` asks the running
    /// gateway to reload and hears the outcome; relative to this file.
    pub control_socket: Option<PathBuf>,
}

impl Default for ReloadSection {
    fn default() -> Self {
        ReloadSection {
            watch: true,
            control_socket: None,
        }
    }
}

/// `[server]`: limits on connections and requests.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// `production` (default): no introspection, no field suggestions.
    /// `development`: both on, for GraphiQL.
    pub profile: ServerProfile,
    /// Open connections at most; more wait to be accepted.
    pub max_connections: usize,
    /// Open connections from one client address at most; more are closed
    /// as soon as they are accepted.
    pub max_connections_per_address: usize,
    /// GraphQL requests handled at once; more are shed at once with `503
    /// OVERLOADED` and `Retry-After`, so admitted ones keep their latency.
    pub max_in_flight: usize,
    /// A connection must deliver a complete request head within this of
    /// opening, or of its previous response, whatever protocol it speaks,
    /// or it is closed…
    pub header_timeout_ms: u64,
    /// …and a request's body within this (`408 REQUEST_TIMEOUT`).
    pub body_timeout_ms: u64,
    /// What one client address may have in flight and start per second.
    pub per_address: RateLimit,
    /// What one principal (issuer and subject) may have in flight and
    /// start per second.
    pub per_principal: RateLimit,
    /// Studies being fetched, mapped and answered at once, over every
    /// request (a page of `first` studies holds `first` until its answer is
    /// sent); a page past it gets `OVERLOADED` at once. Bounds memory:
    /// about 20 KiB per study in flight (FHIR with series and instances,
    /// measured), so the default holds the process near 200 MiB.
    pub max_studies_in_flight: usize,
    /// What one GraphQL document may ask for.
    pub limits: QueryLimits,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            profile: ServerProfile::Production,
            max_connections: 1024,
            max_connections_per_address: 128,
            max_in_flight: 256,
            header_timeout_ms: 10_000,
            body_timeout_ms: 10_000,
            per_address: RateLimit::new(128, 200.0, 400),
            per_principal: RateLimit::new(16, 20.0, 60),
            max_studies_in_flight: 3_000,
            limits: QueryLimits::default(),
        }
    }
}

/// Whether the API describes itself to callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerProfile {
    #[default]
    Production,
    Development,
}

/// `[audit]`: where the audit log lives and how its head is signed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// `sqlite:PATH` (relative to this file), or a PostgreSQL URL:
    /// `postgres://user@host/db` as is, or as `${env:NAME}` / `${file:PATH}`
    /// when it carries a password.
    pub store: String,
    /// The Ed25519 private key (PKCS#8 PEM) that signs checkpoints, as
    /// `${env:NAME}` or `${file:PATH}`.
    pub checkpoint_key: SecretRef,
    /// Sign the chain head every this many records…
    #[serde(default = "default_checkpoint_records")]
    pub checkpoint_every_records: u32,
    /// …and at least this often while records arrive.
    #[serde(default = "default_checkpoint_seconds")]
    pub checkpoint_every_seconds: u64,
    /// Where checkpoints are also appended, one JSON line each (relative to
    /// this file); copy it somewhere the gateway cannot write.
    #[serde(default)]
    pub checkpoint_file: Option<PathBuf>,
}

fn default_checkpoint_records() -> u32 {
    1000
}

fn default_checkpoint_seconds() -> u64 {
    60
}

/// `[[projects]]`: an approved research project.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    pub id: Spanned<String>,
    pub title: String,
    /// GA4GH DUO codes of the research purpose, e.g. `DUO:0000006`.
    pub purposes: Vec<Spanned<String>>,
    #[serde(default)]
    pub commercial: bool,
    #[serde(default)]
    pub ethics_approved: bool,
}

/// A dataset's data-use conditions (GA4GH DUO).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataUseConfig {
    /// The data-use permission, e.g. `DUO:0000042` (general research use).
    pub permission: Spanned<String>,
    /// Data-use modifiers, e.g. `DUO:0000046` (non-commercial use only).
    #[serde(default)]
    pub modifiers: Vec<Spanned<String>>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

/// One partner and how to reach its imaging store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartnerConfig {
    /// Short stable identifier: lower-case letters, digits, `-` and `_`.
    pub id: Spanned<String>,
    /// Human-readable name.
    pub name: String,
    /// How long this partner may take to answer one query.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// Concurrency limit and circuit breaker for calls to this partner.
    #[serde(default)]
    pub protection: ProtectionConfig,
    /// The partner's UTC offset (`+01:00`), used for study times that carry
    /// no Timezone Offset From UTC of their own.
    #[serde(default)]
    pub utc_offset: Option<Spanned<String>>,
    /// The institution that holds the data (policies compare it with the
    /// caller's institution).
    pub institution: String,
    /// The data-use conditions of the partner's dataset.
    pub data_use: DataUseConfig,
    /// The partner's own Cedar policy files or folders. None: it discloses nothing.
    #[serde(default)]
    pub policies: Vec<PathBuf>,
    /// Counts below this are suppressed (count disclosure control).
    #[serde(default = "default_min_count")]
    pub min_count: u32,
    /// Counts-only counts are rounded to a multiple of this (1: not rounded).
    #[serde(default = "default_round_to")]
    pub round_to: u32,
    /// Counts-only counts move by up to this much, the same for the same
    /// studies (cell-key perturbation); 0 disables.
    #[serde(default = "default_perturbation")]
    pub perturbation: u32,
    /// Distinct questions one caller may ask this partner per project and
    /// window where it releases de-identified records or counts.
    #[serde(default)]
    pub budget: BudgetConfig,
    /// `kind = "…"` and that kind's settings (see
    /// [`meshgate_connectors::kind`]).
    pub connector: Spanned<toml::Value>,
    /// The connector table read by its kind, checked, credentials resolved.
    #[serde(skip)]
    connector_config: Option<Arc<dyn ConnectorConfig>>,
}

fn default_min_count() -> u32 {
    meshgate_policies::disclosure::DEFAULT_MIN_COUNT
}

fn default_round_to() -> u32 {
    1
}

fn default_perturbation() -> u32 {
    meshgate_policies::disclosure::DEFAULT_PERTURBATION
}

fn default_deadline_ms() -> u64 {
    5_000
}

impl PartnerConfig {
    /// Its connector's settings, as its kind read them at load time.
    pub fn connector_config(&self) -> Option<&Arc<dyn ConnectorConfig>> {
        self.connector_config.as_ref()
    }

    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }

    pub fn count_control(&self) -> CountControl {
        CountControl {
            min_count: self.min_count,
            round_to: self.round_to,
            perturbation: self.perturbation,
        }
    }
}

/// A credential reference (`${env:NAME}` or `${file:PATH}`), resolved by
/// `resolve_secret`. The referenced value is never stored here.
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub struct SecretRef(String);

/// What a connector kind reads its table with: credential references
/// resolved (and noted, so that a rotated credential counts as a change of
/// the partner), paths anchored at the configuration file's folder.
struct PartnerSetting<'a> {
    base: &'a Path,
    env: &'a dyn Environment,
    /// SHA-256 of each credential resolved.
    credentials: std::cell::RefCell<Vec<u8>>,
}

impl Setting for PartnerSetting<'_> {
    fn secret(&self, reference: &str) -> Result<Secret, String> {
        use sha2::Digest as _;
        let secret = resolve_secret(&SecretRef(reference.to_owned()), self.base, self.env)?;
        self.credentials
            .borrow_mut()
            .extend(sha2::Sha256::digest(secret.expose().as_bytes()));
        Ok(secret)
    }

    fn path(&self, path: &Path) -> PathBuf {
        self.base.join(path)
    }

    fn var(&self, name: &str) -> Option<String> {
        self.env.var(name)
    }
}

/// Where configuration values come from, so tests inject them instead of
/// mutating the process environment.
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
    fn read_file(&self, path: &Path) -> std::io::Result<String>;
}

/// The real process environment and file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn read_file(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
}

/// A configuration problem, located in the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

/// A configuration checked for consistency, with credentials resolved and
/// policies loaded.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    /// The file it was read from (what a reload reads again).
    pub file: PathBuf,
    /// The connector kinds it was read with (what a reload reads it with).
    pub kinds: Vec<Kind>,
    pub config: Config,
    pub pseudonym_key: MasterKey,
    /// The bearer token `/metrics` asks for on the API listener.
    pub metrics_token: Option<Secret>,
    pub issuers: Vec<IssuerSettings>,
    pub audit: AuditSettings,
    /// The policies, loaded and validated once.
    pub authorizer: Arc<Authorizer>,
    /// What it is made of, hashed.
    pub fingerprints: Fingerprints,
}

/// A configuration's parts, hashed: which rules were in force, and which
/// parts a reload changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fingerprints {
    /// SHA-256 (hex) of the configuration text and of every policy file's
    /// text, in order. Neither holds a secret value (credentials are only
    /// references), so the hash can be shown and audited.
    pub snapshot: String,
    /// Per partner id: its table without the policy facts (policies,
    /// institution, data use), plus a digest of its resolved credential, so
    /// that a rotated credential counts as a change of the partner.
    pub partners: std::collections::HashMap<String, String>,
    /// `[auth]`: the trusted issuers.
    pub auth: String,
    /// Every other top-level key but `partners`, `projects` and
    /// `policies`: the parts read at start-up only.
    pub sections: std::collections::BTreeMap<String, String>,
    /// The files and folders a change on disk to which is a reason to
    /// reload: the configuration file and the configured policy paths.
    pub watched: Vec<PathBuf>,
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    for part in parts {
        // Length-prefixed, so that no two sequences of parts hash alike.
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

impl Fingerprints {
    fn of(
        file: &Path,
        text: &str,
        config: &Config,
        credentials: &[Vec<u8>],
        policies: &PolicyConfig,
    ) -> Fingerprints {
        let files = policies
            .consortium
            .iter()
            .map(|file| ("consortium", file))
            .chain(
                policies
                    .partners
                    .iter()
                    .flat_map(|(facts, files)| files.iter().map(|file| (facts.id.as_str(), file))),
            );
        let mut parts: Vec<&[u8]> = vec![text.as_bytes()];
        let names: Vec<(String, &PolicyFile)> = files
            .map(|(owner, file)| {
                let name = file
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (format!("{owner}/{name}"), file)
            })
            .collect();
        for (name, file) in &names {
            parts.push(name.as_bytes());
            parts.push(file.text.as_bytes());
        }
        let raw: toml::Table = toml::from_str(text).unwrap_or_default();
        let rendered = |value: &toml::Value| toml::to_string(value).unwrap_or_default();
        let mut partners = std::collections::HashMap::new();
        if let Some(tables) = raw.get("partners").and_then(toml::Value::as_array) {
            for ((table, partner), credential) in
                tables.iter().zip(&config.partners).zip(credentials)
            {
                let mut table = table.clone();
                if let Some(table) = table.as_table_mut() {
                    for facts in ["policies", "institution", "data_use"] {
                        table.remove(facts);
                    }
                }
                partners.insert(
                    partner.id.get_ref().clone(),
                    sha256_hex(&[rendered(&table).as_bytes(), credential]),
                );
            }
        }
        let sections = raw
            .iter()
            .filter(|(key, _)| {
                !matches!(key.as_str(), "partners" | "projects" | "policies" | "auth")
            })
            .map(|(key, value)| (key.clone(), rendered(value)))
            .collect();
        let base = file.parent().unwrap_or(Path::new("."));
        let watched = std::iter::once(file.to_owned())
            .chain(
                config
                    .policies
                    .consortium
                    .iter()
                    .chain(config.partners.iter().flat_map(|p| p.policies.iter()))
                    .map(|path| base.join(path)),
            )
            .collect();
        Fingerprints {
            snapshot: sha256_hex(&parts),
            watched,
            partners,
            auth: raw.get("auth").map(rendered).unwrap_or_default(),
            sections,
        }
    }
}

impl Config {
    /// Reads, parses, checks and resolves a configuration file.
    pub fn load(path: &Path, env: &dyn Environment) -> Result<LoadedConfig, ConfigError> {
        Config::load_with(path, env, &kind::builtin())
    }

    /// Parses, checks and resolves configuration text; `file` names it in errors.
    pub fn from_toml(
        text: &str,
        file: &Path,
        env: &dyn Environment,
    ) -> Result<LoadedConfig, ConfigError> {
        Config::from_toml_with(text, file, env, &kind::builtin())
    }

    /// Reads a configuration file whose connectors are of `kinds`.
    pub fn load_with(
        path: &Path,
        env: &dyn Environment,
        kinds: &[Kind],
    ) -> Result<LoadedConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError {
            file: path.to_owned(),
            line: None,
            column: None,
            message: format!("cannot read the file: {error}"),
        })?;
        Config::from_toml_with(&text, path, env, kinds)
    }

    /// [`Config::from_toml`] with connectors of `kinds`.
    pub fn from_toml_with(
        text: &str,
        file: &Path,
        env: &dyn Environment,
        kinds: &[Kind],
    ) -> Result<LoadedConfig, ConfigError> {
        let located = |span: Option<Range<usize>>, message: String| {
            let (line, column) = match span {
                Some(span) => {
                    let (line, column) = line_and_column(text, span.start);
                    (Some(line), Some(column))
                }
                None => (None, None),
            };
            ConfigError {
                file: file.to_owned(),
                line,
                column,
                message,
            }
        };
        let mut config: Config = toml::from_str(text)
            .map_err(|error| located(error.span(), suggest(error.message())))?;
        // Every relative path is relative to this file's folder, so the
        // same file means the same thing from any working directory.
        let base = file.parent().unwrap_or(Path::new("."));
        if let Some(socket) = &mut config.reload.control_socket {
            *socket = base.join(&*socket);
        }
        if config.partners.is_empty() {
            return Err(located(
                None,
                "no partners are configured: add at least one [[partners]] table".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        let mut connectors = Vec::with_capacity(config.partners.len());
        let mut credentials = Vec::with_capacity(config.partners.len());
        for (index, partner) in config.partners.iter().enumerate() {
            let id = partner.id.get_ref();
            let valid = !id.is_empty()
                && id.len() <= 64
                && id
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
            if !valid {
                return Err(located(
                    Some(partner.id.span()),
                    format!(
                        "partner id '{id}' must be 1 to 64 lower-case letters, digits, '-' or '_'"
                    ),
                ));
            }
            if !seen.insert(id.clone()) {
                return Err(located(
                    Some(partner.id.span()),
                    format!("partner id '{id}' is used twice"),
                ));
            }
            if partner.deadline_ms == 0 || partner.deadline_ms > 120_000 {
                return Err(located(
                    Some(partner.id.span()),
                    format!("partner '{id}': deadline_ms must be between 1 and 120000"),
                ));
            }
            if let Some(offset) = &partner.utc_offset
                && parse_utc_offset(offset.get_ref()).is_none()
            {
                return Err(located(
                    Some(offset.span()),
                    "utc_offset must look like +01:00 or -05:30".into(),
                ));
            }
            // Values inside connector tables carry no spans through serde,
            // so their locations come from the document itself.
            let at = |keys: &[&str]| {
                let mut path = vec![
                    Key::Name("partners"),
                    Key::Index(index),
                    Key::Name("connector"),
                ];
                path.extend(keys.iter().map(|k| Key::Name(k)));
                span_at(text, &path).or_else(|| Some(partner.connector.span()))
            };
            let mut table = partner.connector.get_ref().clone();
            let name = table
                .as_table_mut()
                .and_then(|t| t.remove("kind"))
                .and_then(|kind| kind.as_str().map(str::to_owned));
            let kind = kinds
                .iter()
                .find(|k| name.as_deref() == Some(k.name))
                .ok_or_else(|| {
                    let names: Vec<&str> = kinds.iter().map(|k| k.name).collect();
                    located(
                        at(&["kind"]),
                        format!(
                            "connector kind {} is not one of: {}",
                            name.as_deref()
                                .map_or("(missing)".to_owned(), |n| format!("'{n}'")),
                            names.join(", ")
                        ),
                    )
                })?;
            let setting = PartnerSetting {
                base,
                env,
                credentials: std::cell::RefCell::default(),
            };
            let connector = (kind.read)(table, &setting)
                .map_err(|invalid| located(at(&invalid.at), suggest(&invalid.message)))?;
            connectors.push(Arc::<dyn ConnectorConfig>::from(connector));
            credentials.push(setting.credentials.into_inner());
        }
        let issuers = issuers(&config, text, &located)?;
        let key_span = span_at(text, &[Key::Name("deidentification"), Key::Name("key")]);
        let key = resolve_secret(&config.deidentification.key, base, env)
            .map_err(|message| located(key_span.clone(), message))?;
        let pseudonym_key = MasterKey::new(key.expose().as_bytes())
            .map_err(|error| located(key_span, error.to_string()))?;
        let metrics_token = config
            .metrics
            .token
            .as_ref()
            .map(|reference| {
                let span = span_at(text, &[Key::Name("metrics"), Key::Name("token")]);
                resolve_secret(reference, base, env).map_err(|message| located(span, message))
            })
            .transpose()?;
        let audit = audit_settings(&config.audit, base, text, env, &located)?;
        let policies = policy_config(&config, base, &located)?;
        let authorizer = Authorizer::new(&policies).map_err(policy_error)?;
        let fingerprints = Fingerprints::of(file, text, &config, &credentials, &policies);
        for (partner, connector) in config.partners.iter_mut().zip(connectors) {
            partner.connector_config = Some(connector);
        }
        Ok(LoadedConfig {
            file: file.to_owned(),
            kinds: kinds.to_vec(),
            config,
            pseudonym_key,
            metrics_token,
            issuers,
            audit,
            authorizer: Arc::new(authorizer),
            fingerprints,
        })
    }
}

type Locate<'a> = dyn Fn(Option<Range<usize>>, String) -> ConfigError + 'a;

/// Resolves `[audit]`: the store's location and the checkpoint key.
fn audit_settings(
    section: &AuditSection,
    base: &Path,
    text: &str,
    env: &dyn Environment,
    located: &Locate<'_>,
) -> Result<AuditSettings, ConfigError> {
    let at = |name: &str| span_at(text, &[Key::Name("audit"), Key::Name(name)]);
    let store = section.store.trim();
    let postgres = |url: &str| url.starts_with("postgres://") || url.starts_with("postgresql://");
    let location = if let Some(path) = store.strip_prefix("sqlite:") {
        let path = path.trim_start_matches("//");
        if path.is_empty() {
            return Err(located(at("store"), "sqlite: needs a file path".into()));
        }
        StoreLocation::Sqlite(base.join(path))
    } else if store.starts_with("${") {
        let url = resolve_secret(&SecretRef(store.to_owned()), base, env)
            .map_err(|message| located(at("store"), message))?;
        if !postgres(url.expose()) {
            return Err(located(
                at("store"),
                "the referenced store must be a postgres:// URL".into(),
            ));
        }
        StoreLocation::Postgres(url)
    } else if postgres(store) {
        let authority = store.split('/').nth(2).unwrap_or_default();
        let credentials = authority
            .rsplit_once('@')
            .map(|(c, _)| c)
            .unwrap_or_default();
        if credentials.contains(':') || store.contains("password=") {
            return Err(located(
                at("store"),
                "a PostgreSQL URL with a password must be a reference: ${env:NAME} or ${file:PATH}"
                    .into(),
            ));
        }
        StoreLocation::Postgres(Secret::new(store))
    } else {
        return Err(located(
            at("store"),
            "store must be sqlite:PATH or a postgres:// URL".into(),
        ));
    };
    let pem = resolve_secret(&section.checkpoint_key, base, env)
        .map_err(|message| located(at("checkpoint_key"), message))?;
    use ed25519_dalek::pkcs8::DecodePrivateKey as _;
    let signing_key = ed25519_dalek::SigningKey::from_pkcs8_pem(pem.expose().trim()).map_err(|_| {
        located(
            at("checkpoint_key"),
            "checkpoint_key must be an Ed25519 private key in PKCS#8 PEM (openssl genpkey -algorithm ed25519)".into(),
        )
    })?;
    Ok(AuditSettings {
        store: location,
        signing_key: Arc::new(signing_key),
        checkpoint_every_records: i64::from(section.checkpoint_every_records.max(1)),
        checkpoint_every: Duration::from_secs(section.checkpoint_every_seconds.max(1)),
        checkpoint_file: section.checkpoint_file.as_ref().map(|p| base.join(p)),
    })
}

fn issuers(
    config: &Config,
    text: &str,
    located: &Locate<'_>,
) -> Result<Vec<IssuerSettings>, ConfigError> {
    if config.auth.issuers.is_empty() {
        return Err(located(
            None,
            "no [[auth.issuers]] are configured: meshgate has no anonymous access".into(),
        ));
    }
    config
        .auth
        .issuers
        .iter()
        .enumerate()
        .map(|(index, issuer)| {
            let at = |key: &str| {
                span_at(
                    text,
                    &[Key::Name("auth"), Key::Name("issuers"), Key::Index(index), Key::Name(key)],
                )
            };
            let jwks_url = reqwest::Url::parse(issuer.jwks_url.get_ref())
                .ok()
                .filter(|url| {
                    url.scheme() == "https"
                        || (url.scheme() == "http"
                            && url.host_str().is_some_and(|host| {
                                host == "localhost"
                                    || host
                                        .trim_start_matches('[')
                                        .trim_end_matches(']')
                                        .parse::<std::net::IpAddr>()
                                        .is_ok_and(|ip| ip.is_loopback())
                            }))
                })
                .ok_or_else(|| {
                    located(
                        Some(issuer.jwks_url.span()),
                        "jwks_url must be an https:// URL (http:// only on a loopback address)"
                            .into(),
                    )
                })?;
            if issuer.audiences.is_empty() || issuer.audiences.iter().any(String::is_empty) {
                return Err(located(at("audiences"), "give at least one non-empty audience".into()));
            }
            if issuer.leeway_seconds > 300 {
                return Err(located(at("leeway_seconds"), "leeway_seconds must be at most 300".into()));
            }
            if issuer.max_token_lifetime_seconds == 0 {
                return Err(located(
                    at("max_token_lifetime_seconds"),
                    "max_token_lifetime_seconds must be at least 1".into(),
                ));
            }
            let algorithms = match &issuer.algorithms {
                None => DEFAULT_ALGORITHMS.to_vec(),
                Some(names) => names
                    .get_ref()
                    .iter()
                    .map(|name| {
                        jsonwebtoken::Algorithm::from_str(name)
                            .ok()
                            .filter(|alg| DEFAULT_ALGORITHMS.contains(alg))
                            .ok_or_else(|| {
                                located(
                                    Some(names.span()),
                                    format!("algorithm '{name}' is not allowed: use asymmetric algorithms (RS256, PS256, ES256, EdDSA, ...)"),
                                )
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            };
            if algorithms.is_empty() {
                return Err(located(at("algorithms"), "give at least one algorithm".into()));
            }
            let trust = &issuer.trusted_for;
            if let Some(role) = trust
                .roles
                .iter()
                .find(|r| *r != "*" && Role::from_name(r).is_none())
            {
                return Err(located(
                    at("trusted_for"),
                    format!("unknown role '{role}' in trusted_for.roles: use researcher, partner_admin, governance or \"*\""),
                ));
            }
            Ok(IssuerSettings {
                issuer: issuer.issuer.clone(),
                audiences: issuer.audiences.clone(),
                jwks_url,
                algorithms,
                token_types: issuer.token_types.clone().unwrap_or_else(|| {
                    DEFAULT_TOKEN_TYPES.iter().map(|t| (*t).to_owned()).collect()
                }),
                leeway: Duration::from_secs(issuer.leeway_seconds),
                require_nbf: issuer.require_nbf,
                max_lifetime: Duration::from_secs(issuer.max_token_lifetime_seconds),
                claims: ClaimNames {
                    institution: issuer.claims.institution.clone(),
                    roles: issuer.claims.roles.clone(),
                    projects: issuer.claims.projects.clone(),
                    permissions: issuer.claims.permissions.clone(),
                },
                trust: Trust {
                    institutions: Allowed::of(&trust.institutions),
                    roles: Allowed::of(&trust.roles),
                    projects: Allowed::of(&trust.projects),
                    permissions: Allowed::of(&trust.permissions),
                },
                refresh_interval: Duration::from_secs(issuer.jwks_refresh_interval_seconds),
                max_key_age: Duration::from_secs(issuer.jwks_max_age_seconds.max(1)),
            })
        })
        .collect()
}

/// A GA4GH DUO code: `DUO:` and seven digits.
fn is_duo_code(code: &str) -> bool {
    code.strip_prefix("DUO:")
        .is_some_and(|digits| digits.len() == 7 && digits.bytes().all(|b| b.is_ascii_digit()))
}

fn policy_config(
    config: &Config,
    base: &Path,
    located: &Locate<'_>,
) -> Result<PolicyConfig, ConfigError> {
    let duo = |code: &Spanned<String>| {
        if is_duo_code(code.get_ref()) {
            Ok(code.get_ref().clone())
        } else {
            Err(located(
                Some(code.span()),
                format!("'{}' is not a GA4GH DUO code (DUO:0000042)", code.get_ref()),
            ))
        }
    };
    let mut seen = std::collections::HashSet::new();
    let mut projects = Vec::new();
    for project in &config.projects {
        let id = project.id.get_ref();
        if id.is_empty() || !seen.insert(id.clone()) {
            return Err(located(
                Some(project.id.span()),
                format!("project id '{id}' is empty or used twice"),
            ));
        }
        projects.push(ProjectFacts {
            id: id.clone(),
            purposes: project.purposes.iter().map(duo).collect::<Result<_, _>>()?,
            commercial: project.commercial,
            ethics_approved: project.ethics_approved,
        });
    }
    let mut partners = Vec::new();
    for partner in &config.partners {
        let facts = PartnerFacts {
            id: partner.id.get_ref().clone(),
            institution: partner.institution.clone(),
            data_use: duo(&partner.data_use.permission)?,
            data_use_modifiers: partner
                .data_use
                .modifiers
                .iter()
                .map(duo)
                .collect::<Result<_, _>>()?,
        };
        partners.push((facts, policy_files(&partner.policies, base)?));
    }
    Ok(PolicyConfig {
        consortium: policy_files(&config.policies.consortium, base)?,
        partners,
        projects,
    })
}

/// Reads policy files; a folder stands for its `*.cedar` files, sorted.
/// Relative paths are relative to the configuration file.
fn policy_files(paths: &[PathBuf], base: &Path) -> Result<Vec<PolicyFile>, ConfigError> {
    let unreadable = |path: &Path, error: std::io::Error| ConfigError {
        file: path.to_owned(),
        line: None,
        column: None,
        message: format!("cannot read policies: {}", error.kind()),
    };
    let mut files = Vec::new();
    for path in paths {
        let path = base.join(path);
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(&path)
                .map_err(|e| unreadable(&path, e))?
                .flatten()
                .map(|entry| entry.path())
                .filter(|p| p.extension().is_some_and(|e| e == "cedar"))
                .collect();
            found.sort();
            for file in found {
                files.push(PolicyFile::read(&file).map_err(policy_error)?);
            }
        } else {
            files.push(PolicyFile::read(&path).map_err(policy_error)?);
        }
    }
    Ok(files)
}

fn policy_error(error: meshgate_policies::PolicyError) -> ConfigError {
    ConfigError {
        file: error.file,
        line: error.line,
        column: None,
        message: error.message,
    }
}

/// Expands one `${env:NAME}` or `${file:PATH}` reference; a relative PATH
/// is relative to the configuration file's folder (`base`).
fn resolve_secret(
    reference: &SecretRef,
    base: &Path,
    env: &dyn Environment,
) -> Result<Secret, String> {
    let text = reference.0.trim();
    let inner = text
        .strip_prefix("${")
        .and_then(|rest| rest.strip_suffix('}'))
        .ok_or_else(|| {
            "credentials must be written as ${env:NAME} or ${file:PATH}, never as literal values"
                .to_owned()
        })?;
    if let Some(name) = inner.strip_prefix("env:") {
        env.var(name)
            .filter(|value| !value.is_empty())
            .map(Secret::new)
            .ok_or_else(|| format!("environment variable {name} is not set"))
    } else if let Some(path) = inner.strip_prefix("file:") {
        env.read_file(&base.join(path))
            .map(|value| Secret::new(value.trim_end_matches(['\n', '\r'])))
            .map_err(|error| format!("cannot read credential file {path}: {}", error.kind()))
    } else {
        Err("credential references are ${env:NAME} or ${file:PATH}".to_owned())
    }
}

/// Adds the nearest expected name to serde's "unknown field `partner`,
/// expected one of `listen`, …, `partners`" ("did you mean `partners`?").
fn suggest(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_owned();
    };
    let Some((unknown, expected)) = rest.split_once('`') else {
        return message.to_owned();
    };
    let nearest = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|name| (edit_distance(unknown, name), name))
        .min();
    match nearest {
        Some((distance, name)) if distance <= unknown.len().max(2) / 2 => {
            format!("{message}; did you mean `{name}`?")
        }
        _ => message.to_owned(),
    }
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row.first().copied().unwrap_or_default();
        if let Some(first) = row.first_mut() {
            *first = i + 1;
        }
        for (j, cb) in b.iter().enumerate() {
            let above = row.get(j + 1).copied().unwrap_or_default();
            let left = row.get(j).copied().unwrap_or_default();
            let best = (diagonal + usize::from(ca != *cb))
                .min(above + 1)
                .min(left + 1);
            diagonal = above;
            if let Some(cell) = row.get_mut(j + 1) {
                *cell = best;
            }
        }
    }
    row.last().copied().unwrap_or_default()
}

/// `+HH:MM` / `-HH:MM` / `Z`.
pub fn parse_utc_offset(text: &str) -> Option<time::UtcOffset> {
    if text == "Z" {
        return Some(time::UtcOffset::UTC);
    }
    time::UtcOffset::parse(
        text,
        time::macros::format_description!("[offset_hour sign:mandatory]:[offset_minute]"),
    )
    .ok()
}

/// One step of a path into a TOML document.
enum Key<'a> {
    Name(&'a str),
    Index(usize),
}

/// The byte span of the value at `path`, if the document has one there.
fn span_at(text: &str, path: &[Key<'_>]) -> Option<Range<usize>> {
    let document = toml_edit::ImDocument::parse(text).ok()?;
    let mut item: &toml_edit::Item = document.as_item();
    for key in path {
        item = match key {
            Key::Name(name) => item.get(*name)?,
            Key::Index(index) => item.get(*index)?,
        };
    }
    item.span()
        .or_else(|| item.as_value().and_then(toml_edit::Value::span))
}

fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct FakeEnv(HashMap<String, String>);

    impl Environment for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
        fn read_file(&self, path: &Path) -> std::io::Result<String> {
            self.0
                .get(&format!("file:{}", path.display()))
                .cloned()
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        }
    }

    fn load(text: &str, env: &FakeEnv) -> Result<LoadedConfig, ConfigError> {
        Config::from_toml(text, Path::new("meshgate.toml"), env)
    }

    const GOOD: &str = r#"
listen = "127.0.0.1:9000"

[[partners]]
id = "north"
name = "North Hospital"
utc_offset = "+01:00"
connector = { kind = "files", path = "/data/north" }
institution = "north-hospital"
data_use = { permission = "DUO:0000042" }

[[partners]]
id = "south"
name = "South Clinic"
deadline_ms = 1500
institution = "south-clinic"
data_use = { permission = "DUO:0000006", modifiers = ["DUO:0000046"] }
[partners.connector]
kind = "dicomweb"
url = "http://127.0.0.1:8042/dicom-web/"
profile = "orthanc"
auth = { kind = "basic", username = "meshgate", password = "${env:SOUTH_PASSWORD}" }

[auth]
[[auth.issuers]]
issuer = "https://login.example.org/consortium"
audiences = ["meshgate"]
jwks_url = "https://login.example.org/consortium/jwks"
trusted_for = { institutions = ["north-hospital", "south-clinic"], roles = ["*"], projects = ["*"] }

[policies]
consortium = []

[deidentification]
key = "${env:PSEUDONYM_KEY}"

[[projects]]
id = "p1"
title = "Project one"
purposes = ["DUO:0000006"]

[audit]
store = "sqlite:audit.db"
checkpoint_key = "${env:CHECKPOINT_KEY}"
"#;

    const KEY: &str = "0123456789abcdef0123456789abcdef";
    /// Made by `openssl genpkey -algorithm ed25519` (PKCS#8 v1).
    const CHECKPOINT_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIOvQwcuIRmqdIqa5wsz8Mgbz7B0wr2B7j18h9nzxIzSR\n-----END PRIVATE KEY-----\n";

    /// A service account key file as Google issues them (the private key
    /// is read only when a token is asked for).
    const SERVICE_ACCOUNT_KEY: &str = r#"{"type": "service_account", "client_email": "meshgate@my-project.iam.gserviceaccount.com", "private_key": "-----BEGIN PRIVATE KEY-----\nnot read at load time\n-----END PRIVATE KEY-----\n", "token_uri": "https://oauth2.googleapis.com/token"}"#;

    fn env_with(pairs: &[(&str, &str)]) -> FakeEnv {
        let mut env = FakeEnv(HashMap::from([
            ("PSEUDONYM_KEY".into(), KEY.into()),
            ("CHECKPOINT_KEY".into(), CHECKPOINT_KEY.into()),
        ]));
        for (name, value) in pairs {
            env.0.insert((*name).into(), (*value).into());
        }
        env
    }

    #[test]
    fn a_valid_config_loads_with_credentials_resolved_from_the_environment() {
        let env = env_with(&[("SOUTH_PASSWORD", "s3cret")]);
        let loaded = load(GOOD, &env).unwrap();
        assert_eq!(loaded.config.partners.len(), 2);
        assert_eq!(
            loaded.config.partners[1].deadline(),
            Duration::from_millis(1500)
        );
        assert!(!format!("{loaded:?}").contains("s3cret"));
        assert!(!format!("{loaded:?}").contains(KEY));
        assert_eq!(loaded.issuers[0].leeway, Duration::from_secs(30));
        assert!(loaded.issuers[0].require_nbf);
    }

    #[test]
    fn config_errors_name_the_line_and_the_field() {
        let env = env_with(&[("SOUTH_PASSWORD", "x")]);
        let cases = [
            (
                GOOD.replace("deadline_ms = 1500", "deadline_ms = 1500\ncolour = \"red\""),
                16,
                "colour",
            ),
            (
                GOOD.replace("kind = \"dicomweb\"", "kind = \"ftp\""),
                19,
                "ftp",
            ),
            (
                GOOD.replace("url = \"http://127.0.0.1:8042/dicom-web/\"\n", ""),
                18,
                "url",
            ),
            (
                GOOD.replace("id = \"south\"", "id = \"north\""),
                13,
                "used twice",
            ),
            (
                GOOD.replace("id = \"south\"", "id = \"South Clinic\""),
                13,
                "lower-case",
            ),
            (GOOD.replace("\"+01:00\"", "\"CET\""), 7, "utc_offset"),
            (
                GOOD.replace("http://127.0.0.1", "ftp://127.0.0.1"),
                20,
                "http",
            ),
        ];
        for (text, line, needle) in cases {
            let error = load(&text, &env).unwrap_err();
            assert_eq!(error.line, Some(line), "{error}");
            assert!(error.to_string().contains(needle), "{error}");
            assert!(error.to_string().starts_with("meshgate.toml:"), "{error}");
        }
    }

    #[test]
    fn credentials_must_be_references_and_missing_ones_are_named_without_values() {
        let literal = GOOD.replace("${env:SOUTH_PASSWORD}", "hunter2");
        let error = load(&literal, &env_with(&[])).unwrap_err();
        assert_eq!(error.line, Some(22));
        assert!(!error.to_string().contains("hunter2"), "{error}");
        let missing = load(GOOD, &env_with(&[])).unwrap_err();
        assert!(
            missing.to_string().contains("SOUTH_PASSWORD is not set"),
            "{missing}"
        );
        // The value resolved is the partner's: the same file with another
        // value is another partner (a reload rebuilds it), the others stay.
        let from_file = GOOD.replace("${env:SOUTH_PASSWORD}", "${file:/run/secrets/south}");
        let partners = |text: &str, env: &FakeEnv| load(text, env).unwrap().fingerprints.partners;
        let first = partners(
            &from_file,
            &env_with(&[("file:/run/secrets/south", "s3cret\n")]),
        );
        let again = partners(
            &from_file,
            &env_with(&[("file:/run/secrets/south", "s3cret\n")]),
        );
        let rotated = partners(
            &from_file,
            &env_with(&[("file:/run/secrets/south", "pw\n")]),
        );
        assert_eq!(first, again);
        assert_ne!(first["south"], rotated["south"]);
        assert_eq!(first["north"], rotated["north"]);
    }

    #[test]
    fn identity_policy_and_pseudonym_settings_are_checked_with_their_line() {
        let env = env_with(&[("SOUTH_PASSWORD", "x")]);
        let cases = [
            (
                GOOD.replace(
                    "[[auth.issuers]]\nissuer = \"https://login.example.org/consortium\"\naudiences = [\"meshgate\"]\njwks_url = \"https://login.example.org/consortium/jwks\"\ntrusted_for = { institutions = [\"north-hospital\", \"south-clinic\"], roles = [\"*\"], projects = [\"*\"] }",
                    "issuers = []",
                ),
                None,
                "no anonymous access",
            ),
            (
                GOOD.replace(
                    "jwks_url = \"https://login.example.org/consortium/jwks\"",
                    "jwks_url = \"https://login.example.org/consortium/jwks\"\nalgorithms = [\"RS256\", \"HS256\"]",
                ),
                Some(29),
                "HS256",
            ),
            (
                GOOD.replace("https://login.example.org/consortium/jwks", "http://login.example.org/jwks"),
                Some(28),
                "https",
            ),
            (
                GOOD.replace("purposes = [\"DUO:0000006\"]", "purposes = [\"HMB\"]"),
                Some(40),
                "DUO code",
            ),
            (
                GOOD.replace("roles = [\"*\"], projects", "roles = [\"admin\"], projects"),
                Some(29),
                "unknown role 'admin'",
            ),
            (
                GOOD.replace(
                    "trusted_for = { institutions = [\"north-hospital\", \"south-clinic\"], roles = [\"*\"], projects = [\"*\"] }\n",
                    "",
                ),
                Some(25),
                "trusted_for",
            ),
            (
                GOOD.replace("DUO:0000006\", modifiers", "health\", modifiers"),
                Some(17),
                "DUO code",
            ),
        ];
        for (text, line, needle) in cases {
            let error = load(&text, &env).unwrap_err();
            assert_eq!(error.line, line, "{error}");
            assert!(error.to_string().contains(needle), "{error}");
        }
        let weak = load(
            GOOD,
            &env_with(&[("SOUTH_PASSWORD", "x"), ("PSEUDONYM_KEY", "short")]),
        );
        let error = weak.unwrap_err();
        assert!(error.to_string().contains("at least 32 bytes"), "{error}");
        assert!(!error.to_string().contains("short"), "{error}");
    }

    #[test]
    fn relative_paths_are_relative_to_the_configuration_file_from_any_working_directory() {
        let text = GOOD
            .replace("${env:PSEUDONYM_KEY}", "${file:secrets/pseudonym.key}")
            .replace("path = \"/data/north\"", "path = \"data/north\"");
        let env = env_with(&[
            ("SOUTH_PASSWORD", "x"),
            (
                "file:/etc/meshgate/secrets/pseudonym.key",
                "a pseudonymisation key of 32 bytes or more",
            ),
        ]);
        let loaded =
            Config::from_toml(&text, Path::new("/etc/meshgate/meshgate.toml"), &env).unwrap();
        let north = format!("{:?}", loaded.config.partners[0].connector_config());
        assert!(
            north.contains("path: \"/etc/meshgate/data/north\""),
            "{north}"
        );
        // The same file read from elsewhere resolves elsewhere: not found.
        let error =
            Config::from_toml(&text, Path::new("/srv/other/meshgate.toml"), &env).unwrap_err();
        assert!(error.message.contains("secrets/pseudonym.key"), "{error}");
    }

    #[test]
    fn a_misspelt_table_is_named_with_the_expected_name() {
        let env = env_with(&[("SOUTH_PASSWORD", "x")]);
        let error = load(&GOOD.replacen("[[partners]]", "[[partner]]", 1), &env).unwrap_err();
        assert!(error.message.contains("unknown field `partner`"), "{error}");
        assert!(
            error.message.contains("did you mean `partners`?"),
            "{error}"
        );
        let error = load(&GOOD.replacen("[auth]", "[authentication]", 1), &env).unwrap_err();
        assert!(
            !error.message.contains("did you mean `partners`"),
            "{error}"
        );
    }

    #[test]
    fn http_key_endpoints_are_accepted_on_loopback_only() {
        let env = env_with(&[("SOUTH_PASSWORD", "x")]);
        for url in [
            "http://127.0.0.1:9999/jwks",
            "http://localhost/jwks",
            "http://[::1]:80/jwks",
        ] {
            let text = GOOD.replace("https://login.example.org/consortium/jwks", url);
            assert!(load(&text, &env).is_ok(), "{url}");
        }
    }

    #[test]
    fn cloud_partners_are_configured_by_resource_names_and_credential_references() {
        let clouds = format!(
            "{GOOD}{}",
            r#"
[[partners]]
id = "google"
name = "Google partner"
institution = "g"
data_use = { permission = "DUO:0000042" }
[partners.connector]
kind = "gcp"
project = "my-project"
location = "europe-west4"
dataset = "imaging"
dicom_store = "research"
credentials = { kind = "service_account", key = "${file:/run/secrets/sa.json}" }

[[partners]]
id = "azure"
name = "Azure partner"
institution = "a"
data_use = { permission = "DUO:0000042" }
[partners.connector]
kind = "azure"
workspace = "ws"
service = "dicom"
partition = "research"
credentials = { kind = "client_secret", tenant = "contoso.example", client_id = "app", secret = "${env:AZURE_SECRET}" }

[[partners]]
id = "amazon"
name = "AWS partner"
institution = "w"
data_use = { permission = "DUO:0000042" }
[partners.connector]
kind = "aws"
region = "eu-west-1"
datastore_id = "0123456789abcdef0123456789abcdef"
credentials = { kind = "static", access_key_id = "AKIAEXAMPLE", secret_access_key = "${env:AWS_SECRET}" }

[[partners]]
id = "amazon2"
name = "AWS partner on its default credential chain"
institution = "w"
data_use = { permission = "DUO:0000042" }
connector = { kind = "aws", region = "us-east-1", datastore_id = "abc" }
"#
        );
        let env = env_with(&[
            ("SOUTH_PASSWORD", "x"),
            ("AZURE_SECRET", "s3cret"),
            ("AWS_SECRET", "aws-s3cret"),
            ("file:/run/secrets/sa.json", SERVICE_ACCOUNT_KEY),
        ]);
        let loaded = load(&clouds, &env).unwrap();
        assert_eq!(loaded.config.partners.len(), 6);
        assert!(!format!("{loaded:?}").contains("aws-s3cret"));
        // A key file that is not one is found by `config check`, where it is.
        let not_a_key = env_with(&[
            ("SOUTH_PASSWORD", "x"),
            ("AZURE_SECRET", "s3cret"),
            ("AWS_SECRET", "aws-s3cret"),
            ("file:/run/secrets/sa.json", "{}"),
        ]);
        let error = load(&clouds, &not_a_key).unwrap_err();
        assert!(error.message.contains("not a key file"), "{error}");
        assert_eq!(
            clouds.lines().nth(error.line.unwrap() - 1),
            Some(
                r#"credentials = { kind = "service_account", key = "${file:/run/secrets/sa.json}" }"#
            )
        );

        let slash = clouds.replace("dataset = \"imaging\"", "dataset = \"imaging/../x\"");
        let error = load(&slash, &env).unwrap_err();
        assert_eq!(error.line, Some(55), "{error}");
        assert!(error.message.contains("dataset"), "{error}");
        let literal = clouds.replace("${env:AZURE_SECRET}", "s3cret");
        let error = load(&literal, &env).unwrap_err();
        assert_eq!(error.line, Some(69), "{error}");
        assert!(!error.to_string().contains("s3cret"), "{error}");
    }

    #[test]
    fn the_audit_store_and_checkpoint_key_are_checked_with_their_line() {
        let env = env_with(&[
            ("SOUTH_PASSWORD", "x"),
            ("AUDIT_URL", "postgres://meshgate:pw@db/audit"),
        ]);
        let loaded = load(GOOD, &env).unwrap();
        assert!(
            matches!(&loaded.audit.store, StoreLocation::Sqlite(path) if path.ends_with("audit.db"))
        );
        let referenced = GOOD.replace("sqlite:audit.db", "${env:AUDIT_URL}");
        let loaded = load(&referenced, &env).unwrap();
        assert!(matches!(loaded.audit.store, StoreLocation::Postgres(_)));
        let literal = GOOD.replace("sqlite:audit.db", "postgres://meshgate:pw@db/audit");
        let error = load(&literal, &env).unwrap_err();
        assert!(error.message.contains("must be a reference"), "{error}");
        assert!(!error.to_string().contains("pw@"), "{error}");
        let other = GOOD.replace("sqlite:audit.db", "mysql://db");
        assert!(
            load(&other, &env)
                .unwrap_err()
                .message
                .contains("store must be")
        );
        let env = env_with(&[("SOUTH_PASSWORD", "x"), ("CHECKPOINT_KEY", KEY)]);
        let error = load(GOOD, &env).unwrap_err();
        assert!(error.message.contains("Ed25519"), "{error}");
        assert!(!error.to_string().contains(KEY), "{error}");
    }
}
