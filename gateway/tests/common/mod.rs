//! What the gateway's integration tests share.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use axum::http::StatusCode;

/// A DICOMweb partner that answers every QIDO-RS search with no rows (or
/// with 500 while `failing` is set, after `delay` ms), and counts requests.
/// Returns its URL, the count, the failing switch and the delay.
pub async fn counting_partner() -> (String, Arc<AtomicU32>, Arc<AtomicBool>, Arc<AtomicU32>) {
    let hits = Arc::new(AtomicU32::new(0));
    let failing = Arc::new(AtomicBool::new(false));
    let delay = Arc::new(AtomicU32::new(0));
    let (counter, fail, wait) = (Arc::clone(&hits), Arc::clone(&failing), Arc::clone(&delay));
    let partner = axum::Router::new().fallback(move || {
        let counter = Arc::clone(&counter);
        let fail = Arc::clone(&fail);
        let wait = u64::from(wait.load(Ordering::SeqCst));
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            if fail.load(Ordering::SeqCst) {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [("content-type", "text/plain")],
                    "down",
                );
            }
            (
                StatusCode::OK,
                [("content-type", "application/dicom+json")],
                "[]",
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/dicom-web/", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, partner).await });
    (url, hits, failing, delay)
}
