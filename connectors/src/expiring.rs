//! One cache for credentials that expire (access tokens, temporary AWS
//! credentials): kept until shortly before they expire, then fetched again,
//! one fetch at a time.

use std::future::Future;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// Credentials are fetched again when less than this is left (or a tenth of
/// their lifetime, if that is shorter).
pub(crate) const REFRESH_BEFORE: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Held<T> {
    value: T,
    /// `None`: never expires.
    refresh_at: Option<Instant>,
}

/// The current value of something that expires.
#[derive(Debug)]
pub(crate) struct Expiring<T> {
    current: Mutex<Option<Held<T>>>,
}

impl<T: Clone> Expiring<T> {
    pub(crate) fn new() -> Expiring<T> {
        Expiring {
            current: Mutex::new(None),
        }
    }

    /// The held value while it has time left, otherwise what `fetch` gives:
    /// a value and how long it lives (`None`: forever). Concurrent callers
    /// wait for one fetch.
    pub(crate) async fn get<E, F, Fut>(&self, fetch: F) -> Result<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(T, Option<Duration>), E>>,
    {
        let mut current = self.current.lock().await;
        if let Some(held) = current.as_ref()
            && held.refresh_at.is_none_or(|at| Instant::now() < at)
        {
            return Ok(held.value.clone());
        }
        let (value, lifetime) = fetch().await?;
        let refresh_at = lifetime.map(|left| {
            let margin = REFRESH_BEFORE.min(left / 10);
            Instant::now() + left.saturating_sub(margin)
        });
        *current = Some(Held {
            value: value.clone(),
            refresh_at,
        });
        Ok(value)
    }

    /// Forgets the held value if `stale` says it is the one that failed, so
    /// the next call fetches anew. A value fetched meanwhile is kept.
    pub(crate) async fn forget_if(&self, stale: impl Fn(&T) -> bool) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|held| stale(&held.value)) {
            *current = None;
        }
    }
}
