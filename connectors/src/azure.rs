//! `kind = "azure"`: an Azure Health Data Services DICOM service (API v2),
//! with Entra ID tokens from a client secret, a managed identity (IMDS on
//! virtual machines; `IDENTITY_ENDPOINT` on App Service, Container Apps
//! and Functions) or workload identity federation.

use std::path::PathBuf;

use serde::Deserialize;

use crate::dicomweb::Profile;
use crate::dicomweb::config::with_tokens;
use crate::kind::{self, ConnectorConfig, Invalid, Kind, Setting};
use crate::token::{
    AZURE_DICOM_RESOURCE, AZURE_DICOM_SCOPE, AZURE_IMDS_TOKEN_URL, ClientCredentials, ClientProof,
    MetadataServer, TokenSource,
};
use crate::{ConnectorError, Secret};

pub const KIND: Kind = Kind {
    name: "azure",
    read,
};

/// The public cloud's Entra ID authority.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    workspace: String,
    service: String,
    /// The data partition, when the service uses partitions.
    #[serde(default)]
    partition: Option<String>,
    credentials: Credentials,
    /// The service URL; default
    /// `https://{workspace}-{service}.dicom.azurehealthcareapis.com`.
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    page_size: Option<u32>,
}

/// Where the Entra ID tokens come from.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum Credentials {
    /// An app registration's client secret.
    ClientSecret {
        tenant: String,
        client_id: String,
        /// A credential reference.
        secret: String,
        /// Default [`DEFAULT_AUTHORITY`] (or `AZURE_AUTHORITY_HOST`).
        #[serde(default)]
        authority: Option<String>,
    },
    /// The instance's managed identity.
    ManagedIdentity {
        /// For a user-assigned identity.
        #[serde(default)]
        client_id: Option<String>,
        #[serde(default)]
        url: Option<String>,
    },
    /// Workload identity federation: a platform-issued token in a file,
    /// exchanged for an Entra ID token. Unset fields come from
    /// `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_FEDERATED_TOKEN_FILE`
    /// and `AZURE_AUTHORITY_HOST`, as AKS sets them.
    WorkloadIdentity {
        #[serde(default)]
        tenant: Option<String>,
        #[serde(default)]
        client_id: Option<String>,
        #[serde(default)]
        token_file: Option<PathBuf>,
        #[serde(default)]
        authority: Option<String>,
    },
}

fn read(table: toml::Value, setting: &dyn Setting) -> Result<Box<dyn ConnectorConfig>, Invalid> {
    let table: Table = kind::typed(table)?;
    kind::resource_names(&[
        ("workspace", Some(&table.workspace)),
        ("service", Some(&table.service)),
        ("partition", table.partition.as_ref()),
    ])?;
    let failed = |error: ConnectorError| Invalid::at(&["credentials"], error.to_string());
    let token_url = |authority: &Option<String>, tenant: &str| {
        let authority = authority
            .clone()
            .or_else(|| setting.var("AZURE_AUTHORITY_HOST"))
            .unwrap_or_else(|| DEFAULT_AUTHORITY.to_owned());
        ClientCredentials::token_url(&authority, tenant).map_err(failed)
    };
    let source: Box<dyn TokenSource> = match &table.credentials {
        Credentials::ClientSecret {
            tenant,
            client_id,
            secret,
            authority,
        } => Box::new(ClientCredentials {
            token_url: token_url(authority, tenant)?,
            client_id: client_id.clone(),
            proof: ClientProof::Secret(
                setting
                    .secret(secret)
                    .map_err(|message| Invalid::at(&["credentials", "secret"], message))?,
            ),
            scope: AZURE_DICOM_SCOPE.to_owned(),
        }),
        // Off virtual machines the platform sets IDENTITY_ENDPOINT and
        // IDENTITY_HEADER; on one, IMDS answers.
        Credentials::ManagedIdentity { client_id, url } => {
            let app_service = setting
                .var("IDENTITY_ENDPOINT")
                .zip(setting.var("IDENTITY_HEADER"))
                .filter(|_| url.is_none());
            Box::new(
                match app_service {
                    Some((endpoint, header)) => MetadataServer::azure_app_service(
                        &endpoint,
                        Secret::new(header),
                        AZURE_DICOM_RESOURCE,
                        client_id.as_deref(),
                    ),
                    None => MetadataServer::azure(
                        url.as_deref().unwrap_or(AZURE_IMDS_TOKEN_URL),
                        AZURE_DICOM_RESOURCE,
                        client_id.as_deref(),
                    ),
                }
                .map_err(failed)?,
            )
        }
        Credentials::WorkloadIdentity {
            tenant,
            client_id,
            token_file,
            authority,
        } => {
            let missing = |what: &str| {
                Invalid::at(
                    &["credentials"],
                    format!(
                        "workload identity needs {what} (in the configuration or the environment)"
                    ),
                )
            };
            let tenant = tenant
                .clone()
                .or_else(|| setting.var("AZURE_TENANT_ID"))
                .ok_or_else(|| missing("a tenant"))?;
            let client_id = client_id
                .clone()
                .or_else(|| setting.var("AZURE_CLIENT_ID"))
                .ok_or_else(|| missing("a client id"))?;
            let token_file = match token_file {
                Some(file) => setting.path(file),
                None => setting
                    .var("AZURE_FEDERATED_TOKEN_FILE")
                    .map(PathBuf::from)
                    .ok_or_else(|| missing("a federated token file"))?,
            };
            Box::new(ClientCredentials {
                token_url: token_url(authority, &tenant)?,
                client_id,
                proof: ClientProof::AssertionFile(token_file),
                scope: AZURE_DICOM_SCOPE.to_owned(),
            })
        }
    };
    let root = table.endpoint.clone().unwrap_or_else(|| {
        format!(
            "https://{}-{}.dicom.azurehealthcareapis.com",
            table.workspace, table.service
        )
    });
    let mut base = format!("{}/v2/", root.trim_end_matches('/'));
    if let Some(partition) = &table.partition {
        base.push_str(&format!("partitions/{partition}/"));
    }
    Ok(Box::new(with_tokens(
        &base,
        Profile::Azure,
        source,
        table.page_size,
    )?))
}
