//! Access tokens for cloud DICOMweb services: each credential source
//! against a stand-in token endpoint that checks what the real one checks,
//! refresh before expiry, one retry after a 401, and no token, secret or key
//! in the logs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Form;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use meshgate_connectors::dicomweb::{Auth, DicomWebConnector, DicomWebSettings, Profile, Url};
use meshgate_connectors::token::{
    AZURE_DICOM_SCOPE, ClientCredentials, ClientProof, GOOGLE_HEALTHCARE_SCOPE,
    GoogleServiceAccount, MetadataServer, TokenProvider, TokenSource,
};
use meshgate_connectors::{Connector, ConnectorError, Secret};
use meshgate_schema::StudyQuery;
use serde_json::{Value, json};

/// A token endpoint and a QIDO-RS service that accepts only tokens the
/// endpoint issued and has not revoked.
#[derive(Default)]
struct Cloud {
    issued: AtomicU32,
    lifetime_s: AtomicU32,
    /// Tokens the service accepts.
    valid: Mutex<Vec<String>>,
    /// What each token request carried (form fields or query), for checks.
    requests: Mutex<Vec<HashMap<String, String>>>,
    searches: AtomicU32,
    /// Refuse every token.
    refuse_all: AtomicBool,
}

/// Every log line of this test binary, at trace level.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

fn logs() -> &'static Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(logs.clone())
            .with_ansi(false)
            .init();
        logs
    })
}

/// No token, client secret, federated token or private key was logged.
fn assert_no_credentials_logged() {
    let logged = String::from_utf8(logs().0.lock().unwrap().clone()).unwrap();
    assert!(
        logged.contains("access token fetched"),
        "logs were captured"
    );
    for secret in [
        "secretvalue",
        "client-secret-value",
        "federated-token",
        "PRIVATE KEY",
        "MIIE",
    ] {
        assert!(!logged.contains(secret), "{secret} was logged");
    }
}

impl Cloud {
    fn issue(&self) -> Response {
        let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let token = format!("access-token-{n}-secretvalue");
        self.valid.lock().unwrap().push(token.clone());
        axum::Json(json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.lifetime_s.load(Ordering::SeqCst),
        }))
        .into_response()
    }
}

async fn form_token(
    State(cloud): State<Arc<Cloud>>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    cloud.requests.lock().unwrap().push(form);
    cloud.issue()
}

async fn metadata_token(
    State(cloud): State<Arc<Cloud>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let google = headers
        .get("metadata-flavor")
        .is_some_and(|v| v == "Google");
    let azure = headers.get("metadata").is_some_and(|v| v == "true");
    if !google && !azure {
        return StatusCode::FORBIDDEN.into_response();
    }
    cloud.requests.lock().unwrap().push(query);
    if azure {
        // IMDS sends the lifetime as a string.
        let n = cloud.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let token = format!("access-token-{n}-secretvalue");
        cloud.valid.lock().unwrap().push(token.clone());
        return axum::Json(json!({
            "access_token": token,
            "expires_in": cloud.lifetime_s.load(Ordering::SeqCst).to_string(),
            "resource": "https://dicom.healthcareapis.azure.com",
        }))
        .into_response();
    }
    cloud.issue()
}

/// The header secret App Service puts in `IDENTITY_HEADER`.
const IDENTITY_HEADER: &str = "app-service-identity-header-3c9e";

/// Azure App Service's managed identity endpoint: `X-IDENTITY-HEADER`
/// required, `api-version=2019-08-01`, the expiry as `expires_on` (Unix
/// time, as text).
async fn app_service_token(
    State(cloud): State<Arc<Cloud>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if headers
        .get("x-identity-header")
        .is_none_or(|v| v != IDENTITY_HEADER)
        || query.get("api-version").map(String::as_str) != Some("2019-08-01")
    {
        return StatusCode::BAD_REQUEST.into_response();
    }
    cloud.requests.lock().unwrap().push(query);
    let n = cloud.issued.fetch_add(1, Ordering::SeqCst) + 1;
    let token = format!("access-token-{n}-secretvalue");
    cloud.valid.lock().unwrap().push(token.clone());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expires_on = now + u64::from(cloud.lifetime_s.load(Ordering::SeqCst));
    axum::Json(json!({
        "access_token": token,
        "expires_on": expires_on.to_string(),
        "resource": "https://dicom.healthcareapis.azure.com",
        "token_type": "Bearer",
    }))
    .into_response()
}

async fn studies(State(cloud): State<Arc<Cloud>>, headers: HeaderMap) -> Response {
    cloud.searches.fetch_add(1, Ordering::SeqCst);
    if cloud.refuse_all.load(Ordering::SeqCst) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    if !cloud.valid.lock().unwrap().contains(&token) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn start(cloud: Arc<Cloud>) -> String {
    logs();
    let app = Router::new()
        .route("/token", post(form_token))
        .route("/metadata/token", get(metadata_token))
        .route("/msi/token", get(app_service_token))
        .route("/dicomWeb/studies", get(studies))
        .with_state(cloud);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn connector(base: &str, source: Box<dyn TokenSource>) -> DicomWebConnector {
    DicomWebConnector::new(DicomWebSettings {
        base_url: Url::parse(&format!("{base}/dicomWeb/")).unwrap(),
        profile: Profile::Generic,
        auth: Auth::Tokens(Arc::new(TokenProvider::new(source).unwrap())),
        page_size: None,
        detail_concurrency: 2,
        max_results: None,
    })
    .unwrap()
}

async fn search(connector: &DicomWebConnector) -> Result<usize, ConnectorError> {
    connector
        .search(&StudyQuery::default())
        .await
        .map(|o| o.studies.len())
}

#[tokio::test]
async fn a_token_is_reused_until_shortly_before_it_expires_and_then_refreshed() {
    let cloud = Arc::new(Cloud::default());
    cloud.lifetime_s.store(1, Ordering::SeqCst);
    let base = start(Arc::clone(&cloud)).await;
    let connector = connector(
        &base,
        Box::new(MetadataServer::google(&format!("{base}/metadata/token")).unwrap()),
    );
    assert_eq!(search(&connector).await.unwrap(), 0);
    assert_eq!(search(&connector).await.unwrap(), 0);
    assert_eq!(cloud.issued.load(Ordering::SeqCst), 1, "reused while fresh");
    // A one-second token is refreshed a tenth of its lifetime early.
    tokio::time::sleep(Duration::from_millis(950)).await;
    assert_eq!(search(&connector).await.unwrap(), 0);
    assert_eq!(
        cloud.issued.load(Ordering::SeqCst),
        2,
        "refreshed before expiry"
    );
    assert_no_credentials_logged();
}

#[tokio::test]
async fn a_refused_token_is_replaced_once_and_a_second_refusal_is_an_auth_error() {
    let cloud = Arc::new(Cloud::default());
    cloud.lifetime_s.store(3600, Ordering::SeqCst);
    let base = start(Arc::clone(&cloud)).await;
    let connector = connector(
        &base,
        Box::new(MetadataServer::google(&format!("{base}/metadata/token")).unwrap()),
    );
    assert_eq!(search(&connector).await.unwrap(), 0);
    // The service revokes the token before it expires: one new token, one retry.
    cloud.valid.lock().unwrap().clear();
    let before = cloud.searches.load(Ordering::SeqCst);
    assert_eq!(search(&connector).await.unwrap(), 0);
    assert_eq!(cloud.issued.load(Ordering::SeqCst), 2);
    assert_eq!(cloud.searches.load(Ordering::SeqCst) - before, 2);

    // A service that refuses every token: one retry, then a typed error.
    cloud.refuse_all.store(true, Ordering::SeqCst);
    let (issued, searches) = (
        cloud.issued.load(Ordering::SeqCst),
        cloud.searches.load(Ordering::SeqCst),
    );
    assert!(matches!(
        search(&connector).await,
        Err(ConnectorError::Unauthorized(401))
    ));
    assert_eq!(
        cloud.issued.load(Ordering::SeqCst) - issued,
        1,
        "one new token"
    );
    assert_eq!(
        cloud.searches.load(Ordering::SeqCst) - searches,
        2,
        "one retry"
    );
    assert_no_credentials_logged();
}

#[tokio::test]
async fn a_google_service_account_signs_a_jwt_bearer_grant_the_endpoint_can_verify() {
    let cloud = Arc::new(Cloud::default());
    cloud.lifetime_s.store(3600, Ordering::SeqCst);
    let base = start(Arc::clone(&cloud)).await;
    let key_file = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/test-service-account.json"
    ))
    .unwrap();
    let mut account =
        GoogleServiceAccount::from_key_file(&Secret::new(key_file), GOOGLE_HEALTHCARE_SCOPE)
            .unwrap();
    account.token_uri = Url::parse(&format!("{base}/token")).unwrap();
    let connector = connector(&base, Box::new(account));
    assert_eq!(search(&connector).await.unwrap(), 0);

    let request = cloud.requests.lock().unwrap()[0].clone();
    assert_eq!(
        request["grant_type"],
        "urn:ietf:params:oauth:grant-type:jwt-bearer"
    );
    // Verified with the public key only, as Google's endpoint would.
    let public = jsonwebtoken::DecodingKey::from_rsa_pem(include_bytes!(
        "fixtures/test-service-account.pub.pem"
    ))
    .unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[format!("{base}/token")]);
    validation.set_issuer(&["meshgate-test@meshgate-tests.iam.gserviceaccount.example"]);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    let claims = jsonwebtoken::decode::<Value>(&request["assertion"], &public, &validation)
        .unwrap()
        .claims;
    assert_eq!(claims["scope"], GOOGLE_HEALTHCARE_SCOPE);
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        3600
    );
    assert_no_credentials_logged();
}

#[tokio::test]
async fn entra_id_client_secret_and_workload_identity_use_the_client_credentials_grant() {
    let cloud = Arc::new(Cloud::default());
    cloud.lifetime_s.store(3600, Ordering::SeqCst);
    let base = start(Arc::clone(&cloud)).await;
    let token_url = Url::parse(&format!("{base}/token")).unwrap();
    let secret = connector(
        &base,
        Box::new(ClientCredentials {
            token_url: token_url.clone(),
            client_id: "app-1".into(),
            proof: ClientProof::Secret(Secret::new("client-secret-value")),
            scope: AZURE_DICOM_SCOPE.into(),
        }),
    );
    assert_eq!(search(&secret).await.unwrap(), 0);

    let dir = tempfile::tempdir().unwrap();
    let federated = dir.path().join("azure-identity-token");
    std::fs::write(&federated, "federated-token-one\n").unwrap();
    let workload = connector(
        &base,
        Box::new(ClientCredentials {
            token_url,
            client_id: "app-2".into(),
            proof: ClientProof::AssertionFile(federated.clone()),
            scope: AZURE_DICOM_SCOPE.into(),
        }),
    );
    assert_eq!(search(&workload).await.unwrap(), 0);

    let requests = cloud.requests.lock().unwrap().clone();
    assert_eq!(requests[0]["grant_type"], "client_credentials");
    assert_eq!(requests[0]["client_id"], "app-1");
    assert_eq!(requests[0]["client_secret"], "client-secret-value");
    assert_eq!(requests[0]["scope"], AZURE_DICOM_SCOPE);
    assert_eq!(requests[1]["client_id"], "app-2");
    assert_eq!(requests[1]["client_assertion"], "federated-token-one");
    assert_eq!(
        requests[1]["client_assertion_type"],
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    );
    assert!(!requests[1].contains_key("client_secret"));
    assert_no_credentials_logged();
}

#[tokio::test]
async fn an_azure_managed_identity_token_comes_from_imds_with_its_lifetime_as_text() {
    let cloud = Arc::new(Cloud::default());
    cloud.lifetime_s.store(1, Ordering::SeqCst);
    let base = start(Arc::clone(&cloud)).await;
    let connector = connector(
        &base,
        Box::new(
            MetadataServer::azure(
                &format!("{base}/metadata/token"),
                "https://dicom.healthcareapis.azure.com",
                Some("user-assigned-id"),
            )
            .unwrap(),
        ),
    );
    assert_eq!(search(&connector).await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(950)).await;
    assert_eq!(search(&connector).await.unwrap(), 0);
    assert_eq!(
        cloud.issued.load(Ordering::SeqCst),
        2,
        "the string lifetime was read"
    );
    let query = cloud.requests.lock().unwrap()[0].clone();
    assert_eq!(query["api-version"], "2018-02-01");
    assert_eq!(query["resource"], "https://dicom.healthcareapis.azure.com");
    assert_eq!(query["client_id"], "user-assigned-id");
    assert_no_credentials_logged();
}

#[tokio::test]
async fn an_azure_managed_identity_off_virtual_machines_uses_the_app_service_endpoint() {
    let cloud = Arc::new(Cloud::default());
    cloud.lifetime_s.store(3600, Ordering::SeqCst);
    let base = start(Arc::clone(&cloud)).await;
    let connector = connector(
        &base,
        Box::new(
            MetadataServer::azure_app_service(
                &format!("{base}/msi/token"),
                Secret::new(IDENTITY_HEADER),
                "https://dicom.healthcareapis.azure.com",
                None,
            )
            .unwrap(),
        ),
    );
    assert_eq!(search(&connector).await.unwrap(), 0);
    assert_eq!(search(&connector).await.unwrap(), 0);
    assert_eq!(
        cloud.issued.load(Ordering::SeqCst),
        1,
        "the expiry (expires_on) was read: the token is reused"
    );
    let query = cloud.requests.lock().unwrap()[0].clone();
    assert_eq!(query["resource"], "https://dicom.healthcareapis.azure.com");
    let logged = String::from_utf8(logs().0.lock().unwrap().clone()).unwrap();
    assert!(
        !logged.contains(IDENTITY_HEADER),
        "the identity header is a secret"
    );
    assert_no_credentials_logged();
}
