//! The server loop: connections accepted on a thread of their own, served
//! on a runtime of their own, limited per client address, timed out when
//! silent, and drained on shutdown. The routes it serves are
//! [`crate::app`]'s.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::Response;
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::config::ServerSection;
use crate::metrics::METRICS;

/// Connections the kernel queues for [`run`] to accept: as many as Linux
/// allows by default (`net.core.somaxconn`), so a burst of connections is
/// absorbed rather than dropped.
const LISTEN_BACKLOG: u32 = 4096;

/// A listener for [`run`] on `address`, with a deep accept queue.
pub fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// How long shutdown waits for requests in flight.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` until `shutdown` completes, then drains the
/// requests in flight (at most [`DRAIN_TIMEOUT`]). At most
/// `server.max_connections` connections are open at once (more wait in the
/// listen backlog), and `server.max_connections_per_address` from one
/// client address (more are closed on accept). A connection with no
/// request in progress that has not delivered a complete request head
/// within `server.header_timeout_ms` of opening or of its last response is
/// closed, whatever it sends (nothing, part of a head, an HTTP/2 preface);
/// bodies are timed by the handler.
///
/// Connections are accepted and served on a runtime of their own (one
/// thread, `meshgate-http`); GraphQL operations run on the caller's runtime
/// ([`crate::app::build_app`]'s), so a crowd of heavy queries cannot delay accepting,
/// `/healthz`, or the refusals that shed load.
pub async fn run(
    listener: TcpListener,
    app: Router,
    server: &ServerSection,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let server = *server;
    let listener = listener.into_std()?;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    // Connections are served here…
    let http = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("meshgate-http")
        .enable_all()
        .build()?;
    // …and accepted on a thread that does nothing else, so the listen
    // queue is drained however busy the connections are.
    std::thread::Builder::new()
        .name("meshgate-accept".into())
        .spawn(move || {
            let connections = http.handle().clone();
            let served = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .and_then(|runtime| {
                    runtime.block_on(async move {
                        let listener = TcpListener::from_std(listener)?;
                        serve_connections(listener, app, &server, shutdown, connections).await
                    })
                });
            http.shutdown_background();
            let _ = done_tx.send(served);
        })?;
    done_rx
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("the HTTP thread stopped")))
}

async fn serve_connections(
    listener: TcpListener,
    app: Router,
    server: &ServerSection,
    shutdown: impl Future<Output = ()> + Send + 'static,
    connections: tokio::runtime::Handle,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt as _;

    let permits = Arc::new(tokio::sync::Semaphore::new(server.max_connections.max(1)));
    let per_address = Arc::new(PerAddress::default());
    let header_timeout = Duration::from_millis(server.header_timeout_ms.max(1));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => permit,
            () = &mut shutdown => break,
        };
        let Ok(permit) = permit else { break };
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(address_slot) = PerAddress::open(
            &per_address,
            remote.ip(),
            server.max_connections_per_address,
        ) else {
            METRICS.connection_refused();
            drop(stream);
            continue;
        };
        let activity = Arc::new(Activity::new());
        let (started, finished) = (Arc::clone(&activity), Arc::clone(&activity));
        let service = app
            .clone()
            .map_request(
                move |mut request: axum::http::Request<hyper::body::Incoming>| {
                    started.begin();
                    request.extensions_mut().insert(ConnectInfo(remote));
                    request.map(Body::new)
                },
            )
            .map_response(move |response: Response| {
                let done = Busy(Arc::clone(&finished));
                response.map(|body| Body::new(UntilDropped { body, _held: done }))
            });
        let mut stop = stop_rx.clone();
        connections.spawn(async move {
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let connection = builder.serve_connection_with_upgrades(
                TokioIo::new(stream),
                TowerToHyperService::new(service),
            );
            let mut connection = std::pin::pin!(connection);
            loop {
                // Quiet: close when the head is late. Busy: look again later.
                let wake = if activity.idle() {
                    activity.quiet_until(header_timeout)
                } else {
                    Instant::now() + header_timeout
                };
                tokio::select! {
                    _ = connection.as_mut() => break,
                    changed = stop.changed() => {
                        connection.as_mut().graceful_shutdown();
                        if changed.is_err() {
                            let _ = connection.as_mut().await;
                            break;
                        }
                    }
                    () = tokio::time::sleep_until(wake) => {
                        if activity.idle() && activity.quiet_until(header_timeout) <= Instant::now() {
                            METRICS.connection_refused();
                            break;
                        }
                    }
                }
            }
            drop(address_slot);
            drop(permit);
        });
    }
    // Drain: every connection finishes its request in flight, then closes.
    let _ = stop_tx.send(true);
    let all = server.max_connections.max(1) as u32;
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, permits.acquire_many(all)).await;
    if drained.is_err() {
        tracing::warn!("connections still open after the drain timeout; closing");
    }
    Ok(())
}

/// Open connections per client address.
#[derive(Debug, Default)]
struct PerAddress(std::sync::Mutex<HashMap<std::net::IpAddr, usize>>);

/// One open connection of an address; given back when dropped.
struct AddressSlot {
    table: Arc<PerAddress>,
    address: std::net::IpAddr,
}

impl PerAddress {
    fn open(
        table: &Arc<PerAddress>,
        address: std::net::IpAddr,
        most: usize,
    ) -> Option<AddressSlot> {
        let mut open = table
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = open.entry(address).or_default();
        if *count >= most.max(1) {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            table: Arc::clone(table),
            address,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self
            .table
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

/// What one connection is doing: requests in progress (from a complete
/// head until the response body is dropped) and when it last went quiet.
#[derive(Debug)]
struct Activity {
    busy: std::sync::atomic::AtomicUsize,
    quiet_since: std::sync::Mutex<Instant>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            busy: std::sync::atomic::AtomicUsize::new(0),
            quiet_since: std::sync::Mutex::new(Instant::now()),
        }
    }

    fn begin(&self) {
        self.busy.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn idle(&self) -> bool {
        self.busy.load(std::sync::atomic::Ordering::SeqCst) == 0
    }

    /// When the connection is to be closed if it stays quiet.
    fn quiet_until(&self, timeout: Duration) -> Instant {
        *self
            .quiet_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            + timeout
    }
}

/// Marks a request finished when its response body is dropped (sent, or
/// abandoned).
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        *self
            .0
            .quiet_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
        self.0
            .busy
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A response body that holds `_held` until it is dropped (sent, or
/// abandoned).
pub(crate) struct UntilDropped<T> {
    pub(crate) body: Body,
    pub(crate) _held: T,
}

impl<T: Unpin> axum::body::HttpBody for UntilDropped<T> {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
