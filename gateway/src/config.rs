//! The gateway's one configuration file: TOML, typed with serde, unknown
//! fields refused, credentials only as `${env:NAME}` / `${file:PATH}`
//! references expanded at load time, and every error reported with file,
//! line and column — rendered from the unexpanded text, so no secret value
//! can appear in an error.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshgate_connectors::Secret;
use meshgate_connectors::dicomweb::Profile;
use serde::Deserialize;
use toml::Spanned;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the gateway listens, e.g. `127.0.0.1:8080`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The consortium's partners, one connector each.
    pub partners: Vec<PartnerConfig>,
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
    /// The partner's UTC offset (`+01:00`), used for study times that carry
    /// no Timezone Offset From UTC of their own.
    #[serde(default)]
    pub utc_offset: Option<Spanned<String>>,
    pub connector: ConnectorConfig,
}

fn default_deadline_ms() -> u64 {
    5_000
}

impl PartnerConfig {
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }
}

/// The connector kind and its settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ConnectorConfig {
    /// A folder of DICOM Part-10 files.
    Files {
        path: PathBuf,
        /// How often the folder is checked for changed files.
        #[serde(default = "default_rescan_ms")]
        rescan_interval_ms: u64,
    },
    /// A DICOMweb QIDO-RS service.
    Dicomweb {
        /// The DICOMweb base URL, e.g. `http://pacs.example.org/dicom-web/`.
        url: String,
        #[serde(default)]
        profile: Profile,
        #[serde(default)]
        page_size: Option<u32>,
        /// The most results the backend returns for one search, if it caps
        /// them; reaching it is reported as TRUNCATED.
        #[serde(default)]
        max_results: Option<u32>,
        #[serde(default)]
        auth: AuthConfig,
    },
}

fn default_rescan_ms() -> u64 {
    2_000
}

/// How a connector authenticates.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum AuthConfig {
    #[default]
    None,
    Basic {
        username: String,
        password: SecretRef,
    },
    Bearer {
        token: SecretRef,
    },
}

/// A credential reference (`${env:NAME}` or `${file:PATH}`), resolved by
/// [`Config::resolve_secret`]. The referenced value is never stored here.
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub struct SecretRef(String);

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
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, ":{line}:{column}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A configuration checked for consistency, with credentials resolved.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: Config,
    pub secrets: ResolvedSecrets,
}

/// Credentials resolved at load time, per partner index.
#[derive(Debug, Clone, Default)]
pub struct ResolvedSecrets(Vec<Option<Secret>>);

impl ResolvedSecrets {
    pub fn for_partner(&self, index: usize) -> Option<&Secret> {
        self.0.get(index).and_then(Option::as_ref)
    }
}

impl Config {
    /// Reads, parses, checks and resolves a configuration file.
    pub fn load(path: &Path, env: &dyn Environment) -> Result<LoadedConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError {
            file: path.to_owned(),
            line: None,
            column: None,
            message: format!("cannot read the file: {error}"),
        })?;
        Config::from_toml(&text, path, env)
    }

    /// Parses, checks and resolves configuration text; `file` names it in errors.
    pub fn from_toml(
        text: &str,
        file: &Path,
        env: &dyn Environment,
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
        let config: Config = toml::from_str(text)
            .map_err(|error| located(error.span(), error.message().to_owned()))?;
        if config.partners.is_empty() {
            return Err(located(
                None,
                "no partners are configured: add at least one [[partners]] table".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        let mut secrets = Vec::with_capacity(config.partners.len());
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
            // Values inside the tagged connector tables carry no spans through
            // serde, so their locations come from the document itself.
            let at = |keys: &[&str]| {
                let mut path = vec![
                    Key::Name("partners"),
                    Key::Index(index),
                    Key::Name("connector"),
                ];
                path.extend(keys.iter().map(|k| Key::Name(k)));
                span_at(text, &path)
            };
            let secret = match &partner.connector {
                ConnectorConfig::Files { .. } => None,
                ConnectorConfig::Dicomweb { url, auth, .. } => {
                    let parsed = meshgate_connectors::dicomweb::Url::parse(url)
                        .ok()
                        .filter(|u| matches!(u.scheme(), "http" | "https"));
                    if parsed.is_none() {
                        return Err(located(
                            at(&["url"]),
                            "url must be an http:// or https:// URL".into(),
                        ));
                    }
                    match auth {
                        AuthConfig::None => None,
                        AuthConfig::Basic {
                            password: reference,
                            ..
                        } => Some(
                            resolve_secret(reference, env)
                                .map_err(|message| located(at(&["auth", "password"]), message))?,
                        ),
                        AuthConfig::Bearer { token: reference } => Some(
                            resolve_secret(reference, env)
                                .map_err(|message| located(at(&["auth", "token"]), message))?,
                        ),
                    }
                }
            };
            secrets.push(secret);
        }
        Ok(LoadedConfig {
            config,
            secrets: ResolvedSecrets(secrets),
        })
    }
}

/// Expands one `${env:NAME}` or `${file:PATH}` reference.
fn resolve_secret(reference: &SecretRef, env: &dyn Environment) -> Result<Secret, String> {
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
        env.read_file(Path::new(path))
            .map(|value| Secret::new(value.trim_end_matches(['\n', '\r'])))
            .map_err(|error| format!("cannot read credential file {path}: {}", error.kind()))
    } else {
        Err("credential references are ${env:NAME} or ${file:PATH}".to_owned())
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

[[partners]]
id = "south"
name = "South Clinic"
deadline_ms = 1500
[partners.connector]
kind = "dicomweb"
url = "http://127.0.0.1:8042/dicom-web/"
profile = "orthanc"
auth = { kind = "basic", username = "meshgate", password = "${env:SOUTH_PASSWORD}" }
"#;

    #[test]
    fn a_valid_config_loads_with_credentials_resolved_from_the_environment() {
        let env = FakeEnv(HashMap::from([("SOUTH_PASSWORD".into(), "s3cret".into())]));
        let loaded = load(GOOD, &env).unwrap();
        assert_eq!(loaded.config.partners.len(), 2);
        assert_eq!(
            loaded.config.partners[1].deadline(),
            Duration::from_millis(1500)
        );
        assert_eq!(loaded.secrets.for_partner(1).unwrap().expose(), "s3cret");
        assert!(loaded.secrets.for_partner(0).is_none());
        assert!(!format!("{loaded:?}").contains("s3cret"));
    }

    #[test]
    fn config_errors_name_the_line_and_the_field() {
        let env = FakeEnv(HashMap::from([("SOUTH_PASSWORD".into(), "x".into())]));
        let cases = [
            (
                GOOD.replace("deadline_ms = 1500", "deadline_ms = 1500\ncolour = \"red\""),
                14,
                "colour",
            ),
            (
                GOOD.replace("kind = \"dicomweb\"", "kind = \"ftp\""),
                15,
                "ftp",
            ),
            (
                GOOD.replace("url = \"http://127.0.0.1:8042/dicom-web/\"\n", ""),
                14,
                "url",
            ),
            (
                GOOD.replace("id = \"south\"", "id = \"north\""),
                11,
                "used twice",
            ),
            (
                GOOD.replace("id = \"south\"", "id = \"South Clinic\""),
                11,
                "lower-case",
            ),
            (GOOD.replace("\"+01:00\"", "\"CET\""), 7, "utc_offset"),
            (
                GOOD.replace("http://127.0.0.1", "ftp://127.0.0.1"),
                16,
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
        let error = load(&literal, &FakeEnv::default()).unwrap_err();
        assert_eq!(error.line, Some(18));
        assert!(!error.to_string().contains("hunter2"), "{error}");
        let missing = load(GOOD, &FakeEnv::default()).unwrap_err();
        assert!(
            missing.to_string().contains("SOUTH_PASSWORD is not set"),
            "{missing}"
        );
        let from_file = GOOD.replace("${env:SOUTH_PASSWORD}", "${file:/run/secrets/south}");
        let env = FakeEnv(HashMap::from([(
            "file:/run/secrets/south".into(),
            "pw\n".into(),
        )]));
        assert_eq!(
            load(&from_file, &env)
                .unwrap()
                .secrets
                .for_partner(1)
                .unwrap()
                .expose(),
            "pw"
        );
    }
}
