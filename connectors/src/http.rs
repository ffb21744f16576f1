//! What every HTTP connector shares: sending one request and reading its
//! whole body, transport retries, throttling, and safe error descriptions.

use std::time::Duration;

use reqwest::StatusCode;

use crate::ConnectorError;
use crate::sigv4::{self, AwsCredentials, Scope};

/// How often one idempotent request is tried when the transport fails.
pub(crate) const TRANSPORT_ATTEMPTS: u32 = 3;
/// How often a throttled (429) request is tried.
pub(crate) const THROTTLED_ATTEMPTS: u32 = 4;
/// The longest `Retry-After` waited for; longer ones end the search (the
/// partner's deadline would pass anyway).
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

/// One answer: status, `Retry-After` (seconds form), `Content-Encoding`
/// and the whole body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: StatusCode,
    pub retry_after: Option<Duration>,
    pub content_encoding: Option<String>,
    pub body: bytes::Bytes,
}

/// The largest response body read from a partner; a larger one is refused
/// (`PARTNER_RESPONSE_TOO_LARGE`) as soon as it is announced or read that
/// far, so memory stays bounded whatever a partner sends.
pub const MAX_RESPONSE_BYTES: usize = 32 << 20;

/// Why a response could not be had.
#[derive(Debug)]
pub(crate) enum FetchError {
    Transport(reqwest::Error),
    TooLarge,
}

/// Sends one request and reads its whole body, up to [`MAX_RESPONSE_BYTES`].
pub(crate) async fn fetch(request: reqwest::RequestBuilder) -> Result<Answer, FetchError> {
    let mut response = request.send().await.map_err(FetchError::Transport)?;
    let status = response.status();
    let header = |name| {
        response
            .headers()
            .get(name)
            .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
            .map(|v| v.trim().to_owned())
    };
    let retry_after = header(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs);
    let content_encoding = header(reqwest::header::CONTENT_ENCODING);
    if response
        .content_length()
        .is_some_and(|length| length > MAX_RESPONSE_BYTES as u64)
    {
        return Err(FetchError::TooLarge);
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(FetchError::Transport)? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(FetchError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Answer {
        status,
        retry_after,
        content_encoding,
        body: body.freeze(),
    })
}

/// Sends a request made by `request` (called once per attempt, so that
/// signatures carry the attempt's time), retrying transport failures that
/// are not timeouts up to [`TRANSPORT_ATTEMPTS`] times. Only for requests
/// that change nothing upstream. Timeouts are not retried: the deadline is
/// the caller's.
pub(crate) async fn send_idempotent(
    request: impl Fn() -> reqwest::RequestBuilder,
) -> Result<Answer, ConnectorError> {
    let mut attempt = 1;
    loop {
        match fetch(request()).await {
            Ok(answer) => return Ok(answer),
            Err(FetchError::TooLarge) => {
                tracing::warn!(
                    limit_bytes = MAX_RESPONSE_BYTES,
                    "a partner's response is larger than meshgate reads"
                );
                return Err(ConnectorError::ResponseTooLarge);
            }
            Err(FetchError::Transport(error))
                if !error.is_timeout() && attempt < TRANSPORT_ATTEMPTS =>
            {
                tracing::debug!(
                    kind = transport_kind(&error),
                    attempt,
                    "retrying a request to a partner"
                );
                attempt += 1;
            }
            Err(FetchError::Transport(error)) => {
                return Err(ConnectorError::Unreachable(transport_kind(&error)));
            }
        }
    }
}

/// How long to wait before trying a throttled request again, if it should
/// be: the `Retry-After` asked for, else exponential backoff from 200 ms
/// with jitter;
/// `None` once [`THROTTLED_ATTEMPTS`] are used or the wait is too long.
pub(crate) fn throttle_wait(answer: &Answer, throttled_so_far: u32) -> Option<Duration> {
    if answer.status != StatusCode::TOO_MANY_REQUESTS || throttled_so_far + 1 >= THROTTLED_ATTEMPTS
    {
        return None;
    }
    // Without a `Retry-After`: exponential backoff with jitter (half to
    // all of it), so that callers throttled together do not return together.
    let wait = answer.retry_after.unwrap_or_else(|| {
        let base = 200_u64 << throttled_so_far;
        Duration::from_millis(rand::Rng::gen_range(
            &mut rand::thread_rng(),
            base / 2..=base,
        ))
    });
    (wait <= MAX_RETRY_AFTER).then_some(wait)
}

/// The error for a status that is not success, if it is not.
pub(crate) fn status_error(status: StatusCode) -> Option<ConnectorError> {
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            Some(ConnectorError::Unauthorized(status.as_u16()))
        }
        StatusCode::TOO_MANY_REQUESTS => Some(ConnectorError::Throttled),
        status if !status.is_success() => Some(ConnectorError::UpstreamStatus(status.as_u16())),
        _ => None,
    }
}

/// Signs `request` with SigV4 for `service` in `region`, now.
pub(crate) fn sigv4_signed(
    request: reqwest::RequestBuilder,
    method: &str,
    url: &reqwest::Url,
    body: &[u8],
    credentials: &AwsCredentials,
    region: &str,
    service: &str,
) -> reqwest::RequestBuilder {
    sigv4::sign(
        method,
        url,
        &[],
        body,
        credentials,
        Scope {
            region,
            service,
            time: time::OffsetDateTime::now_utc(),
        },
    )
    .into_iter()
    .fold(request, |request, (name, value)| {
        request.header(name, value)
    })
}

/// A transport failure, described without the URL (it carries query values).
pub(crate) fn transport_kind(error: &reqwest::Error) -> &'static str {
    if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else if error.is_body() || error.is_decode() {
        "response interrupted"
    } else {
        "request failed"
    }
}
