//! Connector kinds. Each kind is one module that owns its
//! `[partners.connector]` table: its typed settings, their checks, the
//! credential references it resolves, and the connector it builds. The
//! gateway only finds the kind named by `kind = "…"` in a list of
//! [`Kind`]s ([`builtin`], plus any a program adds) and hands it the table.
//!
//! Adding a kind: a module with a settings type that implements
//! [`ConnectorConfig`] and a `read` function, and one line adding its
//! [`Kind`] to the list (see `tests/tests/connector_kind.rs`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde::de::DeserializeOwned;

use crate::{Connector, ConnectorError, Secret};

/// What a kind's table may ask of the configuration it is read from.
pub trait Setting {
    /// The value of a credential reference (`${env:NAME}` or
    /// `${file:PATH}`); a literal value is refused.
    fn secret(&self, reference: &str) -> Result<Secret, String>;
    /// A path of the table, anchored at the configuration file's folder.
    fn path(&self, path: &Path) -> PathBuf;
    /// A variable of the process environment (a cloud's own defaults).
    fn var(&self, name: &str) -> Option<String>;
}

/// A problem in a connector table: the message, and the keys (within the
/// table) of the value at fault, so that it can be located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub at: Vec<&'static str>,
    pub message: String,
}

impl Invalid {
    pub fn at(keys: &[&'static str], message: impl Into<String>) -> Invalid {
        Invalid {
            at: keys.to_vec(),
            message: message.into(),
        }
    }
}

/// One partner's connector settings, checked, with their credentials
/// resolved: what builds the connector.
#[async_trait]
pub trait ConnectorConfig: fmt::Debug + Send + Sync {
    /// Builds the connector (no request is sent: the gateway probes it).
    async fn build(&self) -> Result<Arc<dyn Connector>, ConnectorError>;
}

/// How a kind reads its table (without its `kind`).
pub type Read = fn(toml::Value, &dyn Setting) -> Result<Box<dyn ConnectorConfig>, Invalid>;

/// A connector kind: the name `kind = "…"` gives it, and how its table is
/// read.
#[derive(Clone, Copy)]
pub struct Kind {
    pub name: &'static str,
    pub read: Read,
}

impl fmt::Debug for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kind").field("name", &self.name).finish()
    }
}

/// The kinds meshgate has.
pub fn builtin() -> Vec<Kind> {
    vec![
        crate::files::KIND,
        crate::dicomweb::config::KIND,
        crate::gcp::KIND,
        crate::azure::KIND,
        crate::aws::KIND,
    ]
}

/// The table as `T`, fields it does not know refused.
pub fn typed<T: DeserializeOwned>(table: toml::Value) -> Result<T, Invalid> {
    T::deserialize(table).map_err(|error| Invalid::at(&[], error.message().to_owned()))
}

/// What a cloud resource name may hold.
pub const RESOURCE_NAME_RULE: &str = "must be letters, digits, '-', '_' or '.'";

/// Checks cloud resource names (absent ones pass): letters, digits, `-`,
/// `_`, `.` — no slashes, and not `.` or `..`, so a name cannot change the
/// URL it is put into.
pub fn resource_names(names: &[(&'static str, Option<&String>)]) -> Result<(), Invalid> {
    let valid = |name: &str| {
        !name.is_empty()
            && name.len() <= 256
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && name != "."
            && name != ".."
    };
    match names
        .iter()
        .find(|(_, value)| value.is_some_and(|v| !valid(v)))
    {
        Some((name, _)) => Err(Invalid::at(&[name], format!("{name} {RESOURCE_NAME_RULE}"))),
        None => Ok(()),
    }
}

/// A URL a table names (`key`), with a service's default.
pub fn url(
    key: &'static str,
    given: Option<&str>,
    default: impl FnOnce() -> String,
) -> Result<reqwest::Url, Invalid> {
    let text = given.map_or_else(default, str::to_owned);
    reqwest::Url::parse(&text)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .ok_or_else(|| Invalid::at(&[key], format!("{key} must be an http:// or https:// URL")))
}
