//! OAuth2 access tokens for cloud DICOMweb services, from each cloud's
//! standard credential sources, cached and refreshed before they expire.
//!
//! A [`TokenProvider`] holds one [`TokenSource`] and the current token. The
//! token is fetched again when less than five minutes (or a tenth of its
//! lifetime, if shorter) is left, one fetch at a time; a request that
//! gets `401` with a token [`TokenProvider::invalidate`]s it and retries
//! once. Tokens and keys are [`Secret`]s: never printed, never logged.
//!
//! Sources:
//! - [`GoogleServiceAccount`]: a service account key, exchanged through the
//!   OAuth2 JWT bearer grant (RFC 7523) at its `token_uri`;
//! - [`MetadataServer`]: a token endpoint on the instance (Google's metadata
//!   server for service accounts and workload identity; Azure's IMDS for
//!   managed identities);
//! - [`ClientCredentials`]: the OAuth2 client credentials grant, with a
//!   client secret or a federated client assertion read from a file (Entra
//!   ID client secret and workload identity).

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::Deserialize;

use crate::expiring::Expiring;
use crate::{ConnectorError, Secret};

/// Largest token response accepted.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// A freshly issued access token.
#[derive(Debug, Clone)]
pub struct AccessToken {
    pub token: Secret,
    pub expires_in: Duration,
}

/// Where access tokens come from.
#[async_trait]
pub trait TokenSource: Send + Sync + std::fmt::Debug {
    async fn fetch(&self, client: &reqwest::Client) -> Result<AccessToken, ConnectorError>;
}

/// A token source with its current token.
#[derive(Debug)]
pub struct TokenProvider {
    source: Box<dyn TokenSource>,
    client: reqwest::Client,
    current: Expiring<Secret>,
}

impl TokenProvider {
    pub fn new(source: Box<dyn TokenSource>) -> Result<TokenProvider, ConnectorError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|_| ConnectorError::Config("cannot build the token client".into()))?;
        Ok(TokenProvider {
            source,
            client,
            current: Expiring::new(),
        })
    }

    /// A token with time left; fetches a new one when the current one is
    /// close to expiry. Concurrent callers wait for one fetch.
    pub async fn token(&self) -> Result<Secret, ConnectorError> {
        self.current
            .get(|| async {
                let fresh = self.source.fetch(&self.client).await?;
                tracing::debug!(
                    expires_in_s = fresh.expires_in.as_secs(),
                    "access token fetched"
                );
                Ok((fresh.token, Some(fresh.expires_in)))
            })
            .await
    }

    /// Forgets `rejected` (a service answered 401 to it), so the next call
    /// fetches a new token. A token fetched meanwhile is kept.
    pub async fn invalidate(&self, rejected: &Secret) {
        self.current
            .forget_if(|held| held.expose() == rejected.expose())
            .await;
    }
}

/// The usual OAuth2 token response. `expires_in` may be a number or, from
/// Azure's IMDS, a string.
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    /// Azure App Service's managed identity endpoint gives the expiry as a
    /// Unix time (a string) instead of a lifetime.
    #[serde(default)]
    expires_on: Option<serde_json::Value>,
}

fn seconds(value: Option<&serde_json::Value>) -> Option<u64> {
    match value? {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Sends a token request and reads the token; errors never carry the body.
async fn exchange(request: reqwest::RequestBuilder) -> Result<AccessToken, ConnectorError> {
    let response = request
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|error| {
            ConnectorError::Unreachable(if error.is_timeout() {
                "token endpoint timed out"
            } else {
                "token endpoint unreachable"
            })
        })?;
    let status = response.status();
    if status == reqwest::StatusCode::BAD_REQUEST || status == reqwest::StatusCode::UNAUTHORIZED {
        // OAuth2 reports bad credentials as 400 invalid_grant / invalid_client.
        return Err(ConnectorError::Unauthorized(status.as_u16()));
    }
    if !status.is_success() {
        return Err(ConnectorError::UpstreamStatus(status.as_u16()));
    }
    // Refuse an announced oversized answer before reading it.
    if response
        .content_length()
        .is_some_and(|n| n > MAX_TOKEN_RESPONSE as u64)
    {
        return Err(ConnectorError::BadResponse);
    }
    let body = response
        .bytes()
        .await
        .map_err(|_| ConnectorError::BadResponse)?;
    if body.len() > MAX_TOKEN_RESPONSE {
        return Err(ConnectorError::BadResponse);
    }
    let parsed: TokenResponse =
        serde_json::from_slice(&body).map_err(|_| ConnectorError::BadResponse)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let seconds = seconds(parsed.expires_in.as_ref())
        .or_else(|| seconds(parsed.expires_on.as_ref()).map(|at| at.saturating_sub(now)))
        // Without a lifetime, assume the shortest common one.
        .unwrap_or(300);
    if parsed.access_token.is_empty() {
        return Err(ConnectorError::BadResponse);
    }
    Ok(AccessToken {
        token: Secret::new(parsed.access_token),
        expires_in: Duration::from_secs(seconds),
    })
}

/// The scope of Google Cloud Healthcare API tokens.
pub const GOOGLE_HEALTHCARE_SCOPE: &str = "https://www.googleapis.com/auth/cloud-healthcare";

/// A Google service account key (the JSON file's `client_email`,
/// `private_key` and `token_uri`), exchanged through the JWT bearer grant.
#[derive(Debug)]
pub struct GoogleServiceAccount {
    pub client_email: String,
    pub private_key: Secret,
    pub token_uri: reqwest::Url,
    pub scope: String,
}

/// The fields of a service account key file meshgate uses.
#[derive(Deserialize)]
struct ServiceAccountKey {
    client_email: String,
    private_key: String,
    token_uri: String,
}

impl GoogleServiceAccount {
    /// From the text of a service account key file.
    pub fn from_key_file(
        text: &Secret,
        scope: &str,
    ) -> Result<GoogleServiceAccount, ConnectorError> {
        let key: ServiceAccountKey = serde_json::from_str(text.expose()).map_err(|_| {
            ConnectorError::Config(
                "the service account key is not a key file (client_email, private_key, token_uri)"
                    .into(),
            )
        })?;
        let token_uri = reqwest::Url::parse(&key.token_uri)
            .map_err(|_| ConnectorError::Config("the key file's token_uri is not a URL".into()))?;
        Ok(GoogleServiceAccount {
            client_email: key.client_email,
            private_key: Secret::new(key.private_key),
            token_uri,
            scope: scope.to_owned(),
        })
    }
}

#[async_trait]
impl TokenSource for GoogleServiceAccount {
    async fn fetch(&self, client: &reqwest::Client) -> Result<AccessToken, ConnectorError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": self.scope,
            "aud": self.token_uri.as_str(),
            "iat": now,
            "exp": now + 3600,
        });
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(self.private_key.expose().as_bytes())
            .map_err(|_| {
                ConnectorError::Config(
                    "the service account's private key is not an RSA PEM key".into(),
                )
            })?;
        let assertion = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &key,
        )
        .map_err(|_| ConnectorError::Config("cannot sign with the service account key".into()))?;
        exchange(client.post(self.token_uri.clone()).form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", assertion.as_str()),
        ]))
        .await
    }
}

/// A token endpoint on the instance: Google's metadata server
/// (`Metadata-Flavor: Google`) or Azure's IMDS (`Metadata: true`).
#[derive(Debug)]
pub struct MetadataServer {
    pub url: reqwest::Url,
    /// The header the endpoint requires, as (name, value); the value is a
    /// secret on App Service (`X-IDENTITY-HEADER`).
    pub header: (&'static str, Secret),
}

/// Google's metadata server token endpoint for the default service account.
pub const GOOGLE_METADATA_TOKEN_URL: &str =
    "http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token";

/// Azure's instance metadata service token endpoint.
pub const AZURE_IMDS_TOKEN_URL: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

fn url(text: &str) -> Result<reqwest::Url, ConnectorError> {
    reqwest::Url::parse(text)
        .map_err(|_| ConnectorError::Config("the token URL is not a URL".into()))
}

impl MetadataServer {
    /// A Google metadata server token endpoint ([`GOOGLE_METADATA_TOKEN_URL`]
    /// on an instance).
    pub fn google(token_url: &str) -> Result<MetadataServer, ConnectorError> {
        Ok(MetadataServer {
            url: url(token_url)?,
            header: ("Metadata-Flavor", Secret::new("Google")),
        })
    }

    /// An Azure IMDS token endpoint ([`AZURE_IMDS_TOKEN_URL`] on an
    /// instance) for the managed identity (`client_id` for a user-assigned
    /// one), with a token for `resource`.
    pub fn azure(
        token_url: &str,
        resource: &str,
        client_id: Option<&str>,
    ) -> Result<MetadataServer, ConnectorError> {
        Ok(MetadataServer {
            url: managed_identity_url(token_url, "2018-02-01", resource, client_id)?,
            header: ("Metadata", Secret::new("true")),
        })
    }

    /// The managed identity endpoint of Azure App Service, Container Apps
    /// and Functions: `IDENTITY_ENDPOINT`, asked with the
    /// `X-IDENTITY-HEADER` secret (`IDENTITY_HEADER`) and
    /// `api-version=2019-08-01`; it answers with `expires_on`.
    pub fn azure_app_service(
        endpoint: &str,
        identity_header: Secret,
        resource: &str,
        client_id: Option<&str>,
    ) -> Result<MetadataServer, ConnectorError> {
        Ok(MetadataServer {
            url: managed_identity_url(endpoint, "2019-08-01", resource, client_id)?,
            header: ("X-IDENTITY-HEADER", identity_header),
        })
    }
}

/// An Azure managed identity token URL: `endpoint` with the API version,
/// the resource and, for a user-assigned identity, its client id.
fn managed_identity_url(
    endpoint: &str,
    api_version: &str,
    resource: &str,
    client_id: Option<&str>,
) -> Result<reqwest::Url, ConnectorError> {
    let mut url = url(endpoint)?;
    url.query_pairs_mut()
        .append_pair("api-version", api_version)
        .append_pair("resource", resource);
    if let Some(client_id) = client_id {
        url.query_pairs_mut().append_pair("client_id", client_id);
    }
    Ok(url)
}

#[async_trait]
impl TokenSource for MetadataServer {
    async fn fetch(&self, client: &reqwest::Client) -> Result<AccessToken, ConnectorError> {
        exchange(
            client
                .get(self.url.clone())
                .header(self.header.0, self.header.1.expose()),
        )
        .await
    }
}

/// How a client proves itself in the client credentials grant.
#[derive(Debug)]
pub enum ClientProof {
    Secret(Secret),
    /// A federated token in a file (re-read for every fetch, since the
    /// platform rotates it), sent as a JWT client assertion.
    AssertionFile(PathBuf),
}

/// The OAuth2 client credentials grant (Entra ID client secret and
/// workload identity federation).
#[derive(Debug)]
pub struct ClientCredentials {
    pub token_url: reqwest::Url,
    pub client_id: String,
    pub proof: ClientProof,
    pub scope: String,
}

/// The resource of Azure DICOM service tokens (for IMDS).
pub const AZURE_DICOM_RESOURCE: &str = "https://dicom.healthcareapis.azure.com";
/// The scope of Azure DICOM service tokens (for Entra ID).
pub const AZURE_DICOM_SCOPE: &str = "https://dicom.healthcareapis.azure.com/.default";

impl ClientCredentials {
    /// The Entra ID token endpoint of `tenant` at `authority`
    /// (`https://login.microsoftonline.com` in the public cloud).
    pub fn token_url(authority: &str, tenant: &str) -> Result<reqwest::Url, ConnectorError> {
        let valid = !tenant.is_empty()
            && tenant
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'));
        if !valid {
            return Err(ConnectorError::Config(
                "the tenant is not a tenant id or domain".into(),
            ));
        }
        reqwest::Url::parse(&format!(
            "{}/{tenant}/oauth2/v2.0/token",
            authority.trim_end_matches('/')
        ))
        .map_err(|_| ConnectorError::Config("the authority is not a URL".into()))
    }
}

#[async_trait]
impl TokenSource for ClientCredentials {
    async fn fetch(&self, client: &reqwest::Client) -> Result<AccessToken, ConnectorError> {
        let mut form = vec![
            ("grant_type", "client_credentials".to_owned()),
            ("client_id", self.client_id.clone()),
            ("scope", self.scope.clone()),
        ];
        match &self.proof {
            ClientProof::Secret(secret) => {
                form.push(("client_secret", secret.expose().to_owned()));
            }
            ClientProof::AssertionFile(path) => {
                let assertion = tokio::fs::read_to_string(path).await.map_err(|_| {
                    ConnectorError::Config("cannot read the federated token file".into())
                })?;
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_owned(),
                ));
                form.push(("client_assertion", assertion.trim().to_owned()));
            }
        }
        exchange(client.post(self.token_url.clone()).form(&form)).await
    }
}
