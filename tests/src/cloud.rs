//! Stand-ins for the clouds' DICOMweb services, built from their documented
//! behaviour, in front of a real Orthanc that holds the data.
//!
//! What each enforces:
//! - Google Cloud Healthcare: the URL layout
//!   `/v1/projects/P/locations/L/datasets/D/dicomStores/S/dicomWeb/…`,
//!   bearer tokens from its metadata server (short-lived here, so they
//!   expire during a test), `limit` at most 5,000 (default 100; more: 400).
//! - Azure DICOM service: `/v2/partitions/NAME/…`, Entra ID client
//!   credentials at `/{tenant}/oauth2/v2.0/token` (a client secret, or a
//!   workload identity's federated token as a JWT-bearer client assertion,
//!   each checked), `limit` 1–200 (outside: 400), `204` for no rows;
//!   `PatientSex` and `BodyPartExamined` refused as match keys (400), UID
//!   lists matched as one value, `BodyPartExamined` left out of every
//!   search answer (it is in the instances' metadata). Pages repeat the
//!   previous page's last row when asked to act as if studies were being
//!   added during the search, as Azure documents.
//! - Google also refuses UID lists and study-level `ModalitiesInStudy`
//!   (not among its documented search keys); AWS `PatientSex` and
//!   `BodyPartExamined`.
//! - AWS HealthImaging DICOMweb: `/datastore/ID/…`, every request SigV4
//!   signed for `medical-imaging` in the stand-in's region with a known key,
//!   verified with AWS's own signing library (not meshgate's) and a 5-minute
//!   clock skew limit; `limit` at most 1,000; at most `cap` records per
//!   search (AWS: 10,000), offsets beyond it answered with nothing.
//! - Google and AWS answer some requests with `429` and `Retry-After: 0`;
//!   Azure, which documents no `429`, with `503` ("busy, try again later")
//!   and no `Retry-After`.
//!
//! Paging is done here (the stand-in asks Orthanc for all matches and
//! slices them), so Orthanc's own paging quirks do not leak into the test
//! of the cloud profile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use meshgate_connectors::dicomweb::Profile;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// Which cloud a stand-in behaves like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    Gcp,
    Azure,
    /// HealthImaging's DICOMweb API, with this many records per search at most.
    Aws {
        cap: usize,
    },
}

/// The AWS stand-in's region, data store and key.
pub const AWS_REGION: &str = "eu-west-1";
pub const AWS_DATASTORE: &str = "0123456789abcdef0123456789abcdef";
pub const AWS_ACCESS_KEY_ID: &str = "AKIAMESHGATETEST";

/// The Azure stand-in's tenant, client and partition.
pub const AZURE_TENANT: &str = "meshgate-tenant";
pub const AZURE_CLIENT_ID: &str = "meshgate-client";
pub const AZURE_PARTITION: &str = "research";

#[derive(Debug)]
struct Inner {
    cloud: Cloud,
    orthanc: String,
    client: reqwest::Client,
    client_secret: String,
    token_lifetime: Duration,
    tokens: Mutex<HashMap<String, Instant>>,
    issued: AtomicU32,
    requests: AtomicU32,
    throttled: AtomicU32,
    /// Requests refused for a match key the service does not support.
    unsupported: AtomicU32,
    refused: AtomicU32,
    rows: AtomicU32,
    /// The federated token an Azure workload identity may present.
    federated_token: Mutex<Option<String>>,
    /// Azure: pages repeat the previous page's last row.
    repeat_rows: AtomicBool,
}

/// A running stand-in.
#[derive(Debug, Clone)]
pub struct CloudStandIn {
    inner: Arc<Inner>,
    /// Where it listens, e.g. `http://127.0.0.1:1234`.
    pub root: String,
}

impl CloudStandIn {
    /// Starts a stand-in for `cloud` in front of the Orthanc on `orthanc_port`.
    /// Tokens live `token_lifetime`; `client_secret` is the Azure client
    /// secret or the AWS secret access key.
    pub async fn start(
        cloud: Cloud,
        orthanc_port: u16,
        token_lifetime: Duration,
        client_secret: &str,
    ) -> CloudStandIn {
        let inner = Arc::new(Inner {
            cloud,
            orthanc: format!("http://127.0.0.1:{orthanc_port}/dicom-web"),
            // Orthanc closes idle keep-alive connections after ~0.5 s.
            client: reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_millis(200))
                .build()
                .unwrap_or_default(),
            client_secret: client_secret.to_owned(),
            token_lifetime,
            tokens: Mutex::default(),
            issued: AtomicU32::new(0),
            requests: AtomicU32::new(0),
            throttled: AtomicU32::new(0),
            unsupported: AtomicU32::new(0),
            refused: AtomicU32::new(0),
            rows: AtomicU32::new(0),
            federated_token: Mutex::default(),
            repeat_rows: AtomicBool::new(false),
        });
        let app = Router::new()
            .route(
                "/computeMetadata/v1/instance/service-accounts/default/token",
                get(metadata_token),
            )
            .route("/{tenant}/oauth2/v2.0/token", post(entra_token))
            .route("/v1/{*path}", get(gcp_dicomweb))
            .route("/v2/{*path}", get(azure_dicomweb))
            .route("/datastore/{id}/{*path}", get(aws_dicomweb))
            .with_state(Arc::clone(&inner));
        let root = serve(app).await;
        CloudStandIn { inner, root }
    }

    /// Tokens issued so far.
    /// Azure: trusts `token` (only) as a workload identity's federated
    /// token, as Entra ID trusts the current token of a federated issuer.
    pub fn trust_federated_token(&self, token: &str) {
        *self
            .inner
            .federated_token
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(token.to_owned());
    }

    /// Azure: acts as while studies are being added during a search, when
    /// Azure documents that a page can repeat the previous page's last row.
    pub fn repeat_rows_across_pages(&self, repeat: bool) {
        self.inner.repeat_rows.store(repeat, Ordering::SeqCst);
    }

    pub fn tokens_issued(&self) -> u32 {
        self.inner.issued.load(Ordering::SeqCst)
    }

    /// DICOMweb requests received (including refused and throttled ones).
    pub fn requests(&self) -> u32 {
        self.inner.requests.load(Ordering::SeqCst)
    }

    /// Requests answered busy (429, or 503 on Azure).
    pub fn throttled(&self) -> u32 {
        self.inner.throttled.load(Ordering::SeqCst)
    }

    /// Requests refused for a match key the service does not support.
    pub fn unsupported(&self) -> u32 {
        self.inner.unsupported.load(Ordering::SeqCst)
    }

    /// DICOM JSON rows sent (studies, series and instances).
    pub fn rows(&self) -> u32 {
        self.inner.rows.load(Ordering::SeqCst)
    }

    /// Requests refused for a missing, unknown or expired token.
    pub fn refused(&self) -> u32 {
        self.inner.refused.load(Ordering::SeqCst)
    }
}

impl Inner {
    fn issue(&self) -> Value {
        let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let token = format!("standin-token-{n}");
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token.clone(), Instant::now() + self.token_lifetime);
        json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.token_lifetime.as_secs(),
        })
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        token
            .and_then(|t| tokens.get(t))
            .is_some_and(|expiry| Instant::now() < *expiry)
    }
}

async fn metadata_token(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    if inner.cloud != Cloud::Gcp || headers.get("metadata-flavor").is_none_or(|v| v != "Google") {
        return StatusCode::FORBIDDEN.into_response();
    }
    axum::Json(inner.issue()).into_response()
}

async fn entra_token(
    State(inner): State<Arc<Inner>>,
    Path(tenant): Path<String>,
    axum::Form(form): axum::Form<HashMap<String, String>>,
) -> Response {
    let field = |name: &str| form.get(name).map(String::as_str);
    let trusted = inner
        .federated_token
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    // Exactly one proof: a client secret, or a federated token.
    let proof = match (field("client_secret"), field("client_assertion")) {
        (Some(secret), None) => secret == inner.client_secret,
        (None, Some(assertion)) => {
            field("client_assertion_type")
                == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
                && trusted.as_deref() == Some(assertion)
        }
        _ => false,
    };
    let valid = inner.cloud == Cloud::Azure
        && tenant == AZURE_TENANT
        && field("grant_type") == Some("client_credentials")
        && field("client_id") == Some(AZURE_CLIENT_ID)
        && proof
        && field("scope") == Some("https://dicom.healthcareapis.azure.com/.default");
    if !valid {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    axum::Json(inner.issue()).into_response()
}

async fn gcp_dicomweb(
    State(inner): State<Arc<Inner>>,
    Path(path): Path<String>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    // projects/P/locations/L/datasets/D/dicomStores/S/dicomWeb/REST
    let parts: Vec<&str> = path.splitn(10, '/').collect();
    let layout = parts.len() == 10
        && parts[0] == "projects"
        && parts[2] == "locations"
        && parts[4] == "datasets"
        && parts[6] == "dicomStores"
        && parts[8] == "dicomWeb";
    if !layout {
        return StatusCode::NOT_FOUND.into_response();
    }
    dicomweb(&inner, parts[9], &headers, query).await
}

async fn azure_dicomweb(
    State(inner): State<Arc<Inner>>,
    Path(path): Path<String>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let prefix = format!("partitions/{AZURE_PARTITION}/");
    match path.strip_prefix(&prefix) {
        Some(rest) => dicomweb(&inner, rest, &headers, query).await,
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn aws_dicomweb(
    State(inner): State<Arc<Inner>>,
    Path((id, path)): Path<(String, String)>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    if !matches!(inner.cloud, Cloud::Aws { .. }) || id != AWS_DATASTORE {
        return StatusCode::NOT_FOUND.into_response();
    }
    if !sigv4_valid(&inner.client_secret, "GET", &uri, &headers, b"") {
        inner.requests.fetch_add(1, Ordering::SeqCst);
        inner.refused.fetch_add(1, Ordering::SeqCst);
        return StatusCode::FORBIDDEN.into_response();
    }
    dicomweb(&inner, &path, &headers, query).await
}

/// Serves `app` on a free loopback port; returns its root URL.
pub(crate) async fn serve(app: Router) -> String {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let root = format!(
        "http://{}",
        listener.local_addr().unwrap_or_else(|e| panic!("{e}"))
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    root
}

/// Checks a SigV4 `Authorization` header with AWS's own implementation:
/// the same key, scope, time and signed headers must give the same signature.
pub(crate) fn sigv4_valid(
    secret: &str,
    method: &str,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> bool {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let Some(authorization) = text("authorization") else {
        return false;
    };
    let Some(fields) = authorization.strip_prefix("AWS4-HMAC-SHA256 ") else {
        return false;
    };
    let field = |name: &str| {
        fields
            .split(", ")
            .find_map(|f| f.strip_prefix(&format!("{name}=")))
    };
    let (Some(credential), Some(signed), Some(signature), Some(date)) = (
        field("Credential"),
        field("SignedHeaders"),
        field("Signature"),
        text("x-amz-date"),
    ) else {
        return false;
    };
    let scope: Vec<&str> = credential.split('/').collect();
    if scope.len() != 5
        || scope[0] != AWS_ACCESS_KEY_ID
        || scope[2] != AWS_REGION
        || scope[3] != "medical-imaging"
        || scope[4] != "aws4_request"
    {
        return false;
    }
    let Ok(time) = time::PrimitiveDateTime::parse(
        date,
        time::macros::format_description!("[year][month][day]T[hour][minute][second]Z"),
    ) else {
        return false;
    };
    let time: std::time::SystemTime = time.assume_utc().into();
    let skew = time.elapsed().unwrap_or_else(|e| e.duration());
    if skew > Duration::from_secs(300) {
        return false;
    }
    // The headers the client signed, except those the library adds itself.
    let signed_headers: Vec<(&str, &str)> = signed
        .split(';')
        .filter(|name| !matches!(*name, "x-amz-date" | "x-amz-security-token"))
        .filter_map(|name| text(name).map(|value| (name, value)))
        .collect();
    let host = text("host").unwrap_or_default();
    let url = format!("http://{host}{uri}");
    let identity =
        aws_credential_types::Credentials::new(AWS_ACCESS_KEY_ID, secret, None, None, "stand-in")
            .into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(AWS_REGION)
        .name("medical-imaging")
        .time(time)
        .settings(SigningSettings::default())
        .build();
    let Ok(params) = params else {
        return false;
    };
    let Ok(request) = SignableRequest::new(
        method,
        url.as_str(),
        signed_headers.into_iter(),
        SignableBody::Bytes(body),
    ) else {
        return false;
    };
    sign(request, &params.into()).is_ok_and(|out| out.signature() == signature)
}

async fn dicomweb(
    inner: &Inner,
    rest: &str,
    headers: &HeaderMap,
    query: Vec<(String, String)>,
) -> Response {
    let n = inner.requests.fetch_add(1, Ordering::SeqCst) + 1;
    if !matches!(inner.cloud, Cloud::Aws { .. }) && !inner.authorized(headers) {
        inner.refused.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if n.is_multiple_of(9) {
        inner.throttled.fetch_add(1, Ordering::SeqCst);
        if inner.cloud == Cloud::Azure {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({"error": {"code": "ServiceUnavailable", "message": "The server is busy. Please try again later."}})),
            )
                .into_response();
        }
        return (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, "0")]).into_response();
    }
    // (most, default) `limit`: AWS documents a default of 1,000.
    let (max, default) = match inner.cloud {
        Cloud::Gcp => (5000, 100),
        Cloud::Azure => (200, 100),
        Cloud::Aws { .. } => (1000, 1000),
    };
    let number = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.parse::<usize>())
    };
    let limit = match number("limit") {
        None => default,
        Some(Ok(limit)) if (1..=max).contains(&limit) => limit,
        Some(_) => return StatusCode::BAD_REQUEST.into_response(),
    };
    let offset = match number("offset") {
        None => 0,
        Some(Ok(offset)) => offset,
        Some(Err(_)) => return StatusCode::BAD_REQUEST.into_response(),
    };
    // Match keys the service documents as unsupported are refused, as the
    // service refuses them (Azure v2: 400 for an unsupported attribute;
    // Google: UID lists and study-level ModalitiesInStudy are not among
    // its documented search keys). Azure matches a UID as one value.
    let level = rest.rsplit('/').next().unwrap_or_default();
    for (name, value) in &query {
        let refused = match inner.cloud {
            Cloud::Azure => matches!(name.as_str(), "PatientSex" | "BodyPartExamined"),
            Cloud::Gcp => {
                matches!(name.as_str(), "PatientSex" | "BodyPartExamined")
                    || (name == "StudyInstanceUID" && value.contains(','))
                    || (name == "ModalitiesInStudy" && level == "studies")
            }
            Cloud::Aws { .. } => matches!(name.as_str(), "PatientSex" | "BodyPartExamined"),
        };
        if refused {
            inner.unsupported.fetch_add(1, Ordering::SeqCst);
            let message = format!("{name} is not a supported search attribute");
            let body = match inner.cloud {
                Cloud::Gcp => {
                    json!({"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}})
                }
                _ => json!({"error": {"code": "InvalidQueryString", "message": message}}),
            };
            return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
        }
    }
    let single_uid = inner.cloud == Cloud::Azure
        && query
            .iter()
            .any(|(name, value)| name == "StudyInstanceUID" && value.contains(','));
    // Everything that matches, from Orthanc, in its query syntax.
    let mut url = format!("{}/{rest}?", inner.orthanc);
    for (name, value) in query.iter().filter(|(k, _)| k != "limit" && k != "offset") {
        url.push_str(name);
        url.push('=');
        url.push_str(&Profile::Orthanc.encode_value(value));
        url.push('&');
    }
    let mut answer = inner.client.get(&url).send().await;
    if answer.is_err() {
        // A connection Orthanc closed just as it was reused: once more.
        answer = inner.client.get(&url).send().await;
    }
    let mut rows: Vec<Value> = match answer {
        Ok(response) if response.status().is_success() => response.json().await.unwrap_or_default(),
        Ok(response) => {
            return StatusCode::from_u16(response.status().as_u16())
                .unwrap_or(StatusCode::BAD_GATEWAY)
                .into_response();
        }
        Err(_) => return StatusCode::BAD_GATEWAY.into_response(),
    };
    if single_uid {
        // A list is one (unmatchable) UID to Azure.
        rows.clear();
    }
    if inner.cloud == Cloud::Azure && matches!(level, "studies" | "series" | "instances") {
        // Azure's searches do not return BodyPartExamined.
        for row in &mut rows {
            if let Some(row) = row.as_object_mut() {
                row.remove("00180015");
            }
        }
    }
    // Azure repeats the previous page's last row at the top of the next.
    let start = match inner.cloud {
        Cloud::Azure if offset > 0 && inner.repeat_rows.load(Ordering::SeqCst) => offset - 1,
        _ => offset,
    };
    let cap = match inner.cloud {
        Cloud::Aws { cap } => cap,
        _ => usize::MAX,
    };
    let page: Vec<Value> = rows.into_iter().take(cap).skip(start).take(limit).collect();
    inner.rows.fetch_add(
        u32::try_from(page.len()).unwrap_or(u32::MAX),
        Ordering::SeqCst,
    );
    if page.is_empty() && inner.cloud == Cloud::Azure {
        return StatusCode::NO_CONTENT.into_response();
    }
    (
        [(header::CONTENT_TYPE, "application/dicom+json")],
        axum::Json(page),
    )
        .into_response()
}
