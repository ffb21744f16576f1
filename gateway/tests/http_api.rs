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
use meshgate_connectors::files::FilesConnector;
use meshgate_gateway::app::build_app_with_audit;
use meshgate_gateway::federation::{Federation, Partner};
use meshgate_gateway::request::{AuditError, AuditRecord, AuditSink};
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

async fn app(sink: Arc<RecordingSink>) -> (axum::Router, tempfile::TempDir) {
    let folder = tempfile::tempdir().unwrap();
    let connector = FilesConnector::open(folder.path().to_owned(), Duration::from_secs(60))
        .await
        .unwrap();
    let federation = Federation::new(vec![Partner {
        id: "empty".into(),
        name: "Empty archive".into(),
        connector: Arc::new(connector),
        deadline: Duration::from_secs(1),
        mapping: Default::default(),
    }]);
    (build_app_with_audit(federation, sink), folder)
}

async fn post(app: &axum::Router, body: impl Into<Body>) -> (StatusCode, Value) {
    let request = Request::post("/graphql")
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn every_request_is_audited_with_partner_outcomes_but_no_filter_values() {
    let sink = Arc::new(RecordingSink::default());
    let (app, _folder) = app(Arc::clone(&sink)).await;
    let query = json!({"query": "{ cohortCount(filter: {bodyPart: \"CHEST\", description: \"secret words\"}) { total } }"});
    let (status, body) = post(&app, query.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["cohortCount"]["total"], 0);
    let records = sink.records.lock().unwrap();
    assert_eq!(records.len(), 1);
    let record = serde_json::to_string(&records[0]).unwrap();
    assert!(record.contains("\"partner\":\"empty\""), "{record}");
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
    let (app, _folder) = app(sink).await;
    let (status, body) = post(
        &app,
        json!({"query": "{ imagingStudies { totalCount } }"}).to_string(),
    )
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
    let (app, _folder) = app(Arc::clone(&sink)).await;
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
        let (got, response) = post(&app, body).await;
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
