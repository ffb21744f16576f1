//! `kind = "aws"`: an AWS HealthImaging data store, through its DICOMweb
//! API (SigV4-signed QIDO-RS) or its native API (`api = "native"`), with
//! credentials from the SDKs' default chain or keys given as references.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use crate::aws_credentials::{
    AwsCredentialProvider, AwsCredentialSource, AwsEndpoints, ProcessAwsEnvironment, StaticSource,
    default_chain,
};
use crate::dicomweb::config::DETAIL_CONCURRENCY;
use crate::dicomweb::{Auth, DicomWebSettings, Profile};
use crate::healthimaging::{self, HealthImagingConnector, HealthImagingSettings};
use crate::kind::{self, ConnectorConfig, Invalid, Kind, Setting};
use crate::sigv4::{AwsCredentials, HEALTHIMAGING_SERVICE};
use crate::{Connector, ConnectorError};

pub const KIND: Kind = Kind { name: "aws", read };

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    region: String,
    datastore_id: String,
    /// Which of the data store's APIs to use.
    #[serde(default)]
    api: Api,
    #[serde(default)]
    credentials: Credentials,
    /// The service URL; default
    /// `https://dicom-medical-imaging.{region}.amazonaws.com` (DICOMweb)
    /// or `https://runtime-medical-imaging.{region}.amazonaws.com`
    /// (native).
    #[serde(default)]
    endpoint: Option<String>,
    /// DICOMweb only: the native API's pages are 50 image sets.
    #[serde(default)]
    page_size: Option<u32>,
    /// DICOMweb only: the most records one search returns (AWS documents
    /// 10,000, the default); reaching it is TRUNCATED.
    #[serde(default)]
    max_results: Option<u32>,
}

/// Which HealthImaging API a partner is reached through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Api {
    /// The DICOMweb (QIDO-RS) API: studies directly, at most 10,000
    /// records per search.
    #[default]
    Dicomweb,
    /// The native API: `SearchImageSets` and `GetImageSetMetadata`, image
    /// sets grouped into studies, no result cap.
    Native,
}

/// Where the credentials come from.
#[derive(Debug, Default, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum Credentials {
    /// The SDKs' default chain: environment, shared credentials profile, web
    /// identity, container endpoint, instance role.
    #[default]
    Chain,
    /// Keys given here, as references.
    Static {
        access_key_id: String,
        secret_access_key: String,
    },
}

/// An AWS partner, checked: either API's settings.
#[derive(Debug)]
enum AwsConfig {
    Dicomweb(DicomWebSettings),
    Native(HealthImagingSettings),
}

fn read(table: toml::Value, setting: &dyn Setting) -> Result<Box<dyn ConnectorConfig>, Invalid> {
    let table: Table = kind::typed(table)?;
    kind::resource_names(&[
        ("region", Some(&table.region)),
        ("datastore_id", Some(&table.datastore_id)),
    ])?;
    let region = table.region;
    let chain: Vec<Box<dyn AwsCredentialSource>> = match table.credentials {
        Credentials::Chain => default_chain(
            Arc::new(ProcessAwsEnvironment),
            AwsEndpoints::for_region(&region),
        ),
        Credentials::Static {
            access_key_id,
            secret_access_key,
        } => vec![Box::new(StaticSource(AwsCredentials {
            access_key_id,
            secret_access_key: setting
                .secret(&secret_access_key)
                .map_err(|message| Invalid::at(&["credentials", "secret_access_key"], message))?,
            session_token: None,
        }))],
    };
    let credentials = Arc::new(
        AwsCredentialProvider::new(chain)
            .map_err(|error| Invalid::at(&["credentials"], error.to_string()))?,
    );
    let datastore_id = table.datastore_id;
    Ok(Box::new(match table.api {
        Api::Dicomweb => {
            let root = kind::url("endpoint", table.endpoint.as_deref(), || {
                format!("https://dicom-medical-imaging.{region}.amazonaws.com")
            })?;
            let base_url = reqwest::Url::parse(&format!(
                "{}/datastore/{datastore_id}/",
                root.as_str().trim_end_matches('/')
            ))
            .map_err(|_| Invalid::at(&["endpoint"], "the service URL is not valid"))?;
            AwsConfig::Dicomweb(DicomWebSettings {
                base_url,
                profile: Profile::Aws,
                auth: Auth::SigV4 {
                    credentials,
                    region,
                    service: HEALTHIMAGING_SERVICE,
                },
                page_size: table.page_size,
                detail_concurrency: DETAIL_CONCURRENCY,
                max_results: table.max_results,
            })
        }
        Api::Native => {
            let root = kind::url("endpoint", table.endpoint.as_deref(), || {
                healthimaging::default_endpoint(&region)
            })?;
            let endpoint =
                reqwest::Url::parse(&format!("{}/", root.as_str().trim_end_matches('/')))
                    .map_err(|_| Invalid::at(&["endpoint"], "the service URL is not valid"))?;
            AwsConfig::Native(HealthImagingSettings {
                endpoint,
                region,
                datastore_id,
                credentials,
                detail_concurrency: DETAIL_CONCURRENCY,
            })
        }
    }))
}

#[async_trait]
impl ConnectorConfig for AwsConfig {
    async fn build(&self) -> Result<Arc<dyn Connector>, ConnectorError> {
        match self {
            AwsConfig::Dicomweb(settings) => settings.build().await,
            AwsConfig::Native(settings) => {
                Ok(Arc::new(HealthImagingConnector::new(settings.clone())?))
            }
        }
    }
}
