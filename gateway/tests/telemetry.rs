//! Traces as operators see them in their tracing backend: one span per
//! request with a child per partner call, exported over OTLP/HTTP to a
//! collector, and nothing in them a patient or a token could be found by.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;

use common::{Setup, free_port, serve};

/// An OTLP/HTTP collector keeping every span and every raw request body.
async fn collector() -> (String, Arc<Mutex<Vec<Span>>>, Arc<Mutex<Vec<u8>>>) {
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let raw: Arc<Mutex<Vec<u8>>> = Arc::default();
    let (kept, bytes) = (Arc::clone(&spans), Arc::clone(&raw));
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let (kept, bytes) = (Arc::clone(&kept), Arc::clone(&bytes));
            async move {
                bytes.lock().unwrap().extend_from_slice(&body);
                let request = ExportTraceServiceRequest::decode(body).unwrap();
                for resource in request.resource_spans {
                    for scope in resource.scope_spans {
                        kept.lock().unwrap().extend(scope.spans);
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans, raw)
}

fn attributes(span: &Span) -> HashMap<String, String> {
    span.attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                Some(AnyValue::IntValue(i)) => i.to_string(),
                Some(AnyValue::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_and_partner_call_is_a_span_at_the_otlp_collector_without_patient_data_or_tokens()
 {
    let (endpoint, spans, raw) = collector().await;
    let setup = Setup::new().await;
    let port = free_port();
    let config = setup.config("traced", port, "sqlite:audit.db", &setup.files_connector());
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[telemetry]\notlp_traces_endpoint = \"{endpoint}\"\n"
    ));
    std::fs::write(&config, text).unwrap();
    let gateway = serve(&config, port).await;

    let client = reqwest::Client::new();
    let mut request_ids = Vec::new();
    for _ in 0..3 {
        let response = client
            .post(format!("http://127.0.0.1:{port}/graphql"))
            .bearer_auth(&setup.token)
            .json(&serde_json::json!({"query":
                "{ cohortCount(project: \"p1\", filter: {description: \"confidentialword\"}) { total } }"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        request_ids.push(
            response.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    // A graceful stop flushes the spans still buffered.
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&gateway.0),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let mut gateway = gateway;
    let deadline = Instant::now() + Duration::from_secs(20);
    while gateway.0.try_wait().unwrap().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let spans = spans.lock().unwrap().clone();
    let requests: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "graphql request")
        .collect();
    let calls: Vec<&Span> = spans.iter().filter(|s| s.name == "partner call").collect();
    let traced_ids: Vec<String> = requests
        .iter()
        .map(|s| attributes(s)["request_id"].clone())
        .collect();
    for id in &request_ids {
        assert!(
            traced_ids.contains(id),
            "no span for request {id}: {traced_ids:?}"
        );
    }
    assert!(
        requests
            .iter()
            .all(|s| attributes(s)["http.response.status_code"] == "200")
    );
    // The first query asks the partner; the same query again is answered
    // from the cache, without a call.
    assert_eq!(calls.len(), 1, "{calls:?}");
    for call in &calls {
        let attributes = attributes(call);
        assert_eq!(attributes["partner"], "north");
        assert_eq!(attributes["phase"], "search");
        assert_eq!(attributes["status"], "OK");
        // A child of its request's span, in the same trace.
        let parent = requests
            .iter()
            .find(|r| r.trace_id == call.trace_id)
            .expect("the partner call's request span");
        assert_eq!(call.parent_span_id, parent.span_id);
    }
    let raw = String::from_utf8_lossy(&raw.lock().unwrap()).into_owned();
    for secret in [setup.token.as_str(), "auditor-test", "confidentialword"] {
        assert!(!raw.contains(secret), "a span carries {secret}");
    }
}
