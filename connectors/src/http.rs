//! What every HTTP connector shares: sending one request and reading its
//! whole body, transport retries, throttling, and safe error descriptions.

use std::sync::atomic::{AtomicU32, Ordering};
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

/// How many retries one partner may be sent, shared by all its requests
/// (the retry budget of Finagle and Envoy): each request puts a fifth of a
/// retry into the budget, each retry (after a transport failure or a 429)
/// takes a whole one out, and the budget holds at most ten. Retries stay
/// within 20 % of requests plus a reserve, so a partner failing for everyone
/// gets each request about once instead of [`TRANSPORT_ATTEMPTS`] or
/// [`THROTTLED_ATTEMPTS`] times, while occasional failures are retried.
#[derive(Debug)]
pub struct RetryBudget {
    /// Thousandths of a retry.
    milli_retries: AtomicU32,
}

impl RetryBudget {
    const MAX: u32 = 10_000;
    const RETRY: u32 = 1_000;
    const PER_REQUEST: u32 = 200;

    /// A new request (not a retry) is being sent.
    pub fn request(&self) {
        let _ = self
            .milli_retries
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |balance| {
                Some((balance + Self::PER_REQUEST).min(Self::MAX))
            });
    }

    /// Takes one retry out of the budget, if it holds one.
    pub fn retry(&self) -> bool {
        self.milli_retries
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |balance| {
                balance.checked_sub(Self::RETRY)
            })
            .is_ok()
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            milli_retries: AtomicU32::new(Self::MAX),
        }
    }
}

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
/// are not timeouts up to [`TRANSPORT_ATTEMPTS`] times while `budget`
/// allows. Only for requests that change nothing upstream. Timeouts are not
/// retried: the deadline is the caller's.
pub(crate) async fn send_idempotent(
    budget: &RetryBudget,
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
                if !error.is_timeout() && attempt < TRANSPORT_ATTEMPTS && budget.retry() =>
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
/// be — `429`, or `503` ("busy, try again later": how Azure's DICOM
/// service throttles, and what RFC 9110 says 503 means): the `Retry-After`
/// asked for, else exponential backoff from 200 ms with jitter;
/// `None` once [`THROTTLED_ATTEMPTS`] are used, the wait is too long or
/// `budget` allows no retry.
pub(crate) fn throttle_wait(
    answer: &Answer,
    throttled_so_far: u32,
    budget: &RetryBudget,
) -> Option<Duration> {
    let busy = matches!(
        answer.status,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
    );
    if !busy || throttled_so_far + 1 >= THROTTLED_ATTEMPTS {
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
    (wait <= MAX_RETRY_AFTER && budget.retry()).then_some(wait)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn throttled() -> Answer {
        Answer {
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after: Some(Duration::from_millis(10)),
            content_encoding: None,
            body: bytes::Bytes::new(),
        }
    }

    #[test]
    fn retries_stay_within_a_fifth_of_requests_beyond_a_reserve_of_ten() {
        let budget = RetryBudget::default();
        // A partner throttling everything: the reserve goes first…
        for _ in 0..10 {
            assert!(throttle_wait(&throttled(), 0, &budget).is_some());
        }
        assert_eq!(throttle_wait(&throttled(), 0, &budget), None);
        // …then one retry per five requests.
        for _ in 0..4 {
            budget.request();
            assert!(!budget.retry());
        }
        budget.request();
        assert!(budget.retry());
        // Requests refill the reserve, but never beyond ten retries.
        for _ in 0..1_000 {
            budget.request();
        }
        assert_eq!((0..20).filter(|_| budget.retry()).count(), 10);
    }
}
