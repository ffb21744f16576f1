//! A three-partner query while the configuration is reloaded, against the
//! same query with no reloads, interleaved in one run: p50 and p99 of each
//! and their ratio.
//!
//! `cargo bench -p meshgate-tests --bench reload`
//!
//! Three Orthanc partners of 200 studies, the answer cache off (every
//! query asks all three). Ten rounds: 60 queries with no reload, then
//! queries one after another for as long as ten reloads take, each
//! changing a partner's policy and another partner's connector (rebuilt,
//! probed, its connections new).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshgate_tests::{Gateway, OrthancPartner};
use serde_json::json;

const QUERY: &str =
    r#"{ cohortCount(project: "ground-truth", filter: {modalities: [CT]}) { total complete } }"#;
const ROUNDS: usize = 10;
const PER_ROUND: usize = 60;
const RELOADS_PER_ROUND: usize = 10;

fn percentile(times: &mut [Duration], p: f64) -> f64 {
    times.sort();
    let index = ((times.len() as f64 * p).ceil() as usize).clamp(1, times.len()) - 1;
    times[index].as_secs_f64() * 1000.0
}

async fn timed(gateway: &Gateway) -> Duration {
    let started = Instant::now();
    let data = gateway.query(QUERY, json!({})).await;
    assert_eq!(data["cohortCount"]["complete"], true, "{data}");
    started.elapsed()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let partners = futures::future::join_all(
            [("a", 81), ("b", 82), ("c", 83)].map(|(id, seed)| OrthancPartner::start(id, 200, seed)),
        )
        .await;
        let mut tables = String::from("[cache]\nttl_seconds = 0\n\n");
        for partner in &partners {
            tables.push_str(&partner.table(20_000, Some(100)));
        }
        let gateway = Arc::new(Gateway::start(&tables).await);
        let file = gateway.config_file.clone();
        let base: toml::Table = toml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let allow = std::fs::read_to_string(base["partners"][0]["policies"][0].as_str().unwrap())
            .unwrap();
        let variants: Vec<String> = (0..2)
            .map(|n| {
                let policy = file.with_file_name(format!("a-{n}.cedar"));
                std::fs::write(&policy, format!("// version {n}\n{allow}")).unwrap();
                let mut table = base.clone();
                let partners = table["partners"].as_array_mut().unwrap();
                partners[0].as_table_mut().unwrap().insert(
                    "policies".into(),
                    vec![toml::Value::from(policy.display().to_string())].into(),
                );
                partners[1]["connector"]
                    .as_table_mut()
                    .unwrap()
                    .insert("page_size".into(), (100 + n as i64).into());
                toml::to_string(&table).unwrap()
            })
            .collect();
        // Warm-up: connections, token keys.
        for _ in 0..20 {
            timed(&gateway).await;
        }
        let (mut quiet, mut reloading) = (Vec::new(), Vec::new());
        let mut reloads = 0;
        let mut reload_times = Vec::new();
        for round in 0..ROUNDS {
            for _ in 0..PER_ROUND {
                quiet.push(timed(&gateway).await);
            }
            let reloader = {
                let (gateway, file, variants) =
                    (Arc::clone(&gateway), file.clone(), variants.clone());
                tokio::spawn(async move {
                    let mut times = Vec::new();
                    for n in 0..RELOADS_PER_ROUND {
                        let next = file.with_extension("next");
                        std::fs::write(&next, &variants[(round * RELOADS_PER_ROUND + n) % 2])
                            .unwrap();
                        std::fs::rename(&next, &file).unwrap();
                        let started = Instant::now();
                        gateway.registry.reload().await.unwrap();
                        times.push(started.elapsed());
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                    times
                })
            };
            // Only queries that start while the reloads are under way.
            while !reloader.is_finished() {
                reloading.push(timed(&gateway).await);
            }
            let times = reloader.await.unwrap();
            reloads += times.len();
            reload_times.extend(times);
        }
        let (quiet_p50, quiet_p99) = (percentile(&mut quiet, 0.5), percentile(&mut quiet, 0.99));
        let (p50, p99) = (
            percentile(&mut reloading, 0.5),
            percentile(&mut reloading, 0.99),
        );
        println!(
            "| three-partner count | queries | p50 ms | p99 ms |\n|---|---|---|---|\n\
             | no reloads (baseline) | {} | {quiet_p50:.2} | {quiet_p99:.2} |\n\
             | during {reloads} reloads | {} | {p50:.2} | {p99:.2} |\n\
             | ratio | | {:.2} | {:.2} |",
            quiet.len(),
            reloading.len(),
            p50 / quiet_p50,
            p99 / quiet_p99,
        );
        println!(
            "one reload (read, validate, rebuild one partner, probe it, swap): p50 {:.1} ms, p99 {:.1} ms",
            percentile(&mut reload_times, 0.5),
            percentile(&mut reload_times, 0.99)
        );
    });
}
