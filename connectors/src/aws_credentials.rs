//! AWS credentials from the standard sources, in the SDKs' default order:
//! environment variables, the shared credentials file, web identity (STS
//! `AssumeRoleWithWebIdentity`, as EKS service accounts use), the container
//! credentials endpoint (ECS, EKS Pod Identity), and the instance role
//! through IMDSv2. Temporary credentials are cached and fetched again
//! shortly before they expire (the same cache as access tokens). Keys and tokens are [`Secret`]s: never
//! printed, never logged.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::expiring::Expiring;
use crate::sigv4::AwsCredentials;
use crate::{ConnectorError, Secret};

/// Where the process looks: its environment and files. Tests give their own.
pub trait AwsEnvironment: Send + Sync + std::fmt::Debug {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessAwsEnvironment;

impl AwsEnvironment for ProcessAwsEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

/// Credentials and, for temporary ones, when they expire.
#[derive(Debug, Clone)]
pub struct Issued {
    pub credentials: AwsCredentials,
    pub expires: Option<OffsetDateTime>,
}

/// One source of credentials; `Ok(None)` when it is not configured here.
#[async_trait]
pub trait AwsCredentialSource: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    async fn fetch(&self, client: &reqwest::Client) -> Result<Option<Issued>, ConnectorError>;
}

/// Endpoints the sources call; real ones by default, stand-ins in tests.
#[derive(Debug, Clone)]
pub struct AwsEndpoints {
    /// STS, e.g. `https://sts.eu-west-1.amazonaws.com/`.
    pub sts: String,
    /// IMDS, `http://169.254.169.254`.
    pub imds: String,
    /// The container credentials host for relative URIs, `http://169.254.170.2`.
    pub container: String,
}

impl AwsEndpoints {
    pub fn for_region(region: &str) -> AwsEndpoints {
        AwsEndpoints {
            sts: format!("https://sts.{region}.amazonaws.com/"),
            imds: "http://169.254.169.254".to_owned(),
            container: "http://169.254.170.2".to_owned(),
        }
    }
}

/// The default chain, reading `env` for what each source needs.
pub fn default_chain(
    env: std::sync::Arc<dyn AwsEnvironment>,
    endpoints: AwsEndpoints,
) -> Vec<Box<dyn AwsCredentialSource>> {
    vec![
        Box::new(EnvironmentSource(env.clone())),
        Box::new(ProfileSource(env.clone())),
        Box::new(WebIdentitySource {
            env: env.clone(),
            sts: endpoints.sts,
        }),
        Box::new(ContainerSource {
            env,
            host: endpoints.container,
        }),
        Box::new(InstanceRoleSource {
            imds: endpoints.imds,
        }),
    ]
}

/// A chain of sources with the credentials it last found.
#[derive(Debug)]
pub struct AwsCredentialProvider {
    chain: Vec<Box<dyn AwsCredentialSource>>,
    client: reqwest::Client,
    current: Expiring<AwsCredentials>,
}

impl AwsCredentialProvider {
    pub fn new(chain: Vec<Box<dyn AwsCredentialSource>>) -> Result<Self, ConnectorError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|_| ConnectorError::Config("cannot build the credentials client".into()))?;
        Ok(AwsCredentialProvider {
            chain,
            client,
            current: Expiring::new(),
        })
    }

    /// Credentials with time left: the first source in the chain that has
    /// some, fetched again when temporary ones are about to expire.
    pub async fn credentials(&self) -> Result<AwsCredentials, ConnectorError> {
        self.current
            .get(|| async {
                for source in &self.chain {
                    if let Some(issued) = source.fetch(&self.client).await? {
                        tracing::debug!(source = source.name(), "AWS credentials found");
                        let lifetime = issued.expires.map(|expires| {
                            (expires - OffsetDateTime::now_utc())
                                .try_into()
                                .unwrap_or(Duration::ZERO)
                        });
                        return Ok((issued.credentials, lifetime));
                    }
                }
                Err(ConnectorError::Config(
                    "no AWS credentials: set them in the environment, a profile, web identity, the container endpoint or an instance role".into(),
                ))
            })
            .await
    }
}

/// Fixed credentials (from the configuration's secrets).
#[derive(Debug)]
pub struct StaticSource(pub AwsCredentials);

#[async_trait]
impl AwsCredentialSource for StaticSource {
    fn name(&self) -> &'static str {
        "configuration"
    }

    async fn fetch(&self, _: &reqwest::Client) -> Result<Option<Issued>, ConnectorError> {
        Ok(Some(Issued {
            credentials: self.0.clone(),
            expires: None,
        }))
    }
}

#[derive(Debug)]
struct EnvironmentSource(std::sync::Arc<dyn AwsEnvironment>);

#[async_trait]
impl AwsCredentialSource for EnvironmentSource {
    fn name(&self) -> &'static str {
        "environment"
    }

    async fn fetch(&self, _: &reqwest::Client) -> Result<Option<Issued>, ConnectorError> {
        let (Some(id), Some(secret)) = (
            self.0.var("AWS_ACCESS_KEY_ID"),
            self.0.var("AWS_SECRET_ACCESS_KEY"),
        ) else {
            return Ok(None);
        };
        Ok(Some(Issued {
            credentials: AwsCredentials {
                access_key_id: id,
                secret_access_key: Secret::new(secret),
                session_token: self.0.var("AWS_SESSION_TOKEN").map(Secret::new),
            },
            expires: None,
        }))
    }
}

/// Static keys from the shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`,
/// default `~/.aws/credentials`), profile `AWS_PROFILE` (default `default`).
#[derive(Debug)]
struct ProfileSource(std::sync::Arc<dyn AwsEnvironment>);

#[async_trait]
impl AwsCredentialSource for ProfileSource {
    fn name(&self) -> &'static str {
        "shared credentials file"
    }

    async fn fetch(&self, _: &reqwest::Client) -> Result<Option<Issued>, ConnectorError> {
        let path = match self.0.var("AWS_SHARED_CREDENTIALS_FILE") {
            Some(path) => PathBuf::from(path),
            None => match self.0.var("HOME") {
                Some(home) => PathBuf::from(home).join(".aws/credentials"),
                None => return Ok(None),
            },
        };
        let Ok(text) = tokio::fs::read_to_string(&path).await else {
            return Ok(None);
        };
        let profile = self
            .0
            .var("AWS_PROFILE")
            .unwrap_or_else(|| "default".into());
        let values = ini_section(&text, &profile);
        let get = |key: &str| {
            values
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let (Some(id), Some(secret)) = (get("aws_access_key_id"), get("aws_secret_access_key"))
        else {
            return Ok(None);
        };
        Ok(Some(Issued {
            credentials: AwsCredentials {
                access_key_id: id,
                secret_access_key: Secret::new(secret),
                session_token: get("aws_session_token").map(Secret::new),
            },
            expires: None,
        }))
    }
}

/// The `key = value` lines of `[section]` in an INI file.
fn ini_section(text: &str, section: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut values = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == section;
            continue;
        }
        if inside && let Some((key, value)) = line.split_once('=') {
            values.push((key.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    values
}

/// STS `AssumeRoleWithWebIdentity` with the token in
/// `AWS_WEB_IDENTITY_TOKEN_FILE` for `AWS_ROLE_ARN`.
#[derive(Debug)]
struct WebIdentitySource {
    env: std::sync::Arc<dyn AwsEnvironment>,
    sts: String,
}

#[async_trait]
impl AwsCredentialSource for WebIdentitySource {
    fn name(&self) -> &'static str {
        "web identity"
    }

    async fn fetch(&self, client: &reqwest::Client) -> Result<Option<Issued>, ConnectorError> {
        let (Some(role), Some(file)) = (
            self.env.var("AWS_ROLE_ARN"),
            self.env.var("AWS_WEB_IDENTITY_TOKEN_FILE"),
        ) else {
            return Ok(None);
        };
        let token = tokio::fs::read_to_string(&file).await.map_err(|_| {
            ConnectorError::Config("cannot read the web identity token file".into())
        })?;
        let session = self
            .env
            .var("AWS_ROLE_SESSION_NAME")
            .unwrap_or_else(|| "meshgate".into());
        let response = client
            .post(&self.sts)
            .form(&[
                ("Action", "AssumeRoleWithWebIdentity"),
                ("Version", "2011-06-15"),
                ("RoleArn", role.as_str()),
                ("RoleSessionName", session.as_str()),
                ("WebIdentityToken", token.trim()),
            ])
            .send()
            .await
            .map_err(|_| ConnectorError::Unreachable("STS unreachable"))?;
        let status = response.status();
        if status.is_client_error() {
            return Err(ConnectorError::Unauthorized(status.as_u16()));
        }
        if !status.is_success() {
            return Err(ConnectorError::UpstreamStatus(status.as_u16()));
        }
        let xml = response
            .text()
            .await
            .map_err(|_| ConnectorError::BadResponse)?;
        let field = |name: &str| xml_text(&xml, name).ok_or(ConnectorError::BadResponse);
        Ok(Some(Issued {
            credentials: AwsCredentials {
                access_key_id: field("AccessKeyId")?,
                secret_access_key: Secret::new(field("SecretAccessKey")?),
                session_token: Some(Secret::new(field("SessionToken")?)),
            },
            expires: OffsetDateTime::parse(&field("Expiration")?, &Rfc3339).ok(),
        }))
    }
}

/// The text of the first `<name>…</name>` element (STS answers are flat
/// enough for this; no entity in them matters to meshgate).
fn xml_text(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml.get(start..)?.find(&close)?;
    Some(xml.get(start..end)?.trim().to_owned())
}

/// The JSON the container endpoint and IMDS answer with.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct JsonCredentials {
    access_key_id: String,
    secret_access_key: String,
    token: Option<String>,
    expiration: Option<String>,
}

impl JsonCredentials {
    fn issued(self) -> Issued {
        Issued {
            credentials: AwsCredentials {
                access_key_id: self.access_key_id,
                secret_access_key: Secret::new(self.secret_access_key),
                session_token: self.token.map(Secret::new),
            },
            expires: self
                .expiration
                .and_then(|e| OffsetDateTime::parse(&e, &Rfc3339).ok()),
        }
    }
}

async fn json_credentials(request: reqwest::RequestBuilder) -> Result<Issued, ConnectorError> {
    let response = request
        .send()
        .await
        .map_err(|_| ConnectorError::Unreachable("credentials endpoint unreachable"))?;
    if !response.status().is_success() {
        return Err(ConnectorError::UpstreamStatus(response.status().as_u16()));
    }
    let parsed: JsonCredentials = response
        .json()
        .await
        .map_err(|_| ConnectorError::BadResponse)?;
    Ok(parsed.issued())
}

/// The container credentials endpoint: `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`
/// (ECS) or `AWS_CONTAINER_CREDENTIALS_FULL_URI` with
/// `AWS_CONTAINER_AUTHORIZATION_TOKEN(_FILE)` (EKS Pod Identity).
#[derive(Debug)]
struct ContainerSource {
    env: std::sync::Arc<dyn AwsEnvironment>,
    host: String,
}

#[async_trait]
impl AwsCredentialSource for ContainerSource {
    fn name(&self) -> &'static str {
        "container endpoint"
    }

    async fn fetch(&self, client: &reqwest::Client) -> Result<Option<Issued>, ConnectorError> {
        let url = match (
            self.env.var("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"),
            self.env.var("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
        ) {
            (Some(relative), _) => format!("{}{relative}", self.host),
            (None, Some(full)) => full,
            (None, None) => return Ok(None),
        };
        let mut request = client.get(url);
        let token = match self.env.var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") {
            Some(file) => tokio::fs::read_to_string(file).await.ok(),
            None => self.env.var("AWS_CONTAINER_AUTHORIZATION_TOKEN"),
        };
        if let Some(token) = token {
            request = request.header(reqwest::header::AUTHORIZATION, token.trim());
        }
        json_credentials(request).await.map(Some)
    }
}

/// The instance role, through IMDSv2 (a session token first).
#[derive(Debug)]
struct InstanceRoleSource {
    imds: String,
}

#[async_trait]
impl AwsCredentialSource for InstanceRoleSource {
    fn name(&self) -> &'static str {
        "instance role"
    }

    async fn fetch(&self, client: &reqwest::Client) -> Result<Option<Issued>, ConnectorError> {
        // Not on an instance: IMDS does not answer. Give up quickly.
        let token = match client
            .put(format!("{}/latest/api/token", self.imds))
            .header("x-aws-ec2-metadata-token-ttl-seconds", "21600")
            .timeout(Duration::from_secs(1))
            .send()
            .await
        {
            Ok(response) if response.status().is_success() => response
                .text()
                .await
                .map_err(|_| ConnectorError::BadResponse)?,
            _ => return Ok(None),
        };
        let base = format!("{}/latest/meta-data/iam/security-credentials/", self.imds);
        let role = client
            .get(&base)
            .header("x-aws-ec2-metadata-token", &token)
            .send()
            .await
            .map_err(|_| ConnectorError::Unreachable("IMDS unreachable"))?;
        if !role.status().is_success() {
            return Ok(None);
        }
        let role = role.text().await.map_err(|_| ConnectorError::BadResponse)?;
        let Some(role) = role.lines().next().map(str::trim).filter(|r| !r.is_empty()) else {
            return Ok(None);
        };
        json_credentials(
            client
                .get(format!("{base}{role}"))
                .header("x-aws-ec2-metadata-token", &token),
        )
        .await
        .map(Some)
    }
}
