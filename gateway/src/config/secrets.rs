//! Credential references (`${env:NAME}`, `${file:PATH}`), the environment
//! they are resolved from, and what a connector kind resolves them with.

use std::path::{Path, PathBuf};

use meshgate_connectors::Secret;
use meshgate_connectors::kind::Setting;
use serde::Deserialize;

/// A credential reference (`${env:NAME}` or `${file:PATH}`), resolved by
/// `resolve_secret`. The referenced value is never stored here.
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub struct SecretRef(pub(super) String);

/// What a connector kind reads its table with: credential references
/// resolved (and noted, so that a rotated credential counts as a change of
/// the partner), paths anchored at the configuration file's folder.
pub(super) struct PartnerSetting<'a> {
    pub(super) base: &'a Path,
    pub(super) env: &'a dyn Environment,
    /// SHA-256 of each credential resolved.
    pub(super) credentials: std::cell::RefCell<Vec<u8>>,
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

/// Expands one `${env:NAME}` or `${file:PATH}` reference; a relative PATH
/// is relative to the configuration file's folder (`base`).
pub(super) fn resolve_secret(
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
