//! QIDO-RS protocol edge cases that Orthanc never produces (`204` empties,
//! rows repeated across pages, result caps, auth refusals, server errors),
//! served by a stand-in that follows PS3.18 paging. The Orthanc end-to-end
//! suite in `tests/` covers the real server.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

use futures::StreamExt as _;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use meshgate_connectors::dicomweb::{Auth, DicomWebConnector, DicomWebSettings, Profile, Url};
use meshgate_connectors::{Connector, ConnectorError, Secret};
use meshgate_schema::StudyQuery;
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Quirk {
    None,
    /// An empty page is `204 No Content` (Azure).
    EmptyAs204,
    /// Every page after the first starts with the previous page's last row.
    RepeatRows,
    /// Ignores `offset`: every page is the first page.
    IgnoresOffset,
    /// Never returns more than this many rows in all (a silent cap).
    Cap(usize),
    /// Answers every request with this status and a body that must not leak.
    Status(u16),
    /// Answers 200 with something that is not DICOM JSON.
    Garbage,
    /// Answers 200 with an endless body, streamed without a length.
    Endless,
    /// Requires this exact Authorization header.
    RequireAuth(&'static str),
}

#[derive(Debug)]
struct StandIn {
    rows: Vec<Value>,
    quirk: Quirk,
    requests: Mutex<Vec<String>>,
}

fn study(index: usize) -> Value {
    json!({
        "0020000D": {"vr": "UI", "Value": [format!("1.2.826.0.1.{index}")]},
        "00080020": {"vr": "DA", "Value": [format!("2020{:02}{:02}", 1 + index % 12, 1 + index % 28)]},
        "00080061": {"vr": "CS", "Value": ["CT"]},
    })
}

async fn studies(
    State(stand_in): State<Arc<StandIn>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    stand_in
        .requests
        .lock()
        .unwrap()
        .push(format!("{params:?}"));
    let limit: usize = params
        .get("limit")
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let offset: usize = params
        .get("offset")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    match stand_in.quirk {
        Quirk::Status(code) => {
            return (StatusCode::from_u16(code).unwrap(), "SECRET-UPSTREAM-BODY").into_response();
        }
        Quirk::Garbage => {
            return (StatusCode::OK, "<html>SECRET-UPSTREAM-BODY</html>").into_response();
        }
        Quirk::Endless => {
            let chunk = bytes::Bytes::from(vec![b' '; 1 << 20]);
            let body = futures::stream::repeat(chunk).map(Ok::<_, std::io::Error>);
            return (StatusCode::OK, axum::body::Body::from_stream(body)).into_response();
        }
        Quirk::RequireAuth(expected)
            if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected) =>
        {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        _ => {}
    }
    let available = match stand_in.quirk {
        Quirk::Cap(cap) => stand_in.rows.len().min(cap),
        _ => stand_in.rows.len(),
    };
    let start = match stand_in.quirk {
        Quirk::IgnoresOffset => 0,
        Quirk::RepeatRows if offset > 0 => offset - 1,
        _ => offset,
    };
    let page: Vec<Value> = stand_in
        .rows
        .iter()
        .take(available)
        .skip(start)
        .take(limit)
        .cloned()
        .collect();
    if page.is_empty() && stand_in.quirk == Quirk::EmptyAs204 {
        return StatusCode::NO_CONTENT.into_response();
    }
    axum::Json(page).into_response()
}

async fn serve(rows: usize, quirk: Quirk) -> (String, Arc<StandIn>) {
    let stand_in = Arc::new(StandIn {
        rows: (0..rows).map(study).collect(),
        quirk,
        requests: Mutex::default(),
    });
    let app = Router::new()
        .route("/dicom-web/studies", get(studies))
        .with_state(Arc::clone(&stand_in));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/dicom-web", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, stand_in)
}

fn connector(url: &str, auth: Auth, max_results: Option<u32>) -> DicomWebConnector {
    DicomWebConnector::new(DicomWebSettings {
        base_url: Url::parse(url).unwrap(),
        profile: Profile::Generic,
        auth,
        page_size: Some(10),
        detail_concurrency: 2,
        max_results,
    })
    .unwrap()
}

async fn search(connector: &DicomWebConnector) -> Result<(usize, bool), ConnectorError> {
    let outcome = connector.search(&StudyQuery::default()).await?;
    let mut uids: Vec<&str> = outcome.studies.iter().map(|s| s.uid.as_str()).collect();
    uids.sort();
    uids.dedup();
    assert_eq!(uids.len(), outcome.studies.len(), "duplicates returned");
    Ok((outcome.studies.len(), outcome.truncated))
}

#[tokio::test]
async fn all_pages_are_fetched_and_an_empty_page_may_be_204_or_an_empty_array() {
    for quirk in [Quirk::None, Quirk::EmptyAs204] {
        let (url, stand_in) = serve(35, quirk).await;
        assert_eq!(
            search(&connector(&url, Auth::None, None)).await.unwrap(),
            (35, false),
            "{quirk:?}"
        );
        // Pages at offsets 0, 10, 20, 30, then the empty page that ends it.
        assert_eq!(stand_in.requests.lock().unwrap().len(), 5, "{quirk:?}");
        let (url, _) = serve(0, quirk).await;
        assert_eq!(
            search(&connector(&url, Auth::None, None)).await.unwrap(),
            (0, false),
            "{quirk:?}"
        );
    }
}

#[tokio::test]
async fn rows_repeated_across_pages_are_returned_once() {
    let (url, _) = serve(25, Quirk::RepeatRows).await;
    assert_eq!(
        search(&connector(&url, Auth::None, None)).await.unwrap(),
        (25, false)
    );
}

#[tokio::test]
async fn a_backend_that_ignores_offset_is_reported_as_truncated_instead_of_looping() {
    let (url, stand_in) = serve(25, Quirk::IgnoresOffset).await;
    assert_eq!(
        search(&connector(&url, Auth::None, None)).await.unwrap(),
        (10, true)
    );
    // The first page, one repeat (which a backend that repeats rows across
    // pages can end on), and a second repeat that settles it.
    assert_eq!(stand_in.requests.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn a_last_page_of_only_repeated_rows_ends_the_search_without_truncation() {
    // Five rows on a first page of ten: the next page is the repeat of the
    // fifth row alone, and the one after that is empty.
    let (url, stand_in) = serve(5, Quirk::RepeatRows).await;
    assert_eq!(
        search(&connector(&url, Auth::None, None)).await.unwrap(),
        (5, false)
    );
    assert_eq!(stand_in.requests.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn reaching_a_backend_result_cap_is_reported_as_truncated_not_hidden() {
    let (url, stand_in) = serve(50, Quirk::Cap(20)).await;
    assert_eq!(
        search(&connector(&url, Auth::None, Some(20)))
            .await
            .unwrap(),
        (20, true)
    );
    // It stops at the cap instead of asking for pages the backend will not give.
    assert_eq!(stand_in.requests.lock().unwrap().len(), 2);
    let (url, _) = serve(15, Quirk::None).await;
    assert_eq!(
        search(&connector(&url, Auth::None, Some(20)))
            .await
            .unwrap(),
        (15, false)
    );
}

#[tokio::test]
async fn basic_and_bearer_credentials_are_sent_and_a_refusal_is_an_auth_error() {
    let (url, _) = serve(3, Quirk::RequireAuth("Basic bWVzaGdhdGU6czNjcmV0")).await;
    let basic = Auth::Basic {
        username: "meshgate".into(),
        password: Secret::new("s3cret"),
    };
    assert_eq!(
        search(&connector(&url, basic, None)).await.unwrap(),
        (3, false)
    );
    let wrong = Auth::Basic {
        username: "meshgate".into(),
        password: Secret::new("guess"),
    };
    assert!(matches!(
        search(&connector(&url, wrong, None)).await,
        Err(ConnectorError::Unauthorized(401))
    ));

    let (url, _) = serve(3, Quirk::RequireAuth("Bearer tok-123")).await;
    let bearer = Auth::Bearer {
        token: Secret::new("tok-123"),
    };
    assert_eq!(
        search(&connector(&url, bearer, None)).await.unwrap(),
        (3, false)
    );
    let error = search(&connector(&url, Auth::None, None))
        .await
        .unwrap_err();
    assert_eq!(error.code(), "PARTNER_AUTH_FAILED");
    assert!(!error.retryable());
}

#[tokio::test]
async fn server_errors_garbage_and_dead_hosts_become_typed_errors_without_upstream_details() {
    let cases = [
        (Quirk::Status(500), "PARTNER_HTTP_ERROR", true),
        (Quirk::Status(503), "PARTNER_HTTP_ERROR", true),
        (Quirk::Status(400), "PARTNER_HTTP_ERROR", false),
        // A store (or partition) that is not there.
        (Quirk::Status(404), "PARTNER_STORE_NOT_FOUND", false),
        (Quirk::Garbage, "PARTNER_BAD_RESPONSE", false),
        // Memory stays bounded: reading stops at the response size cap.
        (Quirk::Endless, "PARTNER_RESPONSE_TOO_LARGE", false),
        // Throttled on every try (backing off 0.2, 0.4, 0.8 s without Retry-After).
        (Quirk::Status(429), "PARTNER_THROTTLED", true),
    ];
    for (quirk, code, retryable) in cases {
        let (url, _) = serve(3, quirk).await;
        let error = search(&connector(&url, Auth::None, None))
            .await
            .unwrap_err();
        assert_eq!(
            (error.code(), error.retryable()),
            (code, retryable),
            "{quirk:?}"
        );
        assert!(
            !error.to_string().contains("SECRET-UPSTREAM-BODY"),
            "{error}"
        );
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/dicom-web?StudyInstanceUID=1.2.3");
    let error = search(&connector(&url, Auth::None, None))
        .await
        .unwrap_err();
    assert!(error.is_unavailable(), "{error}");
    assert!(
        !error.to_string().contains("127.0.0.1") && !error.to_string().contains("1.2.3"),
        "{error}"
    );
}

/// A front for `target` that reads the request on each of the first `drops`
/// connections and closes it unanswered, as a server does when it closes a
/// keep-alive connection the client is just reusing; later connections are
/// forwarded.
async fn dropping_front(target: &str, drops: usize) -> String {
    use tokio::io::AsyncReadExt;
    let target = Url::parse(target).unwrap();
    let upstream = format!("{}:{}", target.host_str().unwrap(), target.port().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut front = target.clone();
    front
        .set_port(Some(listener.local_addr().unwrap().port()))
        .unwrap();
    tokio::spawn(async move {
        let mut accepted = 0;
        loop {
            let (mut client, _) = listener.accept().await.unwrap();
            accepted += 1;
            if accepted <= drops {
                let mut buffer = [0u8; 4096];
                let _ = client.read(&mut buffer).await;
                drop(client);
                continue;
            }
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let mut server = tokio::net::TcpStream::connect(upstream).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    front.to_string()
}

#[tokio::test]
async fn a_partner_closing_connections_under_a_request_is_asked_again_on_a_new_one() {
    let (url, _) = serve(25, Quirk::None).await;
    let front = dropping_front(&url, 2).await;
    assert_eq!(
        search(&connector(&front, Auth::None, None)).await.unwrap(),
        (25, false)
    );
    // A partner that never answers is unreachable after a bounded number of tries.
    let front = dropping_front(&url, usize::MAX).await;
    let error = search(&connector(&front, Auth::None, None))
        .await
        .unwrap_err();
    assert_eq!(error.code(), "PARTNER_UNREACHABLE", "{error}");
}
