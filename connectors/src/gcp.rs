//! `kind = "gcp"`: a Google Cloud Healthcare API DICOM store, through its
//! DICOMweb API with OAuth2 tokens from a service account key or the
//! metadata server.

use serde::Deserialize;

use crate::dicomweb::Profile;
use crate::dicomweb::config::with_tokens;
use crate::kind::{self, ConnectorConfig, Invalid, Kind, Setting};
use crate::token::{
    GOOGLE_HEALTHCARE_SCOPE, GOOGLE_METADATA_TOKEN_URL, GoogleServiceAccount, MetadataServer,
    TokenSource,
};

pub const KIND: Kind = Kind { name: "gcp", read };

/// The public API root.
pub const DEFAULT_ENDPOINT: &str = "https://healthcare.googleapis.com/v1";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    project: String,
    location: String,
    dataset: String,
    dicom_store: String,
    credentials: Credentials,
    /// The API root; default [`DEFAULT_ENDPOINT`].
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    page_size: Option<u32>,
}

/// Where the access tokens come from.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum Credentials {
    /// A service account key file, as `${file:PATH}`.
    ServiceAccount { key: String },
    /// The metadata server (a VM's service account, or GKE workload identity).
    MetadataServer {
        #[serde(default)]
        url: Option<String>,
    },
}

fn read(table: toml::Value, setting: &dyn Setting) -> Result<Box<dyn ConnectorConfig>, Invalid> {
    let table: Table = kind::typed(table)?;
    kind::resource_names(&[
        ("project", Some(&table.project)),
        ("location", Some(&table.location)),
        ("dataset", Some(&table.dataset)),
        ("dicom_store", Some(&table.dicom_store)),
    ])?;
    let at = |keys: &[&'static str]| {
        let keys = keys.to_vec();
        move |error: crate::ConnectorError| Invalid {
            at: keys.clone(),
            message: error.to_string(),
        }
    };
    let source: Box<dyn TokenSource> = match &table.credentials {
        Credentials::ServiceAccount { key } => {
            let key = setting
                .secret(key)
                .map_err(|message| Invalid::at(&["credentials", "key"], message))?;
            Box::new(
                GoogleServiceAccount::from_key_file(&key, GOOGLE_HEALTHCARE_SCOPE)
                    .map_err(at(&["credentials", "key"]))?,
            )
        }
        Credentials::MetadataServer { url } => Box::new(
            MetadataServer::google(url.as_deref().unwrap_or(GOOGLE_METADATA_TOKEN_URL))
                .map_err(at(&["credentials", "url"]))?,
        ),
    };
    let root = table.endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT);
    let base = format!(
        "{}/projects/{}/locations/{}/datasets/{}/dicomStores/{}/dicomWeb/",
        root.trim_end_matches('/'),
        table.project,
        table.location,
        table.dataset,
        table.dicom_store
    );
    Ok(Box::new(with_tokens(
        &base,
        Profile::Gcp,
        source,
        table.page_size,
    )?))
}
