//! Partners assembled from their configuration, and their connection
//! checks: the capability probe at start-up and after a reload, repeated
//! for a partner that did not answer until it does.

use std::sync::Arc;
use std::time::Duration;

use meshgate_connectors::aws_credentials::{
    AwsCredentialProvider, AwsCredentialSource, AwsEndpoints, ProcessAwsEnvironment, StaticSource,
    default_chain,
};
use meshgate_connectors::dicomweb::{Auth, DicomWebConnector, DicomWebSettings, Profile};
use meshgate_connectors::files::FilesConnector;
use meshgate_connectors::healthimaging::{self, HealthImagingConnector, HealthImagingSettings};
use meshgate_connectors::sigv4::{AwsCredentials, HEALTHIMAGING_SERVICE};
use meshgate_connectors::token::{
    AZURE_DICOM_RESOURCE, AZURE_DICOM_SCOPE, AZURE_IMDS_TOKEN_URL, ClientCredentials, ClientProof,
    GOOGLE_HEALTHCARE_SCOPE, GOOGLE_METADATA_TOKEN_URL, GoogleServiceAccount, MetadataServer,
    TokenProvider, TokenSource,
};
use meshgate_connectors::{Connector, ConnectorError};
use meshgate_schema::fhir::MappingOptions;

use crate::app::StartError;
use crate::config::{
    AuthConfig, AwsApi, AwsCredentialsConfig, AzureCredentials, ConnectorConfig, GcpCredentials,
    LoadedConfig, parse_utc_offset,
};
use crate::federation::{Partner, PartnerCheck, check_partners};
use crate::protection::Guard;

/// How long start-up (and a reload) waits for each new partner's
/// capability probe.
pub const STARTUP_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Probes `partners` (each within [`STARTUP_CHECK_TIMEOUT`]) so that
/// measured capabilities drive push-down from their first query, and logs
/// the outcome. A partner that cannot be checked is still served, on its
/// profile's assumptions; one that did not answer at all is probed again
/// until it does (one that answered — refused credentials, throttled —
/// needs its operator, not more requests).
pub async fn check_and_watch(partners: &[Arc<Partner>]) -> Vec<PartnerCheck> {
    let checks = check_partners(partners, STARTUP_CHECK_TIMEOUT).await;
    for check in &checks {
        match &check.outcome {
            Ok(latency) => tracing::info!(
                partner = %check.partner.id,
                latency_ms = latency.as_millis() as u64,
                measured = check.partner.connector.capabilities().measured,
                "partner checked"
            ),
            Err(failure) => {
                tracing::warn!(
                    partner = %check.partner.id,
                    code = failure.code(),
                    "partner could not be checked; using its profile's assumed capabilities"
                );
                if !check.reachable() {
                    tokio::spawn(recheck(Arc::downgrade(&check.partner)));
                }
            }
        }
    }
    checks
}

/// The first pause before probing again a partner that could not be
/// checked (at start-up or after a reload); pauses double up to
/// [`RECHECK_MAX_PAUSE`].
pub const RECHECK_FIRST_PAUSE: Duration = Duration::from_secs(2);
pub const RECHECK_MAX_PAUSE: Duration = Duration::from_secs(300);

/// Probes a partner that could not be reached again, with growing pauses,
/// until it answers: a partner that comes back gets its measured
/// capabilities without a restart. Ends when the partner is no longer in
/// use (removed or changed by a reload, or the gateway stopped).
async fn recheck(partner: std::sync::Weak<Partner>) {
    let mut pause = RECHECK_FIRST_PAUSE;
    loop {
        tokio::time::sleep(pause).await;
        let Some(partner) = partner.upgrade() else {
            return;
        };
        if let Ok(Ok(_)) =
            tokio::time::timeout(STARTUP_CHECK_TIMEOUT, partner.connector.check()).await
        {
            tracing::info!(partner = %partner.id, "partner checked after it came back");
            return;
        }
        pause = (pause * 2).min(RECHECK_MAX_PAUSE);
    }
}

/// Builds partner `index` of `loaded` as configured: its connector (with
/// its resolved credential), guard, deadline and disclosure settings.
pub async fn build_partner(loaded: &LoadedConfig, index: usize) -> Result<Partner, StartError> {
    let partner = &loaded.config.partners[index];
    let id = partner.id.get_ref().clone();
    let failed = |source| StartError::Connector {
        partner: id.clone(),
        source,
    };
    // The partner's resolved credential, which its configuration refers to.
    let secret = || {
        loaded
            .secrets
            .for_partner(index)
            .cloned()
            .ok_or_else(|| failed(ConnectorError::Config("credential missing".into())))
    };
    let connector: Arc<dyn Connector> = match &partner.connector {
        ConnectorConfig::Files {
            path,
            rescan_interval_ms,
        } => Arc::new(
            FilesConnector::open(
                path.clone(),
                Duration::from_millis((*rescan_interval_ms).max(100)),
            )
            .await
            .map_err(failed)?,
        ),
        ConnectorConfig::Gcp {
            project,
            location,
            dataset,
            dicom_store,
            credentials,
            endpoint,
            page_size,
        } => {
            let root = endpoint
                .as_deref()
                .unwrap_or("https://healthcare.googleapis.com/v1")
                .trim_end_matches('/');
            let base = format!(
                "{root}/projects/{project}/locations/{location}/datasets/{dataset}/dicomStores/{dicom_store}/dicomWeb/"
            );
            let source: Box<dyn TokenSource> = match credentials {
                GcpCredentials::ServiceAccount { .. } => Box::new(
                    GoogleServiceAccount::from_key_file(&secret()?, GOOGLE_HEALTHCARE_SCOPE)
                        .map_err(failed)?,
                ),
                GcpCredentials::MetadataServer { url } => Box::new(
                    MetadataServer::google(url.as_deref().unwrap_or(GOOGLE_METADATA_TOKEN_URL))
                        .map_err(failed)?,
                ),
            };
            cloud_dicomweb(&base, Profile::Gcp, source, *page_size).map_err(failed)?
        }
        ConnectorConfig::Aws {
            region,
            datastore_id,
            api,
            credentials,
            endpoint,
            page_size,
            max_results,
        } => {
            let chain: Vec<Box<dyn AwsCredentialSource>> = match credentials {
                AwsCredentialsConfig::Chain => default_chain(
                    Arc::new(ProcessAwsEnvironment),
                    AwsEndpoints::for_region(region),
                ),
                AwsCredentialsConfig::Static { access_key_id, .. } => {
                    vec![Box::new(StaticSource(AwsCredentials {
                        access_key_id: access_key_id.clone(),
                        secret_access_key: secret()?,
                        session_token: None,
                    }))]
                }
            };
            let credentials = Arc::new(AwsCredentialProvider::new(chain).map_err(failed)?);
            let invalid_url = || {
                failed(ConnectorError::Config(
                    "the service URL is not valid".into(),
                ))
            };
            match api {
                AwsApi::Dicomweb => {
                    let root = endpoint.clone().unwrap_or_else(|| {
                        format!("https://dicom-medical-imaging.{region}.amazonaws.com")
                    });
                    let base = format!("{}/datastore/{datastore_id}/", root.trim_end_matches('/'));
                    let base_url = meshgate_connectors::dicomweb::Url::parse(&base)
                        .map_err(|_| invalid_url())?;
                    Arc::new(
                        DicomWebConnector::new(DicomWebSettings {
                            base_url,
                            profile: Profile::Aws,
                            auth: Auth::SigV4 {
                                credentials,
                                region: region.clone(),
                                service: HEALTHIMAGING_SERVICE,
                            },
                            page_size: *page_size,
                            detail_concurrency: 8,
                            max_results: *max_results,
                        })
                        .map_err(failed)?,
                    )
                }
                AwsApi::Native => {
                    let root = endpoint
                        .clone()
                        .unwrap_or_else(|| healthimaging::default_endpoint(region));
                    let endpoint = meshgate_connectors::dicomweb::Url::parse(&format!(
                        "{}/",
                        root.trim_end_matches('/')
                    ))
                    .map_err(|_| invalid_url())?;
                    Arc::new(
                        HealthImagingConnector::new(HealthImagingSettings {
                            endpoint,
                            region: region.clone(),
                            datastore_id: datastore_id.clone(),
                            credentials,
                            detail_concurrency: 8,
                        })
                        .map_err(failed)?,
                    )
                }
            }
        }
        ConnectorConfig::Azure {
            workspace,
            service,
            partition,
            credentials,
            endpoint,
            page_size,
        } => {
            let root = endpoint.clone().unwrap_or_else(|| {
                format!("https://{workspace}-{service}.dicom.azurehealthcareapis.com")
            });
            let mut base = format!("{}/v2/", root.trim_end_matches('/'));
            if let Some(partition) = partition {
                base.push_str(&format!("partitions/{partition}/"));
            }
            let authority_url = |authority: &Option<String>, tenant: &str| {
                let authority = authority
                    .clone()
                    .or_else(|| std::env::var("AZURE_AUTHORITY_HOST").ok())
                    .unwrap_or_else(|| "https://login.microsoftonline.com".to_owned());
                ClientCredentials::token_url(&authority, tenant)
            };
            let source: Box<dyn TokenSource> = match credentials {
                AzureCredentials::ClientSecret {
                    tenant,
                    client_id,
                    authority,
                    ..
                } => Box::new(ClientCredentials {
                    token_url: authority_url(authority, tenant).map_err(failed)?,
                    client_id: client_id.clone(),
                    proof: ClientProof::Secret(secret()?),
                    scope: AZURE_DICOM_SCOPE.to_owned(),
                }),
                // Off virtual machines (App Service, Container Apps,
                // Functions) the platform sets IDENTITY_ENDPOINT and
                // IDENTITY_HEADER; on one, IMDS answers.
                AzureCredentials::ManagedIdentity { client_id, url } => {
                    let app_service = std::env::var("IDENTITY_ENDPOINT")
                        .ok()
                        .zip(std::env::var("IDENTITY_HEADER").ok())
                        .filter(|_| url.is_none());
                    Box::new(
                        match app_service {
                            Some((endpoint, header)) => MetadataServer::azure_app_service(
                                &endpoint,
                                meshgate_connectors::Secret::new(header),
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
                AzureCredentials::WorkloadIdentity {
                    tenant,
                    client_id,
                    token_file,
                    authority,
                } => {
                    let from_env = |name: &str| std::env::var(name).ok();
                    let missing = |what: &str| {
                        failed(ConnectorError::Config(format!(
                            "workload identity needs {what} (in the configuration or the environment)"
                        )))
                    };
                    let tenant = tenant
                        .clone()
                        .or_else(|| from_env("AZURE_TENANT_ID"))
                        .ok_or_else(|| missing("a tenant"))?;
                    let client_id = client_id
                        .clone()
                        .or_else(|| from_env("AZURE_CLIENT_ID"))
                        .ok_or_else(|| missing("a client id"))?;
                    let token_file = token_file
                        .clone()
                        .or_else(|| from_env("AZURE_FEDERATED_TOKEN_FILE").map(Into::into))
                        .ok_or_else(|| missing("a federated token file"))?;
                    Box::new(ClientCredentials {
                        token_url: authority_url(authority, &tenant).map_err(failed)?,
                        client_id,
                        proof: ClientProof::AssertionFile(token_file),
                        scope: AZURE_DICOM_SCOPE.to_owned(),
                    })
                }
            };
            cloud_dicomweb(&base, Profile::Azure, source, *page_size).map_err(failed)?
        }
        ConnectorConfig::Dicomweb {
            url,
            profile,
            page_size,
            max_results,
            auth,
        } => {
            let base_url = meshgate_connectors::dicomweb::Url::parse(url)
                .map_err(|_| failed(ConnectorError::Config("url is not valid".into())))?;
            let auth = match auth {
                AuthConfig::None => Auth::None,
                AuthConfig::Basic { username, .. } => Auth::Basic {
                    username: username.clone(),
                    password: secret()?,
                },
                AuthConfig::Bearer { .. } => Auth::Bearer { token: secret()? },
            };
            Arc::new(
                DicomWebConnector::new(DicomWebSettings {
                    base_url,
                    profile: *profile,
                    auth,
                    page_size: *page_size,
                    detail_concurrency: 8,
                    max_results: *max_results,
                })
                .map_err(failed)?,
            )
        }
    };
    Ok(Partner {
        id,
        generation: Partner::next_generation(),
        name: partner.name.clone(),
        connector,
        guard: Guard::new(partner.protection),
        deadline: partner.deadline(),
        control: partner.count_control(),
        budget: partner.budget,
        mapping: MappingOptions {
            utc_offset: partner
                .utc_offset
                .as_ref()
                .and_then(|o| parse_utc_offset(o.get_ref())),
        },
    })
}

/// A DICOMweb connector to a cloud service reached with OAuth2 tokens.
fn cloud_dicomweb(
    base: &str,
    profile: Profile,
    source: Box<dyn TokenSource>,
    page_size: Option<u32>,
) -> Result<Arc<dyn Connector>, ConnectorError> {
    let base_url = meshgate_connectors::dicomweb::Url::parse(base)
        .map_err(|_| ConnectorError::Config("the service URL is not valid".into()))?;
    Ok(Arc::new(DicomWebConnector::new(DicomWebSettings {
        base_url,
        profile,
        auth: Auth::Tokens(Arc::new(TokenProvider::new(source)?)),
        page_size,
        detail_concurrency: 8,
        max_results: None,
    })?))
}
