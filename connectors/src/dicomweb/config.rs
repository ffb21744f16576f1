//! `kind = "dicomweb"`: an on-premises (or any) DICOMweb QIDO-RS service.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use super::{Auth, DicomWebConnector, DicomWebSettings, Profile, Url};
use crate::kind::{self, ConnectorConfig, Invalid, Kind, Setting};
use crate::token::{TokenProvider, TokenSource};
use crate::{Connector, ConnectorError};

pub const KIND: Kind = Kind {
    name: "dicomweb",
    read,
};

/// A DICOMweb partner's table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
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
    auth: AuthTable,
}

/// How the service is authenticated to.
#[derive(Debug, Default, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
enum AuthTable {
    #[default]
    None,
    Basic {
        username: String,
        /// A credential reference.
        password: String,
    },
    Bearer {
        /// A credential reference.
        token: String,
    },
}

fn read(table: toml::Value, setting: &dyn Setting) -> Result<Box<dyn ConnectorConfig>, Invalid> {
    let table: Table = kind::typed(table)?;
    let base_url = kind::url("url", Some(&table.url), String::new)?;
    let auth = match table.auth {
        AuthTable::None => Auth::None,
        AuthTable::Basic { username, password } => Auth::Basic {
            username,
            password: setting
                .secret(&password)
                .map_err(|message| Invalid::at(&["auth", "password"], message))?,
        },
        AuthTable::Bearer { token } => Auth::Bearer {
            token: setting
                .secret(&token)
                .map_err(|message| Invalid::at(&["auth", "token"], message))?,
        },
    };
    Ok(Box::new(DicomWebSettings {
        base_url,
        profile: table.profile,
        auth,
        page_size: table.page_size,
        detail_concurrency: DETAIL_CONCURRENCY,
        max_results: table.max_results,
    }))
}

/// Series and instance look-ups a connector runs at once.
pub const DETAIL_CONCURRENCY: usize = 8;

#[async_trait]
impl ConnectorConfig for DicomWebSettings {
    async fn build(&self) -> Result<Arc<dyn Connector>, ConnectorError> {
        Ok(Arc::new(DicomWebConnector::new(self.clone())?))
    }
}

/// The settings of a cloud's DICOMweb service at `base`, reached with
/// OAuth2 tokens from `source`.
pub fn with_tokens(
    base: &str,
    profile: Profile,
    source: Box<dyn TokenSource>,
    page_size: Option<u32>,
) -> Result<DicomWebSettings, Invalid> {
    let base_url =
        Url::parse(base).map_err(|_| Invalid::at(&["endpoint"], "the service URL is not valid"))?;
    let provider =
        TokenProvider::new(source).map_err(|error| Invalid::at(&[], error.to_string()))?;
    Ok(DicomWebSettings {
        base_url,
        profile,
        auth: Auth::Tokens(Arc::new(provider)),
        page_size,
        detail_concurrency: DETAIL_CONCURRENCY,
        max_results: None,
    })
}
