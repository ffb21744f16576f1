//! AWS credentials from each standard source, against stand-ins for STS,
//! the container endpoint and IMDSv2, in the SDKs' order, refreshed before
//! temporary ones expire.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use meshgate_connectors::aws_credentials::{
    AwsCredentialProvider, AwsEndpoints, AwsEnvironment, default_chain,
};
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

#[derive(Debug, Default)]
struct Env(HashMap<String, String>);

impl AwsEnvironment for Env {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

#[derive(Default)]
struct Aws {
    issued: AtomicU32,
    lifetime_s: AtomicU32,
}

impl Aws {
    fn next(&self) -> (u32, String) {
        let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let expires = OffsetDateTime::now_utc()
            + time::Duration::seconds(i64::from(self.lifetime_s.load(Ordering::SeqCst)));
        (n, expires.format(&Rfc3339).unwrap())
    }
}

async fn sts(
    State(aws): State<Arc<Aws>>,
    axum::Form(form): axum::Form<HashMap<String, String>>,
) -> Response {
    let valid = form
        .get("Action")
        .is_some_and(|a| a == "AssumeRoleWithWebIdentity")
        && form
            .get("RoleArn")
            .is_some_and(|r| r == "arn:aws:iam::123456789012:role/meshgate")
        && form
            .get("WebIdentityToken")
            .is_some_and(|t| t == "projected-sa-token");
    if !valid {
        return StatusCode::FORBIDDEN.into_response();
    }
    let (n, expires) = aws.next();
    format!(
        "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials>\
         <AccessKeyId>ASIASTS{n}</AccessKeyId><SecretAccessKey>sts-secret-{n}</SecretAccessKey>\
         <SessionToken>sts-session-{n}</SessionToken><Expiration>{expires}</Expiration>\
         </Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"
    )
    .into_response()
}

async fn container(State(aws): State<Arc<Aws>>, headers: HeaderMap) -> Response {
    if headers
        .get("authorization")
        .is_none_or(|v| v != "pod-identity-token")
    {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let (n, expires) = aws.next();
    axum::Json(json!({
        "AccessKeyId": format!("ASIACONTAINER{n}"),
        "SecretAccessKey": format!("container-secret-{n}"),
        "Token": format!("container-session-{n}"),
        "Expiration": expires,
    }))
    .into_response()
}

async fn imds_token(headers: HeaderMap) -> Response {
    if headers
        .get("x-aws-ec2-metadata-token-ttl-seconds")
        .is_none()
    {
        return StatusCode::BAD_REQUEST.into_response();
    }
    "imds-session-token".into_response()
}

fn imds_session(headers: &HeaderMap) -> bool {
    headers
        .get("x-aws-ec2-metadata-token")
        .is_some_and(|v| v == "imds-session-token")
}

async fn imds_roles(headers: HeaderMap) -> Response {
    if !imds_session(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    "meshgate-instance-role\n".into_response()
}

async fn imds_role(State(aws): State<Arc<Aws>>, headers: HeaderMap) -> Response {
    if !imds_session(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let (n, expires) = aws.next();
    axum::Json(json!({
        "Code": "Success",
        "AccessKeyId": format!("ASIAINSTANCE{n}"),
        "SecretAccessKey": format!("instance-secret-{n}"),
        "Token": format!("instance-session-{n}"),
        "Expiration": expires,
    }))
    .into_response()
}

async fn start(aws: Arc<Aws>) -> String {
    let app = Router::new()
        .route("/sts/", post(sts))
        .route("/v2/credentials/pod", get(container))
        .route("/latest/api/token", put(imds_token))
        .route(
            "/latest/meta-data/iam/security-credentials/",
            get(imds_roles),
        )
        .route(
            "/latest/meta-data/iam/security-credentials/meshgate-instance-role",
            get(imds_role),
        )
        .with_state(aws);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn provider(base: &str, env: &[(&str, &str)]) -> AwsCredentialProvider {
    let env = Env(env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect());
    AwsCredentialProvider::new(default_chain(
        Arc::new(env),
        AwsEndpoints {
            sts: format!("{base}/sts/"),
            imds: base.to_owned(),
            container: base.to_owned(),
        },
    ))
    .unwrap()
}

#[tokio::test]
async fn environment_credentials_come_first_then_the_shared_credentials_profile() {
    let base = start(Arc::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("credentials");
    std::fs::write(
        &file,
        "[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = default-secret\n\n\
         # research account\n[research]\naws_access_key_id = AKIARESEARCH\naws_secret_access_key = research-secret\naws_session_token = research-session\n",
    )
    .unwrap();
    let file = file.display().to_string();
    let both = provider(
        &base,
        &[
            ("AWS_ACCESS_KEY_ID", "AKIAENV"),
            ("AWS_SECRET_ACCESS_KEY", "env-secret"),
            ("AWS_SHARED_CREDENTIALS_FILE", &file),
        ],
    );
    assert_eq!(both.credentials().await.unwrap().access_key_id, "AKIAENV");
    let profile = provider(
        &base,
        &[
            ("AWS_SHARED_CREDENTIALS_FILE", &file),
            ("AWS_PROFILE", "research"),
        ],
    );
    let credentials = profile.credentials().await.unwrap();
    assert_eq!(credentials.access_key_id, "AKIARESEARCH");
    assert_eq!(credentials.secret_access_key.expose(), "research-secret");
    assert_eq!(
        credentials.session_token.unwrap().expose(),
        "research-session"
    );
}

#[tokio::test]
async fn web_identity_credentials_are_assumed_through_sts_and_refreshed_before_they_expire() {
    let aws = Arc::new(Aws::default());
    aws.lifetime_s.store(2, Ordering::SeqCst);
    let base = start(Arc::clone(&aws)).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "projected-sa-token\n").unwrap();
    let provider = provider(
        &base,
        &[
            ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/meshgate"),
            ("AWS_WEB_IDENTITY_TOKEN_FILE", &token.display().to_string()),
        ],
    );
    let first = provider.credentials().await.unwrap();
    assert_eq!(first.access_key_id, "ASIASTS1");
    assert_eq!(first.session_token.unwrap().expose(), "sts-session-1");
    assert_eq!(
        provider.credentials().await.unwrap().access_key_id,
        "ASIASTS1"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1900)).await;
    assert_eq!(
        provider.credentials().await.unwrap().access_key_id,
        "ASIASTS2"
    );
}

#[tokio::test]
async fn container_and_instance_role_credentials_use_their_endpoints_tokens() {
    let aws = Arc::new(Aws::default());
    aws.lifetime_s.store(3600, Ordering::SeqCst);
    let base = start(Arc::clone(&aws)).await;
    let pod = provider(
        &base,
        &[
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                &format!("{base}/v2/credentials/pod"),
            ),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "pod-identity-token"),
        ],
    );
    assert_eq!(
        pod.credentials().await.unwrap().access_key_id,
        "ASIACONTAINER1"
    );
    let instance = provider(&base, &[]);
    let credentials = instance.credentials().await.unwrap();
    assert_eq!(credentials.access_key_id, "ASIAINSTANCE2");
    assert!(!format!("{credentials:?}").contains("instance-secret"));
}

#[tokio::test]
async fn no_source_means_a_configuration_error_naming_the_sources() {
    let provider = AwsCredentialProvider::new(default_chain(
        Arc::new(Env::default()),
        AwsEndpoints {
            sts: "http://127.0.0.1:9/".into(),
            imds: "http://127.0.0.1:9".into(),
            container: "http://127.0.0.1:9".into(),
        },
    ))
    .unwrap();
    let error = provider.credentials().await.unwrap_err();
    assert!(error.to_string().contains("instance role"), "{error}");
}
