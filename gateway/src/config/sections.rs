//! The configuration file's sections, typed: what each key means and its default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshgate_connectors::kind::ConnectorConfig;
use meshgate_policies::CountControl;
use serde::Deserialize;

use crate::admission::RateLimit;
use toml::Spanned;

use crate::auth::ClaimNames;
use crate::budget::BudgetConfig;
use crate::cache::CacheConfig;
use crate::limits::QueryLimits;
use crate::protection::ProtectionConfig;
use crate::telemetry::TelemetrySection;

use super::*;

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

pub(super) fn default_leeway() -> u64 {
    30
}
pub(super) fn default_true() -> bool {
    true
}
pub(super) fn default_max_token_lifetime() -> u64 {
    24 * 3600
}
pub(super) fn default_jwks_refresh() -> u64 {
    30
}
pub(super) fn default_jwks_max_age() -> u64 {
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

pub(super) fn default_checkpoint_records() -> u32 {
    1000
}

pub(super) fn default_checkpoint_seconds() -> u64 {
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

pub(super) fn default_listen() -> SocketAddr {
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
    pub(super) connector_config: Option<Arc<dyn ConnectorConfig>>,
}

pub(super) fn default_min_count() -> u32 {
    meshgate_policies::disclosure::DEFAULT_MIN_COUNT
}

pub(super) fn default_round_to() -> u32 {
    1
}

pub(super) fn default_perturbation() -> u32 {
    meshgate_policies::disclosure::DEFAULT_PERTURBATION
}

pub(super) fn default_deadline_ms() -> u64 {
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
