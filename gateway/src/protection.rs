//! Per-partner protection: a limit on concurrent calls and a circuit
//! breaker, so that one slow or failing partner costs the others nothing.
//!
//! The breaker opens after `failures` consecutive failed calls (timeouts,
//! unreachable, server errors: the partner's faults). While open the
//! partner is not called and is reported `CIRCUIT_OPEN`. After `cool_down`
//! one call is let through as a probe (half-open): success closes the
//! breaker, failure opens it again for another cool-down.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How one partner is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProtectionConfig {
    /// Calls to the partner in flight at once; more wait (within the
    /// query's deadline).
    pub max_concurrent_calls: usize,
    /// Consecutive failures that open the breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open before one probe is let through.
    pub breaker_cool_down_ms: u64,
}

impl Default for ProtectionConfig {
    fn default() -> Self {
        ProtectionConfig {
            max_concurrent_calls: 8,
            breaker_failures: 5,
            breaker_cool_down_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// A probe is in flight.
    HalfOpen,
}

/// Why a call was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The breaker is open.
    CircuitOpen,
    /// No call slot freed up before the deadline.
    Busy,
}

/// One partner's guard.
#[derive(Debug)]
pub struct Guard {
    config: ProtectionConfig,
    slots: Arc<Semaphore>,
    state: Mutex<State>,
}

/// Leave to call the partner: holds a call slot until dropped.
#[derive(Debug)]
pub struct Admission {
    _slot: OwnedSemaphorePermit,
}

impl Guard {
    pub fn new(config: ProtectionConfig) -> Guard {
        Guard {
            config,
            slots: Arc::new(Semaphore::new(config.max_concurrent_calls.max(1))),
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    /// Whether the breaker is open now (for status pages and metrics).
    pub fn is_open(&self) -> bool {
        matches!(
            *self.state.lock().unwrap_or_else(PoisonError::into_inner),
            State::Open { until } if until > Instant::now()
        )
    }

    /// Asks to call the partner: refused while the breaker is open (or a
    /// half-open probe is already out), otherwise waits for a call slot
    /// until `deadline`.
    pub async fn admit(&self, deadline: Instant) -> Result<Admission, Refusal> {
        {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            match *state {
                State::Closed { .. } => {}
                State::Open { until } if until > Instant::now() => {
                    return Err(Refusal::CircuitOpen);
                }
                State::Open { .. } => *state = State::HalfOpen,
                State::HalfOpen => return Err(Refusal::CircuitOpen),
            }
        }
        match tokio::time::timeout_at(deadline, Arc::clone(&self.slots).acquire_owned()).await {
            Ok(Ok(slot)) => Ok(Admission { _slot: slot }),
            _ => {
                // A probe that never went out must not keep the breaker
                // half-open for ever.
                self.settle(None);
                Err(Refusal::Busy)
            }
        }
    }

    /// Records how a call went: `true` succeeded, `false` failed through
    /// the partner's fault.
    pub fn record(&self, succeeded: bool) {
        self.settle(Some(succeeded));
    }

    fn settle(&self, outcome: Option<bool>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let open = State::Open {
            until: Instant::now() + Duration::from_millis(self.config.breaker_cool_down_ms),
        };
        *state = match (*state, outcome) {
            (_, Some(true)) => State::Closed { failures: 0 },
            (State::HalfOpen, Some(false)) => open,
            (State::HalfOpen, None) => State::Open {
                until: Instant::now(),
            },
            (State::Closed { failures }, Some(false)) => {
                let failures = failures + 1;
                if failures >= self.config.breaker_failures.max(1) {
                    tracing::warn!(failures, "a partner's circuit breaker opened");
                    open
                } else {
                    State::Closed { failures }
                }
            }
            (current, _) => current,
        };
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use super::*;

    fn guard() -> Guard {
        Guard::new(ProtectionConfig {
            max_concurrent_calls: 1,
            breaker_failures: 2,
            breaker_cool_down_ms: 50,
        })
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(20)
    }

    #[tokio::test]
    async fn opens_after_consecutive_failures_probes_once_and_closes_on_success() {
        let guard = guard();
        for _ in 0..2 {
            let _call = guard.admit(soon()).await.unwrap();
            guard.record(false);
        }
        assert_eq!(guard.admit(soon()).await.unwrap_err(), Refusal::CircuitOpen);
        tokio::time::sleep(Duration::from_millis(60)).await;
        let probe = guard.admit(soon()).await.unwrap();
        // Only one probe at a time.
        assert_eq!(guard.admit(soon()).await.unwrap_err(), Refusal::CircuitOpen);
        drop(probe);
        guard.record(true);
        assert!(guard.admit(soon()).await.is_ok());
    }

    #[tokio::test]
    async fn a_failed_probe_opens_it_again_and_a_success_resets_the_count() {
        let guard = guard();
        guard.record(false);
        guard.record(true);
        guard.record(false);
        assert!(!guard.is_open(), "failures must be consecutive");
        guard.record(false);
        assert!(guard.is_open());
        tokio::time::sleep(Duration::from_millis(60)).await;
        let _probe = guard.admit(soon()).await.unwrap();
        guard.record(false);
        assert!(guard.is_open());
    }

    #[tokio::test]
    async fn calls_beyond_the_concurrency_limit_wait_and_give_up_at_the_deadline() {
        let guard = guard();
        let held = guard.admit(soon()).await.unwrap();
        assert_eq!(guard.admit(soon()).await.unwrap_err(), Refusal::Busy);
        drop(held);
        assert!(guard.admit(soon()).await.is_ok());
    }
}
