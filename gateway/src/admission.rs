//! Per-source admission: how many requests one client address, or one
//! principal, may have in flight at once and start per second (a token
//! bucket), so that one source cannot take every in-flight permit or
//! connection. A refusal names how long to wait (`429` with
//! `Retry-After`) and comes before any work is done for the request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

/// Limits for one kind of source.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Requests in flight at once.
    pub concurrent: u32,
    /// Requests started per second, sustained…
    pub per_second: f64,
    /// …with bursts of up to this many.
    pub burst: u32,
}

impl RateLimit {
    pub const fn new(concurrent: u32, per_second: f64, burst: u32) -> RateLimit {
        RateLimit {
            concurrent,
            per_second,
            burst,
        }
    }
}

#[derive(Debug)]
struct Entry {
    in_flight: u32,
    tokens: f64,
    updated: Instant,
}

/// Sources beyond this many are pruned of idle, full-bucket entries, so the
/// table cannot be grown without bound by many addresses or subjects.
const PRUNE_ABOVE: usize = 10_000;

/// The admission state of every source of one kind.
#[derive(Debug)]
pub struct Admission {
    limit: RateLimit,
    sources: Arc<Mutex<HashMap<String, Entry>>>,
}

/// Leave to handle one request: its source's in-flight count is given back
/// when this is dropped.
#[derive(Debug)]
pub struct Ticket {
    key: String,
    sources: Arc<Mutex<HashMap<String, Entry>>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = sources.get_mut(&self.key) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
        }
    }
}

impl Admission {
    pub fn new(limit: RateLimit) -> Admission {
        Admission {
            limit,
            sources: Arc::default(),
        }
    }

    /// Admits one request from `key`, or says how long to wait.
    pub fn admit(&self, key: &str) -> Result<Ticket, Duration> {
        let limit = self.limit;
        let burst = f64::from(limit.burst.max(1));
        let now = Instant::now();
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if sources.len() > PRUNE_ABOVE {
            sources.retain(|_, e| {
                e.in_flight > 0
                    || e.tokens + now.duration_since(e.updated).as_secs_f64() * limit.per_second
                        < burst
            });
        }
        let entry = sources.entry(key.to_owned()).or_insert(Entry {
            in_flight: 0,
            tokens: burst,
            updated: now,
        });
        let elapsed = now.duration_since(entry.updated).as_secs_f64();
        entry.tokens = (entry.tokens + elapsed * limit.per_second).min(burst);
        entry.updated = now;
        if entry.in_flight >= limit.concurrent.max(1) {
            return Err(Duration::from_secs(1));
        }
        if entry.tokens < 1.0 {
            let wait = if limit.per_second > 0.0 {
                (1.0 - entry.tokens) / limit.per_second
            } else {
                60.0
            };
            return Err(Duration::from_secs_f64(wait.clamp(1.0, 3600.0)));
        }
        entry.tokens -= 1.0;
        entry.in_flight += 1;
        Ok(Ticket {
            key: key.to_owned(),
            sources: Arc::clone(&self.sources),
        })
    }
}

/// Failed authentications per client address, so that a flood of bad
/// tokens writes one audit record per address and interval instead of one
/// per request, and none is unaccounted for: the first failure of an
/// interval is recorded at once and stands for itself and any failures
/// of that address counted and not yet recorded; failures later in the
/// interval are counted, and recorded together when it ends
/// ([`FailureTally::due`]) or with the address's next recorded failure.
#[derive(Debug)]
pub struct FailureTally {
    interval: Duration,
    /// Per client address and error code.
    pending: Mutex<HashMap<(String, &'static str), Tally>>,
}

#[derive(Debug)]
struct Tally {
    opened: Instant,
    counted: usize,
}

/// What to do with one failed authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tallied {
    /// Write its audit record now, standing for this many failures.
    Record(usize),
    /// Counted; it will be in the address's next record.
    Counted,
}

impl FailureTally {
    pub fn new(interval: Duration) -> FailureTally {
        FailureTally {
            interval,
            pending: Mutex::default(),
        }
    }

    pub fn note(&self, source: &str, code: &'static str) -> Tallied {
        let now = Instant::now();
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (source.to_owned(), code);
        match pending.get_mut(&key) {
            Some(tally) if now.duration_since(tally.opened) < self.interval => {
                tally.counted += 1;
                Tallied::Counted
            }
            Some(tally) => {
                let earlier = std::mem::take(&mut tally.counted);
                tally.opened = now;
                Tallied::Record(earlier + 1)
            }
            None => {
                pending.insert(
                    key,
                    Tally {
                        opened: now,
                        counted: 0,
                    },
                );
                Tallied::Record(1)
            }
        }
    }

    /// The (address, error code)s whose interval has ended (every one,
    /// with `all`) and the failures counted for each and not yet recorded;
    /// they are forgotten here, so the caller must record them.
    pub fn due(&self, all: bool) -> Vec<(String, &'static str, usize)> {
        let now = Instant::now();
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let mut due = Vec::new();
        pending.retain(|(source, code), tally| {
            let ended = all || now.duration_since(tally.opened) >= self.interval;
            if ended && tally.counted > 0 {
                due.push((source.clone(), *code, tally.counted));
            }
            !ended
        });
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_source_past_its_burst_waits_for_its_rate_and_others_are_not_affected() {
        let admission = Admission::new(RateLimit::new(100, 20.0, 3));
        let tickets: Vec<Ticket> = (0..3).map(|_| admission.admit("a").unwrap()).collect();
        assert_eq!(admission.admit("a").unwrap_err(), Duration::from_secs(1));
        assert!(
            admission.admit("b").is_ok(),
            "another source has its own bucket"
        );
        drop(tickets);
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(admission.admit("a").is_ok(), "a token back after 50 ms");
    }

    #[tokio::test]
    async fn failed_authentications_are_recorded_once_per_interval_and_none_is_lost() {
        let tally = FailureTally::new(Duration::from_millis(100));
        assert_eq!(tally.note("a", "UNAUTHENTICATED"), Tallied::Record(1));
        for _ in 0..50 {
            assert_eq!(tally.note("a", "UNAUTHENTICATED"), Tallied::Counted);
        }
        assert_eq!(
            tally.note("b", "UNAUTHENTICATED"),
            Tallied::Record(1),
            "each address apart"
        );
        assert!(tally.due(false).is_empty(), "the interval has not ended");
        tokio::time::sleep(Duration::from_millis(120)).await;
        // The next failure after the interval stands for the 50 counted.
        assert_eq!(tally.note("a", "UNAUTHENTICATED"), Tallied::Record(51));
        tally.note("a", "UNAUTHENTICATED");
        tally.note("a", "UNAUTHENTICATED");
        assert_eq!(
            tally.due(true),
            vec![("a".to_owned(), "UNAUTHENTICATED", 2)]
        );
        assert!(tally.due(true).is_empty());
    }

    #[tokio::test]
    async fn a_source_at_its_concurrency_waits_until_one_of_its_requests_ends() {
        let admission = Admission::new(RateLimit::new(2, 1000.0, 1000));
        let first = admission.admit("a").unwrap();
        let _second = admission.admit("a").unwrap();
        assert!(admission.admit("a").is_err());
        drop(first);
        assert!(admission.admit("a").is_ok());
    }
}
