//! The gateway's one configuration file: TOML, typed with serde, unknown
//! fields refused, credentials only as `${env:NAME}` / `${file:PATH}`
//! references expanded at load time, and every error reported with file,
//! line and column — rendered from the unexpanded text, so no secret value
//! can appear in an error.
//!
//! Here: loading ([`Config::load`]) and its errors. Beside it, one concern
//! each: `sections` (the typed keys and their defaults), `secrets`
//! (credential references and the environment they come from), `resolve`
//! (the audit store, issuers and policies), `fingerprint` (the snapshot
//! hash and what a reload compares) and `locate` (file, line and column).
//! Connector tables are read by their kinds
//! ([`meshgate_connectors::kind`]).

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use meshgate_connectors::Secret;
use meshgate_connectors::kind::{self, ConnectorConfig, Kind};
use meshgate_policies::{Authorizer, MasterKey};

use crate::audit::AuditSettings;
use crate::auth::IssuerSettings;

mod fingerprint;
mod locate;
mod resolve;
mod secrets;
mod sections;

pub use fingerprint::Fingerprints;
pub use secrets::{Environment, ProcessEnvironment, SecretRef};
pub use sections::*;

use locate::*;
use resolve::*;
use secrets::*;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::StoreLocation;
    use std::collections::HashMap;
    use std::time::Duration;

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
