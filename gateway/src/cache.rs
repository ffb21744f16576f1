//! Partners' answers, cached for a short time: search answers, and the
//! series of the studies a page listed.
//!
//! An entry is keyed by everything that decides what may be made of it:
//! the caller, the partner, the normalised query as the partner was asked
//! it (or the study), the project, and the policy decision with its
//! de-identification profile. Entries are the caller's own: whether an
//! answer was cached (which the partner status says, and its latency
//! shows) must not tell one researcher what another asked a minute ago, so
//! no answer is shared between callers, and none across decisions.
//!
//! The cache is bounded in bytes (entries are weighed by an estimate of
//! what they hold; series get a quarter) and by age. Concurrent identical
//! searches are coalesced into one partner call; failures are never cached.

use std::future::Future;
use std::mem::size_of;
use std::sync::Arc;
use std::time::Duration;

use meshgate_connectors::SearchOutcome;
use meshgate_policies::Disclosure;
use meshgate_schema::{Caller, Instance, Series, Study, StudyQuery};
use moka::future::Cache;
use serde::Deserialize;

use crate::metrics::METRICS;

/// `[cache]`: how partners' answers are cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// How long an answer is reused; 0 turns the cache off.
    pub ttl_seconds: u64,
    /// The most the cached answers may hold, in bytes (estimated).
    pub max_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            ttl_seconds: 60,
            max_bytes: 64 << 20,
        }
    }
}

/// What a cached answer is keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    caller: Caller,
    partner: String,
    /// Which build of the partner answered: a partner changed by a reload
    /// starts with a new one, so answers from its old connector are never
    /// reused.
    generation: u64,
    /// For a search: the normalised query as canonical JSON, without the
    /// partner list (which only chooses whom to ask). For series: the
    /// study's UID.
    asked: String,
    project: String,
    /// The decision with its profile ([`Disclosure::label`]).
    decision: String,
}

impl CacheKey {
    /// The key of a search.
    pub fn new(
        caller: &Caller,
        (partner, generation): (&str, u64),
        query: &StudyQuery,
        project: &str,
        disclosure: &Disclosure,
    ) -> CacheKey {
        let query = StudyQuery {
            partners: Default::default(),
            ..query.clone()
        };
        CacheKey {
            caller: caller.clone(),
            partner: partner.to_owned(),
            generation,
            asked: serde_json::to_string(&query).unwrap_or_default(),
            project: project.to_owned(),
            decision: disclosure.label(),
        }
    }

    /// The key of a study's series.
    pub fn series(
        caller: &Caller,
        (partner, generation): (&str, u64),
        study_uid: &str,
        project: &str,
        disclosure: &Disclosure,
    ) -> CacheKey {
        CacheKey {
            caller: caller.clone(),
            partner: partner.to_owned(),
            generation,
            asked: study_uid.to_owned(),
            project: project.to_owned(),
            decision: disclosure.label(),
        }
    }
}

/// The partners' cached answers.
#[derive(Debug, Clone)]
pub struct AnswerCache {
    searches: Option<Cache<CacheKey, Arc<SearchOutcome>>>,
    series: Option<Cache<CacheKey, Arc<Vec<Series>>>>,
}

/// A moka cache bounded by `max_bytes` as `weigh` estimates entries, or
/// none when caching is off.
fn bounded<V: Clone + Send + Sync + 'static>(
    config: CacheConfig,
    max_bytes: u64,
    weigh: fn(&V) -> usize,
) -> Option<Cache<CacheKey, V>> {
    (config.ttl_seconds > 0 && max_bytes > 0).then(|| {
        Cache::builder()
            .max_capacity(max_bytes)
            .weigher(move |key: &CacheKey, value: &V| {
                u32::try_from(key_weight(key) + weigh(value)).unwrap_or(u32::MAX)
            })
            .time_to_live(Duration::from_secs(config.ttl_seconds))
            .support_invalidation_closures()
            .build()
    })
}

impl AnswerCache {
    pub fn new(config: CacheConfig) -> AnswerCache {
        let for_series = config.max_bytes / 4;
        AnswerCache {
            searches: bounded(config, config.max_bytes - for_series, |outcome| {
                search_weight(outcome)
            }),
            series: bounded(config, for_series, |series| series_weight(series)),
        }
    }

    /// The cached answer for `key`, or `search`'s, which is cached when it
    /// succeeds. Callers asking for a key whose search is under way wait for
    /// it instead of searching again. Returns whether the answer came from
    /// the cache (or another caller's search).
    pub async fn get_or_search<E>(
        &self,
        key: CacheKey,
        search: impl Future<Output = Result<SearchOutcome, E>>,
    ) -> (Result<Arc<SearchOutcome>, E>, bool)
    where
        E: Clone + Send + Sync + 'static,
    {
        let Some(entries) = &self.searches else {
            return (search.await.map(Arc::new), false);
        };
        match entries
            .entry(key)
            .or_try_insert_with(async { search.await.map(Arc::new) })
            .await
        {
            Ok(entry) => {
                let cached = !entry.is_fresh();
                METRICS.cache(cached);
                (Ok(entry.into_value()), cached)
            }
            Err(error) => {
                METRICS.cache(false);
                (Err(E::clone(&error)), false)
            }
        }
    }

    /// A study's cached series, if they are.
    pub async fn series(&self, key: &CacheKey) -> Option<Arc<Vec<Series>>> {
        let found = self.series.as_ref()?.get(key).await;
        METRICS.cache(found.is_some());
        found
    }

    /// Keeps a study's series.
    pub async fn keep_series(&self, key: CacheKey, series: Vec<Series>) {
        if let Some(cache) = &self.series {
            cache.insert(key, Arc::new(series)).await;
        }
    }

    /// Drops the answers of build `generation` of `partner` (changed or
    /// removed by a reload). Answers an old request stores afterwards carry
    /// that generation too, so they are never used and expire.
    pub fn forget_partner(&self, partner: &str, generation: u64) {
        let gone = {
            let partner = partner.to_owned();
            move |key: &CacheKey| key.partner == partner && key.generation == generation
        };
        if let Some(cache) = &self.searches {
            let gone = gone.clone();
            let _ = cache.invalidate_entries_if(move |key, _| gone(key));
        }
        if let Some(cache) = &self.series {
            let _ = cache.invalidate_entries_if(move |key, _| gone(key));
        }
    }

    /// The entries held per partner (searches and series), counted now.
    pub fn entries_by_partner(&self) -> std::collections::BTreeMap<String, u64> {
        let mut counts = std::collections::BTreeMap::new();
        if let Some(cache) = &self.searches {
            for (key, _) in cache.iter() {
                *counts.entry(key.partner.clone()).or_default() += 1;
            }
        }
        if let Some(cache) = &self.series {
            for (key, _) in cache.iter() {
                *counts.entry(key.partner.clone()).or_default() += 1;
            }
        }
        counts
    }

    /// What the cached answers hold now, in (estimated) bytes.
    pub fn weighted_bytes(&self) -> u64 {
        self.searches.as_ref().map_or(0, Cache::weighted_size)
            + self.series.as_ref().map_or(0, Cache::weighted_size)
    }
}

/// Estimates of the memory an entry holds: its structs and their heap
/// strings and vectors.
fn key_weight(key: &CacheKey) -> usize {
    size_of::<CacheKey>()
        + key.caller.issuer.len()
        + key.caller.subject.len()
        + key.partner.len()
        + key.asked.len()
        + key.project.len()
        + key.decision.len()
}

fn text(s: &Option<String>) -> usize {
    s.as_ref().map_or(0, String::capacity)
}

fn series_weight(series: &[Series]) -> usize {
    series
        .iter()
        .map(|series| {
            size_of::<Series>()
                + series.uid.capacity()
                + text(&series.modality)
                + text(&series.description)
                + text(&series.body_part)
                + series
                    .instances
                    .iter()
                    .map(|instance| {
                        size_of::<Instance>() + instance.uid.capacity() + text(&instance.sop_class)
                    })
                    .sum::<usize>()
        })
        .sum()
}

fn search_weight(outcome: &SearchOutcome) -> usize {
    let study = |study: &Study| {
        size_of::<Study>()
            + study.uid.capacity()
            + text(&study.patient_id)
            + text(&study.patient_name)
            + text(&study.accession_number)
            + text(&study.description)
            + study
                .modalities
                .iter()
                .chain(&study.body_parts)
                .map(|s| size_of::<String>() + s.capacity())
                .sum::<usize>()
            + series_weight(&study.series)
    };
    size_of::<SearchOutcome>() + outcome.studies.iter().map(study).sum::<usize>()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use std::sync::atomic::{AtomicU32, Ordering};

    use meshgate_policies::Profile;

    use super::*;

    fn caller(subject: &str) -> Caller {
        Caller {
            issuer: "https://issuer".into(),
            subject: subject.into(),
        }
    }

    fn outcome(studies: usize) -> SearchOutcome {
        SearchOutcome {
            studies: (0..studies)
                .map(|i| Study {
                    uid: format!("1.2.826.0.1.{i}"),
                    description: Some("CT chest".into()),
                    ..Study::default()
                })
                .collect(),
            truncated: false,
        }
    }

    #[test]
    fn callers_decisions_profiles_projects_and_queries_make_different_keys_but_partner_lists_do_not()
     {
        let query = StudyQuery::default();
        let key = |query: &StudyQuery, project, disclosure: &Disclosure| {
            CacheKey::new(&caller("alice"), ("north", 0), query, project, disclosure)
        };
        let deid = Disclosure::Deidentified(Profile::basic());
        let base = key(&query, "demo", &deid);
        assert_ne!(base, key(&query, "demo", &Disclosure::Identified));
        assert_ne!(
            base,
            key(&query, "demo", &Disclosure::CountsOnly(Profile::basic()))
        );
        let retaining = Profile::parse("basic+retain-device-identity").unwrap();
        assert_ne!(
            base,
            key(&query, "demo", &Disclosure::Deidentified(retaining))
        );
        assert_ne!(base, key(&query, "lung-cancer", &deid));
        assert_ne!(
            base,
            CacheKey::new(&caller("alice"), ("south", 0), &query, "demo", &deid)
        );
        assert_ne!(
            base,
            CacheKey::new(&caller("bob"), ("north", 0), &query, "demo", &deid)
        );
        let described = StudyQuery {
            description: Some("chest".into()),
            ..StudyQuery::default()
        };
        assert_ne!(base, key(&described, "demo", &deid));
        let naming_partners = StudyQuery {
            partners: ["north".to_owned()].into(),
            ..StudyQuery::default()
        };
        assert_eq!(base, key(&naming_partners, "demo", &deid));
    }

    #[tokio::test]
    async fn concurrent_identical_searches_make_one_call_and_failures_are_not_kept() {
        let cache = AnswerCache::new(CacheConfig::default());
        let calls = AtomicU32::new(0);
        let key = CacheKey::new(
            &caller("alice"),
            ("north", 0),
            &StudyQuery::default(),
            "demo",
            &Disclosure::Identified,
        );
        let failing = cache
            .get_or_search(key.clone(), async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<SearchOutcome, _>("down")
            })
            .await;
        assert_eq!(failing.0.unwrap_err(), "down");
        let search = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, &str>(outcome(3))
        };
        let answers =
            futures::future::join_all((0..10).map(|_| cache.get_or_search(key.clone(), search())))
                .await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "one failed call, one search"
        );
        assert_eq!(answers.iter().filter(|(_, cached)| !cached).count(), 1);
        assert!(
            answers
                .iter()
                .all(|(a, _)| a.as_ref().unwrap().studies.len() == 3)
        );
    }

    #[tokio::test]
    async fn the_cache_stays_within_its_byte_bound() {
        let cache = AnswerCache::new(CacheConfig {
            ttl_seconds: 60,
            max_bytes: 200_000,
        });
        // Searches get three quarters of the bound.
        for i in 0..100 {
            let query = StudyQuery {
                description: Some(format!("q{i}")),
                ..StudyQuery::default()
            };
            let key = CacheKey::new(
                &caller("alice"),
                ("north", 0),
                &query,
                "demo",
                &Disclosure::Identified,
            );
            let (answer, _) = cache
                .get_or_search(key, async { Ok::<_, ()>(outcome(100)) })
                .await;
            assert_eq!(answer.unwrap().studies.len(), 100);
        }
        if let Some(entries) = &cache.searches {
            entries.run_pending_tasks().await;
        }
        let held = cache.weighted_bytes();
        assert!(held > 0 && held <= 150_000, "{held} bytes held");
    }
}
