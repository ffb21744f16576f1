//! The HTTP face of the gateway: `POST /graphql`, GraphiQL on
//! `GET /graphql`, `/healthz`. Testable in memory (`build_app` → `Router`)
//! and on a real socket (`run(listener, app, shutdown)`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_graphql::http::GraphiQLSource;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::handler::Handler as _;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use meshgate_connectors::ConnectorError;
use meshgate_schema::principal::ActiveSnapshot;
use rand::Rng;
use serde_json::json;

use tracing::Instrument as _;

use crate::admission::{Admission, FailureTally, Tallied, Ticket};
use crate::audit::view::AuditFilter;
use crate::audit::{AuditError, AuditLog, FatalHandler};
use crate::auth::AuthError;
use crate::config::LoadedConfig;
use crate::config::{ServerProfile, ServerSection};
use crate::graphql::{MeshgateSchema, audit_selection, schema};
use crate::limits;
use crate::metrics::METRICS;
use crate::registry::{Registry, Snapshot};
use crate::request::{AuditRecord, RequestContext};
use crate::server::UntilDropped;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

#[derive(Clone)]
struct AppState {
    schema: MeshgateSchema,
    /// The snapshot each request runs on.
    registry: Arc<Registry>,
    audit: Arc<AuditLog>,
    server: ServerSection,
    /// One permit per GraphQL request being handled.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Requests in flight and started, per client address and per principal.
    per_address: Arc<Admission>,
    per_principal: Arc<Admission>,
    auth_failures: Arc<FailureTally>,
    metrics_token: Option<meshgate_connectors::Secret>,
    /// Where GraphQL operations run: the runtime the app was built on, not
    /// the one serving connections, so that heavy queries never delay an
    /// accept, a health check or a refusal.
    work: tokio::runtime::Handle,
    fatal: FatalHandler,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("partner '{partner}': {source}")]
    Connector {
        partner: String,
        source: ConnectorError,
    },
    #[error("cannot build the HTTP client for token keys: {0}")]
    Auth(#[from] reqwest::Error),
    #[error("{0}")]
    Audit(#[from] AuditError),
}

/// Exit status after a storage failure under the audit log.
pub const EXIT_AUDIT_STORAGE: i32 = 70;

/// Everything a running gateway is made of.
#[derive(Debug, Clone)]
pub struct Gateway {
    /// The partners, policies and issuers in force, and how to reload them.
    pub registry: Arc<Registry>,
    pub server: ServerSection,
    /// Failed authentications counted and not yet in the audit log; see
    /// [`record_failed_authentications`].
    pub auth_failures: Arc<FailureTally>,
    /// The bearer token `/metrics` asks for on the API listener; without
    /// one it is not served there.
    pub metrics_token: Option<meshgate_connectors::Secret>,
}

impl Gateway {
    /// The audit log (the same in every snapshot).
    pub fn audit(&self) -> Arc<AuditLog> {
        Arc::clone(&self.registry.current().services.audit)
    }
}

/// Failed authentications from one client address within this are
/// recorded together.
pub const AUTH_FAILURE_INTERVAL: Duration = Duration::from_secs(10);

/// Opens the audit log, builds and probes every partner, loads the
/// policies and sets up token verification.
pub async fn start(loaded: &LoadedConfig) -> Result<Gateway, StartError> {
    let audit = AuditLog::open(&loaded.audit).await?;
    Ok(Gateway {
        registry: Arc::new(Registry::start(loaded, audit).await?),
        server: loaded.config.server,
        auth_failures: Arc::new(FailureTally::new(AUTH_FAILURE_INTERVAL)),
        metrics_token: loaded.metrics_token.clone(),
    })
}

/// Writes the audit records of failed authentications counted and not yet
/// recorded: those whose interval has ended, or (`all`, at shutdown) every
/// one. One record per client address, standing for its count.
pub async fn record_failed_authentications(
    tally: &FailureTally,
    audit: &Arc<AuditLog>,
    fatal: &FatalHandler,
    all: bool,
) {
    for (source, code, count) in tally.due(all) {
        let request_id = format!("{:016x}", rand::thread_rng().r#gen::<u64>());
        let client = source
            .parse::<std::net::IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, 0));
        let mut record =
            RequestContext::new(request_id, client).audit_record(None, vec![code.to_owned()]);
        record.error_count = count;
        if let Err(error) = audit.append(&record, fatal).await {
            tracing::error!(%error, count, "failed authentications could not be recorded");
        }
    }
}

/// Stops the process when the audit log's storage fails (see
/// [`crate::audit`]).
pub fn exit_on_audit_storage_failure() -> FatalHandler {
    Arc::new(|error: &AuditError| {
        tracing::error!(%error, "the audit log's storage failed; stopping");
        std::process::exit(EXIT_AUDIT_STORAGE);
    })
}

/// The gateway's routes. A storage failure under the audit log stops the
/// process (see [`crate::audit`]).
pub fn build_app(gateway: Gateway) -> Router {
    let fatal = exit_on_audit_storage_failure();
    // Failed authentications counted in an interval are recorded when it
    // ends; the task stops with the app.
    let (tally, audit) = (
        Arc::downgrade(&gateway.auth_failures),
        Arc::downgrade(&gateway.audit()),
    );
    let flush_fatal = Arc::clone(&fatal);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(AUTH_FAILURE_INTERVAL / 2);
        loop {
            tick.tick().await;
            let (Some(tally), Some(audit)) = (tally.upgrade(), audit.upgrade()) else {
                break;
            };
            record_failed_authentications(&tally, &audit, &flush_fatal, false).await;
        }
    });
    let state = AppState {
        schema: schema(gateway.server.profile),
        audit: gateway.audit(),
        in_flight: Arc::new(tokio::sync::Semaphore::new(
            gateway.server.max_in_flight.max(1),
        )),
        auth_failures: gateway.auth_failures,
        metrics_token: gateway.metrics_token,
        work: tokio::runtime::Handle::current(),
        per_address: Arc::new(Admission::new(gateway.server.per_address)),
        per_principal: Arc::new(Admission::new(gateway.server.per_principal)),
        server: gateway.server,
        registry: gateway.registry,
        fatal,
    };
    Router::new()
        .route(
            "/graphql",
            get(graphiql).post(graphql.layer(axum::middleware::from_fn(observed))),
        )
        .route("/audit/checkpoint", get(latest_checkpoint))
        .route("/audit/AuditEvent.ndjson", get(export_audit_events))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// The router of a listener of its own for `/metrics` (`[metrics] listen`):
/// nothing else, and no token.
pub fn metrics_router(registry: Arc<Registry>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let registry = Arc::clone(&registry);
            async move { render_metrics(&registry) }
        }),
    )
}

/// Audit entries read from the store at a time for an export.
const EXPORT_BATCH: i64 = 100;

/// An audit export in progress.
struct Export {
    audit: Arc<AuditLog>,
    selection: crate::audit::Selection,
    /// The batch read before the answer started.
    rows: Option<Vec<crate::audit::StoredEntry>>,
    /// Entries asked for in the last batch…
    asked: i64,
    /// …and still to be asked for.
    left: i64,
}

/// Errors listed in one answer; more are counted in one last error.
const MAX_ERRORS: usize = 20;

/// `GET /graphql`: GraphiQL in the development profile. Operations are
/// never executed over GET (a link or an image tag must not run a query,
/// let alone a mutation): `405 METHOD_NOT_ALLOWED`.
async fn graphiql(State(state): State<AppState>, uri: axum::http::Uri) -> Response {
    let asks_operation = uri
        .query()
        .is_some_and(|query| query.split('&').any(|pair| pair.starts_with("query=")));
    if asks_operation || state.server.profile == ServerProfile::Production {
        return error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "",
            "METHOD_NOT_ALLOWED",
            "GraphQL operations are sent with POST",
            Some((header::ALLOW, "POST")),
        );
    }
    Html(
        GraphiQLSource::build()
            .endpoint("/graphql")
            .title("meshgate")
            .finish(),
    )
    .into_response()
}

/// Who is calling: the client's address and the `Authorization` header.
fn caller(parts: &axum::http::request::Parts) -> (Option<SocketAddr>, Option<String>) {
    let client = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let authorization = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    (client, authorization)
}

/// The request's context with its principal; without a valid token, the
/// audited 401 (or 503 when the issuer's keys cannot be fetched) to send
/// instead — before anything else happens.
async fn authenticate(
    state: &AppState,
    snapshot: &Snapshot,
    (client, authorization): (Option<SocketAddr>, Option<String>),
) -> Result<RequestContext, Response> {
    let request_id = format!("{:016x}", rand::thread_rng().r#gen::<u64>());
    let mut context = RequestContext::new(request_id, client);
    context.snapshot = Some(snapshot.hash().to_owned());
    match snapshot
        .authenticator
        .authenticate(authorization.as_deref())
        .await
    {
        Ok(principal) => {
            context.principal = Some(principal);
            Ok(context)
        }
        Err(error) => Err(unauthenticated(state, &context, &error).await),
    }
}

/// Every `POST /graphql`, admitted or not: its span (its id and status
/// only: no operation text, no caller, no filter values) and its metrics.
async fn observed(request: Request, next: axum::middleware::Next) -> Response {
    let started = std::time::Instant::now();
    let span = tracing::info_span!(
        "graphql request",
        otel.kind = "server",
        request_id = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
    );
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    if let Some(id) = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
    {
        span.record("request_id", id);
    }
    span.record("http.response.status_code", status);
    METRICS.request(status, started.elapsed());
    response
}

/// `429 RATE_LIMITED` with how long to wait; counted, not audited (no work
/// was done and nothing was disclosed, and auditing each would let a flood
/// grow the log).
fn rate_limited(wait: Duration) -> Response {
    METRICS.rate_limited();
    let seconds = wait.as_secs().max(1).to_string();
    error_response(
        StatusCode::TOO_MANY_REQUESTS,
        "",
        "RATE_LIMITED",
        "too many requests from this client; try again after Retry-After seconds",
        Some((header::RETRY_AFTER, &seconds)),
    )
}

/// A request's shares of its client address's and its principal's limits,
/// held until it is answered.
struct Tickets {
    _address: Ticket,
    _principal: Ticket,
}

/// Admits a request: its client address's share (before the token is
/// checked), its token, then its principal's share; or the answer to send
/// instead. No other work is done for a request before this.
async fn admit(
    state: &AppState,
    snapshot: &Snapshot,
    (client, authorization): (Option<SocketAddr>, Option<String>),
) -> Result<(RequestContext, Tickets), Response> {
    let address = client.map_or_else(|| "unknown".to_owned(), |c| c.ip().to_string());
    let address_ticket = state.per_address.admit(&address).map_err(rate_limited)?;
    let mut context = authenticate(state, snapshot, (client, authorization)).await?;
    context.limits = state.server.limits;
    let principal_key = context
        .principal
        .as_ref()
        .map(meshgate_schema::Principal::key)
        .unwrap_or_default();
    let principal_ticket = state
        .per_principal
        .admit(&principal_key)
        .map_err(rate_limited)?;
    Ok((
        context,
        Tickets {
            _address: address_ticket,
            _principal: principal_ticket,
        },
    ))
}

/// A request admitted by [`admit`], on the snapshot in force when it
/// arrived (which it keeps to the end, whatever reloads happen meanwhile):
/// its context with the verified caller, and its shares of the limits,
/// held until it is answered. Rejected with the answer to send instead:
/// the audited `401`/`503`, or `429`.
struct Admitted {
    snapshot: Arc<Snapshot>,
    context: RequestContext,
    tickets: Tickets,
}

impl axum::extract::FromRequestParts<AppState> for Admitted {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Admitted, Response> {
        let snapshot = state.registry.current();
        let (context, tickets) = admit(state, &snapshot, caller(parts)).await?;
        Ok(Admitted {
            snapshot,
            context,
            tickets,
        })
    }
}

/// Why an admitted request is refused before its operation runs. Audited
/// like any other request, in one place ([`Refusal::audited`]).
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            message: message.into(),
        }
    }

    /// The refusal's audit record, then its answer (or `503` when the
    /// record cannot be written).
    async fn audited(self, state: &AppState, context: &RequestContext) -> Response {
        let record = context.audit_record(None, vec![self.code.to_owned()]);
        if commit(state, &record).await.is_err() {
            return audit_unavailable(&context.request_id);
        }
        error_response(
            self.status,
            &context.request_id,
            self.code,
            &self.message,
            None,
        )
    }
}

/// `503 OVERLOADED`, at once: the gateway's `max_in_flight` permits are
/// all taken.
fn overloaded(request_id: &str) -> Response {
    METRICS.shed();
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        request_id,
        "OVERLOADED",
        "the gateway is at capacity; try again shortly",
        Some((header::RETRY_AFTER, "1")),
    )
}

/// `POST /graphql`.
async fn graphql(State(state): State<AppState>, admitted: Admitted, request: Request) -> Response {
    let context = admitted.context.clone();
    match answer_graphql(&state, admitted, request).await {
        Ok(response) => response,
        Err(refusal) => refusal.audited(&state, &context).await,
    }
}

async fn answer_graphql(
    state: &AppState,
    admitted: Admitted,
    request: Request,
) -> Result<Response, Refusal> {
    let Admitted {
        snapshot,
        context,
        tickets: _tickets,
    } = admitted;
    let request_id = context.request_id.clone();

    let body_timeout = Duration::from_millis(state.server.body_timeout_ms);
    let body = match tokio::time::timeout(
        body_timeout,
        axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES),
    )
    .await
    {
        Ok(Ok(body)) => body,
        Err(_) => {
            return Err(Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                "REQUEST_TIMEOUT",
                "the request body did not arrive in time",
            ));
        }
        Ok(Err(_)) => {
            return Err(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "REQUEST_TOO_LARGE",
                "the request body is too large",
            ));
        }
    };
    // An in-flight permit only once the body is here: slow uploads hold
    // their own source's share, not the gateway's capacity. Past the
    // limit, shed at once.
    let Ok(_in_flight) = Arc::clone(&state.in_flight).try_acquire_owned() else {
        return Ok(overloaded(&request_id));
    };
    // Parsing, execution and the answer's JSON on the work runtime: this
    // one only admits, reads and writes.
    let processing = process_graphql(state.clone(), snapshot, context, body)
        .instrument(tracing::Span::current());
    match state.work.spawn(processing).await {
        Ok(answer) => answer,
        Err(_) => {
            tracing::error!("a GraphQL request panicked");
            Ok(error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &request_id,
                "INTERNAL_SERVER_ERROR",
                "internal error",
                None,
            ))
        }
    }
}

/// A GraphQL request whose body has arrived: parsed, measured, executed
/// and audited.
async fn process_graphql(
    state: AppState,
    snapshot: Arc<Snapshot>,
    context: RequestContext,
    body: axum::body::Bytes,
) -> Result<Response, Refusal> {
    let request_id = context.request_id.clone();
    let mut gql_request: async_graphql::Request = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(_) => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                "the body must be one JSON object with a query string, optional variables and operationName",
            ));
        }
    };
    // Parsed once here (and kept in the request for execution) so that a
    // syntax error gets its own code; then measured, fully expanded,
    // before anything runs.
    // Directives are counted on the text first: parsing a document of
    // thousands of them costs more memory than answering it.
    let scanned = limits::scan(&gql_request.query, state.server.limits);
    let checked = match scanned.map(|()| gql_request.parsed_query()) {
        Err(error) => Err((error.code(), error.to_string())),
        Ok(Ok(document)) => limits::check(
            document,
            state.server.limits,
            state.server.profile == ServerProfile::Development,
        )
        .map_err(|error| (error.code(), error.to_string())),
        Ok(Err(error)) => Err((
            "GRAPHQL_PARSE_FAILED",
            format!("the query is not valid GraphQL: {error}"),
        )),
    };
    if let Err((code, message)) = checked {
        return Err(Refusal::new(StatusCode::BAD_REQUEST, code, message));
    }
    // No partner is asked while the audit log cannot be written.
    if state.audit.ready().await.is_err() {
        return Ok(audit_unavailable(&request_id));
    }
    let operation = gql_request.operation_name.clone();
    let mut response = state
        .schema
        .execute(
            gql_request
                .data(context.clone())
                .data(snapshot.services.clone())
                .data(ActiveSnapshot(snapshot.hash().to_owned())),
        )
        .await;

    // Errors async-graphql raised itself (validation) have no code yet;
    // every error a resolver raises has one.
    let mut validation_failed = false;
    for error in &mut response.errors {
        let has_code = error
            .extensions
            .as_ref()
            .is_some_and(|e| e.get("code").is_some());
        if !has_code {
            let validation = response.data == async_graphql::Value::Null;
            validation_failed |= validation;
            let code = if validation {
                "GRAPHQL_VALIDATION_FAILED"
            } else {
                "INTERNAL_SERVER_ERROR"
            };
            error
                .extensions
                .get_or_insert_with(Default::default)
                .set("code", code);
        }
    }
    let error_codes: Vec<String> = response
        .errors
        .iter()
        .filter_map(|e| {
            e.extensions
                .as_ref()
                .and_then(|x| x.get("code"))
                .map(|c| c.to_string().trim_matches('"').to_owned())
        })
        .collect();
    // The first errors, then how many more: a document cannot make the
    // answer grow with its error count.
    if response.errors.len() > MAX_ERRORS {
        let more = response.errors.len() - MAX_ERRORS;
        response.errors.truncate(MAX_ERRORS);
        let mut error = async_graphql::ServerError::new(format!("and {more} more errors"), None);
        let mut extensions = async_graphql::ErrorExtensionValues::default();
        extensions.set("code", "MORE_ERRORS");
        extensions.set("count", more as u64);
        error.extensions = Some(extensions);
        response.errors.push(error);
    }
    let record = context.audit_record(operation, error_codes);
    if commit(&state, &record).await.is_err() {
        // Fail closed: no data leaves without its audit record.
        return Ok(audit_unavailable(&request_id));
    }
    let status = if validation_failed {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    let held = context.release();
    Ok(json_response(
        status,
        &request_id,
        serde_json::to_value(&response).unwrap_or_default(),
    )
    // The studies' permits stay taken until the answer has been sent.
    .map(|body| Body::new(UntilDropped { body, _held: held })))
}

/// Commits one audit record.
async fn commit(state: &AppState, record: &AuditRecord) -> Result<i64, AuditError> {
    state.audit.append(record, &state.fatal).await
}

/// 401 with a `WWW-Authenticate` challenge (RFC 6750), or 503 when the
/// issuer's keys cannot be fetched.
async fn unauthenticated(
    state: &AppState,
    context: &RequestContext,
    error: &AuthError,
) -> Response {
    let (status, challenge) = match error {
        AuthError::KeysUnavailable => (StatusCode::SERVICE_UNAVAILABLE, None),
        AuthError::Missing => (
            StatusCode::UNAUTHORIZED,
            Some(r#"Bearer realm="meshgate""#.to_owned()),
        ),
        other => (
            StatusCode::UNAUTHORIZED,
            Some(format!(
                r#"Bearer realm="meshgate", error="invalid_token", error_description="{other}""#
            )),
        ),
    };
    // One record per client address and interval, standing for every
    // failure since the last (see `FailureTally`).
    let source = context
        .client
        .map_or_else(|| "unknown".to_owned(), |c| c.ip().to_string());
    let mut response = match state.auth_failures.note(&source, error.code()) {
        Tallied::Record(count) => {
            let mut record = context.audit_record(None, vec![error.code().to_owned()]);
            record.error_count = count;
            if commit(state, &record).await.is_err() {
                audit_unavailable(&context.request_id)
            } else {
                error_response(
                    status,
                    &context.request_id,
                    error.code(),
                    &error.to_string(),
                    None,
                )
            }
        }
        Tallied::Counted => error_response(
            status,
            &context.request_id,
            error.code(),
            &error.to_string(),
            None,
        ),
    };
    if response.status() == status {
        let headers = response.headers_mut();
        if let Some(value) = challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
            headers.insert(header::WWW_AUTHENTICATE, value);
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
    }
    response
}

/// The newest signed checkpoint of the audit chain, for anyone to copy: it
/// holds no data, only a sequence number, a hash and a signature.
async fn latest_checkpoint(State(state): State<AppState>) -> Response {
    match state.audit.latest_checkpoint().await {
        Ok(Some(checkpoint)) => {
            let key = state.audit.verifying_key();
            let body = json!({
                "checkpoint": checkpoint,
                "public_key": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, key.as_bytes()),
            });
            json_response(StatusCode::OK, "", body)
        }
        Ok(None) => error_response(
            StatusCode::NOT_FOUND,
            "",
            "NOT_FOUND",
            "no checkpoint has been signed yet",
            None,
        ),
        Err(_) => audit_unavailable(""),
    }
}

/// The audit events the caller may see, as FHIR AuditEvent NDJSON, newest
/// first; filters as query parameters (`subject`, `institution`,
/// `project`, `partner`, `outcome`, `from`, `to`, `before`, `limit`). The
/// export is itself audited.
async fn export_audit_events(
    State(state): State<AppState>,
    Admitted {
        snapshot,
        context,
        tickets,
    }: Admitted,
    axum::extract::Query(params): axum::extract::Query<Vec<(String, String)>>,
) -> Response {
    let request_id = context.request_id.clone();
    let Ok(permit) = Arc::clone(&state.in_flight).try_acquire_owned() else {
        return overloaded(&request_id);
    };
    let Some(principal) = context.principal.clone() else {
        return audit_unavailable(&request_id);
    };
    let param = |name: &str| {
        params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    };
    let limit = param("limit")
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(1000)
        .clamp(1, 10_000);
    let filter = AuditFilter {
        subject: param("subject"),
        institution: param("institution"),
        project: param("project"),
        partner: param("partner"),
        outcome: None,
        from: param("from"),
        to: param("to"),
    };
    let before = param("before").and_then(|v| v.parse().ok());
    let mut selection = audit_selection(&snapshot.services, &principal, filter, before);
    // As stored: `success` or `failure` (anything else matches nothing).
    selection.outcome = param("outcome").map(|o| o.to_lowercase());
    // The first batch before the answer starts: a store that cannot be
    // read is a 503, not a cut-off 200.
    let asked = limit.min(EXPORT_BATCH);
    let first = match state.audit.store().select(&selection, asked).await {
        Ok(rows) => rows,
        Err(_) => return audit_unavailable(&request_id),
    };
    let record = context.audit_record(Some("auditExport".to_owned()), Vec::new());
    if commit(&state, &record).await.is_err() {
        return audit_unavailable(&request_id);
    }
    // Streamed a batch at a time from the store (newest first, paging
    // backwards by sequence number): memory holds one batch whatever the
    // limit, and the permit and tickets are held until the last line.
    let export = Export {
        audit: Arc::clone(&state.audit),
        selection,
        rows: Some(first),
        asked,
        left: limit - asked,
    };
    let batches = futures::stream::unfold(export, |mut export| async move {
        let rows = match export.rows.take() {
            Some(rows) => rows,
            None if export.left <= 0 => return None,
            None => {
                export.asked = export.left.min(EXPORT_BATCH);
                export.left -= export.asked;
                match export
                    .audit
                    .store()
                    .select(&export.selection, export.asked)
                    .await
                {
                    Ok(rows) => rows,
                    Err(error) => {
                        // Cut short: the client sees the body fail, not a
                        // complete one.
                        tracing::warn!(%error, "audit export cut short");
                        export.left = 0;
                        return Some((Err(std::io::Error::other("audit store")), export));
                    }
                }
            }
        };
        let last = rows.last()?.seq;
        if (rows.len() as i64) < export.asked {
            export.left = 0; // the store has no more
        }
        export.selection.before = Some(last);
        let mut text = String::new();
        for row in &rows {
            text.push_str(&crate::audit::audit_event(row).to_string());
            text.push('\n');
        }
        Some((Ok(axum::body::Bytes::from(text)), export))
    });
    // Read and formatted on the work runtime, a batch or two ahead of the
    // client; this one only writes. The permit and tickets are held until
    // the body is done.
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    state.work.spawn(async move {
        let mut batches = std::pin::pin!(batches);
        while let Some(batch) = futures::StreamExt::next(&mut batches).await {
            if sender.send(batch).await.is_err() {
                break; // the client went away
            }
        }
    });
    let body = futures::stream::unfold(
        (receiver, (permit, tickets)),
        |(mut receiver, held)| async move {
            let batch = receiver.recv().await?;
            Some((batch, (receiver, held)))
        },
    );
    let mut response = (StatusCode::OK, Body::from_stream(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+ndjson"),
    );
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        headers.insert("x-request-id", value);
    }
    response
}

/// Prometheus metrics (text exposition format). No patient data, tokens or
/// credentials: labels are status codes and partner ids.
/// On the API listener only with `[metrics] token`, for that bearer
/// token; otherwise `404`, as if there were no such path.
async fn metrics(State(state): State<AppState>, request: axum::http::request::Parts) -> Response {
    let Some(token) = &state.metrics_token else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let offered = caller(&request)
        .1
        .and_then(|value| value.strip_prefix("Bearer ").map(str::to_owned))
        .unwrap_or_default();
    if !same_secret(offered.as_bytes(), token.expose().as_bytes()) {
        return (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                r#"Bearer realm="meshgate-metrics""#,
            )],
        )
            .into_response();
    }
    render_metrics(&state.registry)
}

/// Compares in time that depends on the lengths only.
fn same_secret(offered: &[u8], expected: &[u8]) -> bool {
    offered.len() == expected.len()
        && offered
            .iter()
            .zip(expected)
            .fold(0_u8, |differ, (a, b)| differ | (a ^ b))
            == 0
}

fn render_metrics(registry: &Registry) -> Response {
    let snapshot = registry.current();
    let services = &snapshot.services;
    let circuits: Vec<(String, bool)> = services
        .federation
        .partners()
        .iter()
        .map(|p| (p.id.clone(), p.guard.is_open()))
        .collect();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        METRICS.render(
            &circuits,
            services.federation.cache().weighted_bytes(),
            &services.federation.cache().entries_by_partner(),
        ),
    )
        .into_response()
}

/// Ready to serve: the audit log can be written (without it every data
/// request fails closed).
async fn readyz(State(state): State<AppState>) -> Response {
    match state.audit.ready().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "audit log unavailable").into_response(),
    }
}

fn audit_unavailable(request_id: &str) -> Response {
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        request_id,
        "AUDIT_UNAVAILABLE",
        "the audit log cannot be written; try again later",
        Some((header::RETRY_AFTER, "5")),
    )
}

/// A JSON error in the GraphQL shape, with its stable code and, if given,
/// one header (`Retry-After`, `Allow`).
fn error_response(
    status: StatusCode,
    request_id: &str,
    code: &str,
    message: &str,
    extra: Option<(header::HeaderName, &str)>,
) -> Response {
    let mut response = json_response(
        status,
        request_id,
        json!({"errors": [{"message": message, "extensions": {"code": code}}]}),
    );
    if let Some((name, value)) = extra
        && let Ok(value) = HeaderValue::from_str(value)
    {
        response.headers_mut().insert(name, value);
    }
    response
}

fn json_response(status: StatusCode, request_id: &str, body: serde_json::Value) -> Response {
    let mut response = (status, Body::from(body.to_string())).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(value) = HeaderValue::from_str(request_id) {
        headers.insert("x-request-id", value);
    }
    response
}
