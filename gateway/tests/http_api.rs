//! The HTTP face of the gateway, in memory: what happens to requests that
//! never reach a partner, and to requests whose audit record cannot be kept.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use common::{connect_from, counting_partner, peak_rss};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use meshgate_gateway::audit::AuditLog;
use meshgate_gateway::config::{Config, ProcessEnvironment, ServerSection};
use meshgate_gateway::dev_issuer::DevIssuer;
use meshgate_gateway::{build_app, start};
use serde_json::{Value, json};
use tower::ServiceExt;

/// A gateway over one DICOMweb partner that holds nothing and counts the
/// requests it gets, trusting a development issuer, with policies that let
/// approved researchers read identified records.
struct App {
    router: axum::Router,
    token: String,
    audit: Arc<AuditLog>,
    auth_failures: Arc<meshgate_gateway::admission::FailureTally>,
    server: ServerSection,
    /// Requests the partner has had.
    partner_hits: Arc<AtomicU32>,
    /// While set, the partner answers 500.
    partner_failing: Arc<AtomicBool>,
    /// How long the partner takes to answer, in ms.
    partner_delay_ms: Arc<AtomicU32>,
    folder: tempfile::TempDir,
    issuer: DevIssuer,
}

/// What the Prometheus scraper presents for `/metrics`.
const METRICS_TOKEN: &str = "scraper-token-7f3a9c0d2e";

async fn app() -> App {
    app_with("").await
}

/// The same, with `extra` TOML after the partner's table (its
/// `[partners.protection]`, then `[server]`; may be empty).
async fn app_with(extra: &str) -> App {
    let (partner, partner_hits, partner_failing, partner_delay_ms) = counting_partner().await;
    let folder = tempfile::tempdir().unwrap();
    let issuer = DevIssuer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let policy = folder.path().join("allow.cedar");
    std::fs::write(
        &policy,
        "permit (principal, action in Meshgate::Action::\"QueryStudies\", resource) when { principal.projects.contains(context.project) };",
    )
    .unwrap();
    let key = folder.path().join("key");
    std::fs::write(&key, "k".repeat(32)).unwrap();
    let checkpoint_key = folder.path().join("checkpoint.pem");
    std::fs::write(
        &checkpoint_key,
        meshgate_gateway::audit::new_checkpoint_key_pem().unwrap(),
    )
    .unwrap();
    let text = format!(
        r#"
[auth]
[[auth.issuers]]
issuer = "{issuer}"
audiences = ["meshgate"]
jwks_url = "{jwks}"
trusted_for = {{ institutions = ["*"], roles = ["*"], projects = ["*"], permissions = ["*"] }}

[policies]
consortium = ["allow.cedar"]

[deidentification]
key = "${{file:{key}}}"

[audit]
store = "sqlite:audit.db"
checkpoint_key = "${{file:{checkpoint_key}}}"

{metrics}

[[projects]]
id = "p1"
title = "Project one"
purposes = ["DUO:0000042"]

[[partners]]
id = "empty"
name = "Empty archive"
institution = "archive"
data_use = {{ permission = "DUO:0000042" }}
policies = ["allow.cedar"]
connector = {{ kind = "dicomweb", url = "{partner}" }}

{extra}
"#,
        issuer = issuer.issuer(),
        jwks = issuer.jwks_url(),
        key = key.display(),
        checkpoint_key = checkpoint_key.display(),
        // A scraper's token, unless the test sets `[metrics]` itself.
        metrics = if extra.contains("[metrics]") {
            ""
        } else {
            "[metrics]\ntoken = \"${file:metrics.token}\"\n"
        },
    );
    std::fs::write(folder.path().join("metrics.token"), METRICS_TOKEN).unwrap();
    let loaded = Config::from_toml(
        &text,
        &folder.path().join("meshgate.toml"),
        &ProcessEnvironment,
    )
    .unwrap();
    let token = issuer.token(
        &json!({"sub": "alice", "roles": ["researcher"], "projects": ["p1"]}),
        Duration::from_secs(300),
    );
    let gateway = start(&loaded).await.unwrap();
    App {
        audit: gateway.audit(),
        auth_failures: Arc::clone(&gateway.auth_failures),
        server: gateway.server,
        partner_hits,
        partner_failing,
        partner_delay_ms,
        router: build_app(gateway),
        token,
        folder,
        issuer,
    }
}

impl App {
    /// Every record in the audit log, oldest first, as JSON.
    async fn records(&self) -> Vec<Value> {
        self.audit
            .store()
            .range(0, 10_000)
            .await
            .unwrap()
            .iter()
            .map(|row| serde_json::from_str(&row.record).unwrap())
            .collect()
    }

    async fn post(&self, body: impl Into<Body>) -> (StatusCode, Value) {
        self.send(Some(&self.token), body).await.0
    }

    async fn send(
        &self,
        token: Option<&str>,
        body: impl Into<Body>,
    ) -> ((StatusCode, Value), Option<String>) {
        let mut request = Request::post("/graphql").header("content-type", "application/json");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = self
            .router
            .clone()
            .oneshot(request.body(body.into()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let challenge = response
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        ((status, serde_json::from_slice(&bytes).unwrap()), challenge)
    }
}

#[tokio::test]
async fn every_request_is_audited_with_its_normalised_query_and_partner_outcomes_but_no_token() {
    let app = app().await;
    let query = json!({"query": "{ cohortCount(project: \"p1\", filter: {bodyPart: \"CHEST\", description: \"secret words\"}) { total } }"});
    let (status, body) = app.post(query.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["cohortCount"]["total"], 0);
    let records = app.records().await;
    assert_eq!(records.len(), 1);
    let record = records[0].to_string();
    assert!(record.contains("\"partner\":\"empty\""), "{record}");
    assert!(record.contains("\"subject\":\"alice\""), "{record}");
    assert!(record.contains("\"project\":\"p1\""), "{record}");
    assert!(record.contains("\"disclosure\":\"IDENTIFIED\""), "{record}");
    assert!(!record.contains(&app.token), "no token in audit records");
    let filter = &records[0]["accesses"][0]["filter"];
    assert_eq!(filter["body_part"], "CHEST", "{record}");
    assert_eq!(filter["description"], "secret words", "{record}");
}

#[tokio::test]
async fn a_read_only_audit_log_fails_requests_closed_with_503_until_it_is_writable_again() {
    let app = app().await;
    let query = json!({"query": "{ imagingStudies(project: \"p1\") { totalCount } }"}).to_string();
    let file = app.folder.path().join("audit.db");
    let mut permissions = std::fs::metadata(&file).unwrap().permissions();
    permissions.set_readonly(true);
    std::fs::set_permissions(&file, permissions.clone()).unwrap();
    let (status, body) = app.post(query.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["errors"][0]["extensions"]["code"], "AUDIT_UNAVAILABLE");
    assert!(
        body.get("data").is_none(),
        "no data without an audit record: {body}"
    );
    #[allow(
        clippy::permissions_set_readonly_false,
        reason = "the test restores write access"
    )]
    permissions.set_readonly(false);
    std::fs::set_permissions(&file, permissions).unwrap();
    let (status, body) = app.post(query).await;
    assert_eq!(status, StatusCode::OK, "recovered by itself: {body}");
    assert_eq!(app.records().await.len(), 1, "only the answered request");
}

#[tokio::test]
async fn malformed_batched_and_oversized_requests_are_refused_with_stable_codes() {
    let app = app().await;
    let batch =
        json!([{"query": "{ partners { id } }"}, {"query": "{ partners { id } }"}]).to_string();
    let huge = json!({"query": format!("{{ partners {{ id }} }} # {}", "x".repeat(300 * 1024))})
        .to_string();
    let cases: Vec<(String, StatusCode, &str)> = vec![
        ("not json".into(), StatusCode::BAD_REQUEST, "BAD_REQUEST"),
        (batch, StatusCode::BAD_REQUEST, "BAD_REQUEST"),
        (
            json!({"query": "{ partners { id "}).to_string(),
            StatusCode::BAD_REQUEST,
            "GRAPHQL_PARSE_FAILED",
        ),
        (
            json!({"query": "{ partners { colour } }"}).to_string(),
            StatusCode::BAD_REQUEST,
            "GRAPHQL_VALIDATION_FAILED",
        ),
        (huge, StatusCode::PAYLOAD_TOO_LARGE, "REQUEST_TOO_LARGE"),
    ];
    let count = cases.len();
    for (body, status, code) in cases {
        let (got, response) = app.post(body).await;
        assert_eq!(
            (got, response["errors"][0]["extensions"]["code"].as_str()),
            (status, Some(code)),
            "{response}"
        );
    }
    let records = app.records().await;
    assert_eq!(records.len(), count, "refused requests are audited too");
    assert!(records.iter().all(|r| r["outcome"] == "failure"));
}

#[tokio::test]
async fn requests_without_a_valid_token_get_401_with_a_challenge_before_anything_else() {
    let app = app().await;
    let query = json!({"query": "{ cohortCount(project: \"p1\") { total } }"}).to_string();
    let ((status, body), challenge) = app.send(None, query.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["errors"][0]["extensions"]["code"], "UNAUTHENTICATED");
    assert_eq!(challenge.as_deref(), Some(r#"Bearer realm="meshgate""#));
    assert!(body.get("data").is_none());

    // Even a body that is not JSON gets 401, not 400: nothing is parsed first.
    let ((status, _), challenge) = app.send(Some("not.a.jwt"), "not json").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(challenge.unwrap().contains(r#"error="invalid_token""#));

    // From one client address, the first failure of an interval is
    // recorded at once; later ones are counted and recorded together when
    // the interval ends (or at shutdown): nothing unaudited.
    let records = app.records().await;
    assert_eq!(records.len(), 1, "the first refusal is recorded at once");
    for _ in 0..50 {
        let ((status, _), _) = app.send(Some("not.a.jwt"), "{}").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        app.records().await.len(),
        1,
        "a flood does not grow the log"
    );
    meshgate_gateway::app::record_failed_authentications(
        &app.auth_failures,
        &app.audit,
        &meshgate_gateway::app::exit_on_audit_storage_failure(),
        true,
    )
    .await;
    let records = app.records().await;
    assert_eq!(records.len(), 2);
    assert!(
        records
            .iter()
            .all(|r| r["principal"].is_null() && r["outcome"] == "failure")
    );
    let counted: u64 = records
        .iter()
        .map(|r| r["error_count"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, 52, "every refusal is accounted for");
}

#[tokio::test]
async fn a_query_for_an_unregistered_project_is_refused_with_its_code() {
    let app = app().await;
    let (status, body) = app
        .post(json!({"query": "{ cohortCount(project: \"nope\") { total } }"}).to_string())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["errors"][0]["extensions"]["code"], "UNKNOWN_PROJECT");
}

#[tokio::test]
async fn me_returns_the_principal_mapped_from_the_token() {
    let app = app().await;
    let (status, body) = app
        .post(json!({"query": "{ me { subject roles projects institution } }"}).to_string())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["data"]["me"],
        json!({"subject": "alice", "roles": ["RESEARCHER"], "projects": ["p1"], "institution": null})
    );
}

#[tokio::test]
async fn hostile_documents_are_refused_with_their_code_before_any_partner_is_asked() {
    let app = app().await;
    let before = app.partner_hits.load(Ordering::SeqCst);
    let count = "cohortCount(project: \"p1\") { total }";
    let deep = format!("{{ {}{count}{} }}", "me { ".repeat(12), " }".repeat(12));
    let aliases: String = (0..21).map(|n| format!("c{n}: {count} ")).collect();
    let mut fan_out = format!("query {{ {count} partners {{ ...a }} }}\nfragment a on Partner {{ ");
    fan_out.push_str(&"...b ".repeat(10));
    fan_out.push_str("}\nfragment b on Partner { ");
    fan_out.push_str(&"...c ".repeat(10));
    fan_out.push_str("}\nfragment c on Partner { ");
    fan_out.push_str(&"id name ".repeat(10));
    fan_out.push('}');
    let roots: String = (0..7).map(|n| format!("r{n}: me {{ subject }} ")).collect();
    let cases: Vec<(String, StatusCode, &str)> = vec![
        (deep, StatusCode::BAD_REQUEST, "QUERY_TOO_DEEP"),
        (
            format!("{{ {aliases} }}"),
            StatusCode::BAD_REQUEST,
            "TOO_MANY_ALIASES",
        ),
        (fan_out, StatusCode::BAD_REQUEST, "QUERY_TOO_COMPLEX"),
        (
            format!("{{ {roots} }}"),
            StatusCode::BAD_REQUEST,
            "TOO_MANY_ROOT_FIELDS",
        ),
        (
            format!("{{ {count} me @leak {{ subject }} }}"),
            StatusCode::BAD_REQUEST,
            "INVALID_DIRECTIVE",
        ),
        // 10,000 repeats of one directive: one error, not 9,999, and the
        // document is not even parsed.
        (
            format!(
                "{{ me {{ subject {} }} }}",
                "@include(if: true) ".repeat(10_000)
            ),
            StatusCode::BAD_REQUEST,
            "TOO_MANY_DIRECTIVES",
        ),
        (
            "{ me { subject @include(if: true) @include(if: true) } }".into(),
            StatusCode::BAD_REQUEST,
            "INVALID_DIRECTIVE",
        ),
        (
            format!(
                "{{ me {{ {} }} }} fragment f on Principal {{ subject @skip(if: false) }}",
                "...f ".repeat(21)
            ),
            StatusCode::BAD_REQUEST,
            "TOO_MANY_DIRECTIVES",
        ),
        // Production profile: the API does not describe itself.
        (
            "{ __schema { types { name } } }".into(),
            StatusCode::BAD_REQUEST,
            "INTROSPECTION_DISABLED",
        ),
    ];
    for (query, status, code) in cases {
        let (got, body) = app.post(json!({"query": query}).to_string()).await;
        assert_eq!(
            (got, body["errors"][0]["extensions"]["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
        assert!(body.get("data").is_none_or(Value::is_null), "{body}");
        assert_eq!(body["errors"].as_array().unwrap().len(), 1, "{body}");
    }
    // Thirty unknown fields: twenty errors, then how many more.
    let unknown: String = (0..30).map(|n| format!("x{n} ")).collect();
    let (got, body) = app
        .post(json!({"query": format!("{{ me {{ {unknown} }} }}")}).to_string())
        .await;
    assert_eq!(got, StatusCode::BAD_REQUEST);
    let errors = body["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 21, "{body}");
    assert_eq!(errors[20]["extensions"]["code"], "MORE_ERRORS");
    assert_eq!(errors[20]["extensions"]["count"], 10);
    // Every refusal's audit record is small, whatever the document.
    let records = app.records().await;
    for record in &records {
        let size = record.to_string().len();
        assert!(size < 4096, "an audit record of {size} bytes: {record}");
    }
    // No suggestions either: a misspelt field is not corrected.
    let (_, body) = app
        .post(json!({"query": "{ partnrs { id } }"}).to_string())
        .await;
    assert!(!body.to_string().contains("Did you mean"), "{body}");
    // Never executed over GET, mutation or not.
    let response = app
        .router
        .clone()
        .oneshot(
            Request::get("/graphql?query=mutation%7Bx%7D")
                .header("authorization", format!("Bearer {}", app.token))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.headers()["allow"], "POST");
    assert_eq!(
        app.partner_hits.load(Ordering::SeqCst),
        before,
        "no partner was asked"
    );
    // Six aliased pages of 500 in 700 bytes: the partners are asked for at
    // most one request's budget (500 studies); the rest are refused.
    let hits = app.partner_hits.load(Ordering::SeqCst);
    let pages: String = (0..6)
        .map(|n| format!("p{n}: imagingStudies(project: \"p1\", first: 500) {{ nodes {{ studyInstanceUid }} }} "))
        .collect();
    let (got, body) = app
        .post(json!({"query": format!("{{ {pages} }}")}).to_string())
        .await;
    assert_eq!(got, StatusCode::OK, "{body}");
    let refused = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["extensions"]["code"] == "REQUEST_BUDGET_EXCEEDED")
        .count();
    assert_eq!(refused, 5, "{body}");
    assert!(
        app.partner_hits.load(Ordering::SeqCst) - hits <= 2,
        "one page's partner calls at most"
    );
    // An ordinary query still reaches the partner.
    let (status, _) = app
        .post(json!({"query": format!("{{ {count} }}")}).to_string())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(app.partner_hits.load(Ordering::SeqCst) > before);
}

impl App {
    /// Serves the app on a real socket with its `[server]` settings.
    async fn listen(self) -> (std::net::SocketAddr, App) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let router = self.router.clone();
        let server = self.server;
        tokio::spawn(async move {
            meshgate_gateway::run(listener, router, &server, std::future::pending()).await
        });
        (address, self)
    }
}

/// Reads what the server sends until it closes the connection (or `wait`
/// passes): the bytes, and whether it closed.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, wait: Duration) -> (String, bool) {
    use tokio::io::AsyncReadExt as _;
    let mut received = Vec::new();
    let mut buffer = [0_u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (String::from_utf8_lossy(&received).into_owned(), true);
            }
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
            Err(_) => return (String::from_utf8_lossy(&received).into_owned(), false),
        }
    }
}

#[tokio::test]
async fn slow_headers_and_slow_bodies_are_cut_off_after_their_timeouts() {
    use tokio::io::AsyncWriteExt as _;
    let (address, app) = app_with("[server]\nheader_timeout_ms = 300\nbody_timeout_ms = 300\n")
        .await
        .listen()
        .await;
    // Headers that never finish: the connection is closed.
    let mut slow_headers = tokio::net::TcpStream::connect(address).await.unwrap();
    slow_headers
        .write_all(b"POST /graphql HTTP/1.1\r\nHost: meshgate\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let (_, closed) = read_until_closed(&mut slow_headers, Duration::from_secs(5)).await;
    assert!(closed, "a connection with unfinished headers stays open");
    assert!(started.elapsed() < Duration::from_secs(3));
    // A body that never finishes: 408 with its code, and it is audited.
    let mut slow_body = tokio::net::TcpStream::connect(address).await.unwrap();
    slow_body
        .write_all(
            format!(
                "POST /graphql HTTP/1.1\r\nHost: meshgate\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"query\":",
                app.token
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let (response, _) = read_until_closed(&mut slow_body, Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("REQUEST_TIMEOUT"), "{response}");
}

/// `GET /healthz` from another client address: its status line and how
/// long the answer took.
async fn health_check(address: std::net::SocketAddr) -> (String, Duration) {
    use tokio::io::AsyncWriteExt as _;
    let started = Instant::now();
    let mut stream = connect_from("127.0.0.2", address).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: meshgate\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (response, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    let status = response.lines().next().unwrap_or_default().to_owned();
    (status, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_and_bare_http2_prefaces_are_closed_while_health_checks_keep_answering()
{
    use tokio::io::AsyncWriteExt as _;
    let (address, _app) = app_with(
        "[server]\nheader_timeout_ms = 600\nmax_connections = 200\nmax_connections_per_address = 100\n",
    )
    .await
    .listen()
    .await;
    // One source opens 150 connections: 120 that send nothing, 30 that send
    // only an HTTP/2 preface. Past 100 from one address, they are closed
    // on accept; the rest when their head is late.
    let mut attack = Vec::new();
    for i in 0..150 {
        let mut stream = connect_from("127.0.0.1", address).await.unwrap();
        if i % 5 == 0 {
            stream
                .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                .await
                .unwrap();
        }
        attack.push(stream);
    }
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_millis(1500) {
        let (status, took) = health_check(address).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        slowest = slowest.max(took);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        slowest < Duration::from_millis(100),
        "/healthz took {slowest:?}"
    );
    // Every attacking connection has been closed by now.
    for (i, stream) in attack.iter_mut().enumerate() {
        let (_, closed) = read_until_closed(stream, Duration::from_millis(200)).await;
        assert!(closed, "attacking connection {i} is still open");
    }
    // An idle keep-alive connection after a response is closed too.
    let mut kept = connect_from("127.0.0.1", address).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: meshgate\r\n\r\n")
        .await
        .unwrap();
    let (response, closed) = read_until_closed(&mut kept, Duration::from_secs(3)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(closed, "an idle keep-alive connection stays open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploads_from_one_principal_are_limited_and_others_keep_being_served() {
    use tokio::io::AsyncWriteExt as _;
    let (address, app) = app_with(
        "[server]\nmax_in_flight = 8\nbody_timeout_ms = 3000\nper_principal = { concurrent = 4, per_second = 100.0, burst = 100 }\n",
    )
    .await
    .listen()
    .await;
    // Forty uploads from one token that never finish their bodies.
    let mut uploads = Vec::new();
    for _ in 0..40 {
        let mut stream = connect_from("127.0.0.1", address).await.unwrap();
        stream
            .write_all(
                format!(
                    "POST /graphql HTTP/1.1\r\nHost: meshgate\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"query\":",
                    app.token
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        uploads.push(stream);
    }
    // Past its four, that principal is told to wait, at once.
    let mut limited = 0;
    for stream in &mut uploads {
        let (response, _) = read_until_closed(stream, Duration::from_millis(300)).await;
        if response.starts_with("HTTP/1.1 429") {
            assert!(response.contains("RATE_LIMITED"), "{response}");
            assert!(
                response.to_ascii_lowercase().contains("retry-after: "),
                "{response}"
            );
            limited += 1;
        }
    }
    assert_eq!(limited, 36, "uploads past the principal's four");
    // Another researcher is served meanwhile: the slow bodies hold no
    // in-flight permit.
    let bob = app.issuer.token(
        &json!({"sub": "bob", "roles": ["researcher"], "projects": ["p1"]}),
        Duration::from_secs(300),
    );
    for _ in 0..10 {
        let ((status, body), _) = app
            .send(
                Some(&bob),
                json!({"query": "{ me { subject } }"}).to_string(),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_audit_exports_stream_in_bounded_memory_and_each_is_complete() {
    use futures::StreamExt as _;
    let app = Arc::new(
        app_with("[server]\nper_principal = { concurrent = 64, per_second = 100000.0, burst = 100000 }\nper_address = { concurrent = 64, per_second = 100000.0, burst = 100000 }\n")
            .await,
    );
    // 4,000 audited requests, each with a sizeable normalised filter.
    let uids: Vec<String> = (0..40)
        .map(|n| format!("1.2.826.0.1.3680043.8.498.{n}"))
        .collect();
    let query = json!({
        "query": "query($f: StudyFilter) { cohortCount(project: \"p1\", filter: $f) { total } }",
        "variables": {"f": {"studyInstanceUids": uids}},
    })
    .to_string();
    let seeding: Vec<_> = (0..8)
        .map(|_| {
            let (app, query) = (Arc::clone(&app), query.clone());
            tokio::spawn(async move {
                for _ in 0..500 {
                    let (status, body) = app.post(query.clone()).await;
                    assert_eq!(status, StatusCode::OK, "{body}");
                }
            })
        })
        .collect();
    for task in seeding {
        task.await.unwrap();
    }
    let before = peak_rss(None);
    // Thirty governance-wide exports of up to 10,000 events at once, read
    // as they stream.
    let exports: Vec<_> = (0..30)
        .map(|_| {
            let app = Arc::clone(&app);
            tokio::spawn(async move {
                let response = app
                    .router
                    .clone()
                    .oneshot(
                        Request::get("/audit/AuditEvent.ndjson?limit=10000")
                            .header("authorization", format!("Bearer {}", app.token))
                            .body(Body::empty())
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                let mut lines = 0;
                let mut stream = response.into_body().into_data_stream();
                while let Some(chunk) = stream.next().await {
                    lines += chunk.unwrap().iter().filter(|b| **b == b'\n').count();
                }
                lines
            })
        })
        .collect();
    for task in exports {
        let lines = task.await.unwrap();
        // Alice sees her own 4,000 requests (and earlier exports' records).
        assert!(lines >= 4000, "an export had {lines} events");
    }
    let grown = peak_rss(None).saturating_sub(before);
    println!(
        "30 concurrent exports of >= 4,000 events grew the peak RSS by {} MiB",
        grown >> 20
    );
    assert!(
        grown < 96 << 20,
        "exports grew the process by {} MiB",
        grown >> 20
    );
}

#[tokio::test]
async fn open_connections_are_capped() {
    use tokio::io::AsyncWriteExt as _;
    let (address, app) = app_with("[server]\nmax_connections = 2\nheader_timeout_ms = 5000\n")
        .await
        .listen()
        .await;
    let idle_one = tokio::net::TcpStream::connect(address).await.unwrap();
    let _idle_two = tokio::net::TcpStream::connect(address).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = tokio::net::TcpStream::connect(address).await.unwrap();
    let body = json!({"query": "{ me { subject } }"}).to_string();
    third
        .write_all(
            format!(
                "POST /graphql HTTP/1.1\r\nHost: meshgate\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                app.token,
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let (nothing, _) = read_until_closed(&mut third, Duration::from_millis(500)).await;
    assert!(nothing.is_empty(), "served beyond the cap: {nothing}");
    drop(idle_one);
    let (response, _) = read_until_closed(&mut third, Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

#[tokio::test]
async fn a_failing_partner_trips_its_breaker_is_not_called_while_open_and_is_called_again_after_recovery()
 {
    let app =
        app_with("[partners.protection]\nbreaker_failures = 3\nbreaker_cool_down_ms = 400\n").await;
    let count =
        json!({"query": "{ cohortCount(project: \"p1\") { total partners { status code } } }"})
            .to_string();
    let status_of = |body: &Value| {
        (
            body["data"]["cohortCount"]["partners"][0]["status"].clone(),
            body["data"]["cohortCount"]["partners"][0]["code"].clone(),
        )
    };
    app.partner_failing.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let (_, body) = app.post(count.clone()).await;
        assert_eq!(status_of(&body).1, "PARTNER_HTTP_ERROR", "{body}");
    }
    // Open: reported, and not called at all.
    let before = app.partner_hits.load(Ordering::SeqCst);
    for _ in 0..5 {
        let (status, body) = app.post(count.clone()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            status_of(&body),
            (json!("CIRCUIT_OPEN"), json!("PARTNER_CIRCUIT_OPEN")),
            "{body}"
        );
    }
    assert_eq!(
        app.partner_hits.load(Ordering::SeqCst),
        before,
        "zero calls while open"
    );
    // The partner recovers; after the cool-down one probe goes through
    // and closes the breaker.
    app.partner_failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(450)).await;
    let (_, body) = app.post(count.clone()).await;
    assert_eq!(status_of(&body).0, "OK", "{body}");
    let (_, body) = app.post(count).await;
    assert_eq!(status_of(&body).0, "OK", "{body}");
    assert!(app.partner_hits.load(Ordering::SeqCst) > before);

    // Operators see it in the metrics: calls by outcome, breaker state,
    // latency; and nothing about who asked or what. Only the scraper's
    // token opens them (not a researcher's).
    let metrics_with = |token: Option<String>| {
        let mut request = Request::get("/metrics");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        app.router
            .clone()
            .oneshot(request.body(Body::empty()).unwrap())
    };
    for refused in [
        None,
        Some(app.token.clone()),
        Some(format!("{METRICS_TOKEN}x")),
    ] {
        let response = metrics_with(refused).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    let response = metrics_with(Some(METRICS_TOKEN.to_owned())).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = String::from_utf8(
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    for expected in [
        "meshgate_partner_calls_total{partner=\"empty\",status=\"CIRCUIT_OPEN\"}",
        "meshgate_partner_calls_total{partner=\"empty\",status=\"ERROR\"}",
        "meshgate_partner_calls_total{partner=\"empty\",status=\"OK\"}",
        "meshgate_partner_circuit_open{partner=\"empty\"} 0",
        "meshgate_http_requests_total{status=\"200\"}",
        "meshgate_http_request_duration_seconds_bucket{le=\"+Inf\"}",
        "meshgate_partner_duration_seconds_count{partner=\"empty\"}",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
    assert!(!text.contains("alice") && !text.contains(&app.token));
}

#[tokio::test]
async fn metrics_are_not_served_on_the_api_port_unless_a_scraper_token_is_configured() {
    let app = app_with("[metrics]\n").await;
    let response = app
        .router
        .clone()
        .oneshot(
            Request::get("/metrics")
                .header("authorization", format!("Bearer {}", app.token))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_capacity_is_shed_at_once_while_admitted_requests_succeed() {
    let app = app_with("[server]\nmax_in_flight = 2\n").await;
    app.partner_delay_ms.store(300, Ordering::SeqCst);
    let app = Arc::new(app);
    let burst: Vec<_> = (0..12)
        .map(|_| {
            let app = Arc::clone(&app);
            tokio::spawn(async move {
                let started = Instant::now();
                let (status, body) = app
                    .post(
                        json!({"query": "{ cohortCount(project: \"p1\") { total } }"}).to_string(),
                    )
                    .await;
                (status, body, started.elapsed())
            })
        })
        .collect();
    let mut admitted = 0;
    let mut shed = 0;
    for task in burst {
        let (status, body, took) = task.await.unwrap();
        match status {
            StatusCode::OK => admitted += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(body["errors"][0]["extensions"]["code"], "OVERLOADED");
                assert!(took < Duration::from_millis(250), "shed fast: {took:?}");
                shed += 1;
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert!(
        admitted >= 2 && shed >= 1,
        "admitted {admitted}, shed {shed}"
    );
    // Still up, and ready.
    let (status, _) = app
        .post(json!({"query": "{ me { subject } }"}).to_string())
        .await;
    assert_eq!(status, StatusCode::OK);
    let ready = app
        .router
        .clone()
        .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
}
