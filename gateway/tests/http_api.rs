//! The HTTP face of the gateway, in memory: what happens to requests that
//! never reach a partner, and to requests whose audit record cannot be kept.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use meshgate_gateway::app::build_app_with_audit;
use meshgate_gateway::config::{Config, ProcessEnvironment};
use meshgate_gateway::dev_issuer::DevIssuer;
use meshgate_gateway::request::{AuditError, AuditRecord, AuditSink};
use meshgate_gateway::start;
use serde_json::{Value, json};
use tower::ServiceExt;

#[derive(Debug, Default)]
struct RecordingSink {
    fail: bool,
    records: std::sync::Mutex<Vec<AuditRecord>>,
}

impl AuditSink for RecordingSink {
    fn record(&self, record: &AuditRecord) -> Result<(), AuditError> {
        if self.fail {
            return Err(AuditError);
        }
        self.records.lock().unwrap().push(record.clone());
        Ok(())
    }
}

/// A gateway over one empty files partner, trusting a development issuer,
/// with policies that let approved researchers read identified records.
struct App {
    router: axum::Router,
    token: String,
    _issuer: DevIssuer,
    _folder: tempfile::TempDir,
}

async fn app(sink: Arc<RecordingSink>) -> App {
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
    let data = folder.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let text = format!(
        r#"
[auth]
[[auth.issuers]]
issuer = "{issuer}"
audiences = ["meshgate"]
jwks_url = "{jwks}"

[policies]
consortium = ["allow.cedar"]

[deidentification]
key = "${{file:{key}}}"

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
connector = {{ kind = "files", path = "{data}" }}
"#,
        issuer = issuer.issuer(),
        jwks = issuer.jwks_url(),
        key = key.display(),
        data = data.display(),
    );
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
    App {
        router: build_app_with_audit(start(&loaded).await.unwrap(), sink),
        token,
        _issuer: issuer,
        _folder: folder,
    }
}

impl App {
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
async fn every_request_is_audited_with_partner_outcomes_but_no_filter_values() {
    let sink = Arc::new(RecordingSink::default());
    let app = app(Arc::clone(&sink)).await;
    let query = json!({"query": "{ cohortCount(project: \"p1\", filter: {bodyPart: \"CHEST\", description: \"secret words\"}) { total } }"});
    let (status, body) = app.post(query.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["cohortCount"]["total"], 0);
    let records = sink.records.lock().unwrap();
    assert_eq!(records.len(), 1);
    let record = serde_json::to_string(&records[0]).unwrap();
    assert!(record.contains("\"partner\":\"empty\""), "{record}");
    assert!(record.contains("\"subject\":\"alice\""), "{record}");
    assert!(record.contains("\"project\":\"p1\""), "{record}");
    assert!(record.contains("\"disclosure\":\"IDENTIFIED\""), "{record}");
    assert!(!record.contains(&app.token), "no token in audit records");
    assert!(
        !record.contains("secret words") && !record.contains("CHEST"),
        "{record}"
    );
}

#[tokio::test]
async fn a_request_whose_audit_record_cannot_be_written_fails_closed_with_503() {
    let sink = Arc::new(RecordingSink {
        fail: true,
        ..RecordingSink::default()
    });
    let app = app(sink).await;
    let (status, body) = app
        .post(json!({"query": "{ imagingStudies(project: \"p1\") { totalCount } }"}).to_string())
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["errors"][0]["extensions"]["code"], "AUDIT_UNAVAILABLE");
    assert!(
        body.get("data").is_none(),
        "no data without an audit record: {body}"
    );
}

#[tokio::test]
async fn malformed_batched_and_oversized_requests_are_refused_with_stable_codes() {
    let sink = Arc::new(RecordingSink::default());
    let app = app(Arc::clone(&sink)).await;
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
    let records = sink.records.lock().unwrap();
    assert_eq!(records.len(), count, "refused requests are audited too");
    assert!(records.iter().all(|r| r.outcome == "failure"));
}

#[tokio::test]
async fn requests_without_a_valid_token_get_401_with_a_challenge_before_anything_else() {
    let sink = Arc::new(RecordingSink::default());
    let app = app(Arc::clone(&sink)).await;
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

    let records = sink.records.lock().unwrap();
    assert_eq!(records.len(), 2, "refusals are audited");
    assert!(
        records
            .iter()
            .all(|r| r.principal.is_none() && r.outcome == "failure")
    );
}

#[tokio::test]
async fn a_query_for_an_unregistered_project_is_refused_with_its_code() {
    let app = app(Arc::new(RecordingSink::default())).await;
    let (status, body) = app
        .post(json!({"query": "{ cohortCount(project: \"nope\") { total } }"}).to_string())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["errors"][0]["extensions"]["code"], "UNKNOWN_PROJECT");
}

#[tokio::test]
async fn me_returns_the_principal_mapped_from_the_token() {
    let app = app(Arc::new(RecordingSink::default())).await;
    let (status, body) = app
        .post(json!({"query": "{ me { subject roles projects institution } }"}).to_string())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["data"]["me"],
        json!({"subject": "alice", "roles": ["RESEARCHER"], "projects": ["p1"], "institution": null})
    );
}
