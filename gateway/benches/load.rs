//! The gateway under load, as the release `meshgate serve` process, each
//! figure printed with a baseline measured in the same run:
//!
//! - **fan-out overhead** — a cohort count over N = 1, 3, 10 and 30
//!   partners that answer after a fixed injected latency (20 rows after
//!   20 ms), cache off. Each partner logs when every request arrived and
//!   when its answer was sent; the overhead of one query is its latency at
//!   the client minus the longest partner's busy time (first arrival to
//!   last answer). Printed as p50/p99 of the overhead and the ratio of the
//!   query's p50 to that partner time.
//! - **cached throughput and memory** — 1,000 concurrent clients, each
//!   with its own connection, asking the same cohort count (answered from
//!   the cache) for 10 s; baseline: the same clients asking `GET /healthz`
//!   (the HTTP floor) for 10 s. Printed: queries/s, the ratio to the floor,
//!   and the gateway's peak RSS (`VmHWM`) against its RSS when idle.
//!
//! Also printed: a query that asks no partner (N = 0, the floor of token,
//! GraphQL and audit commit) and the gateway's CPU time per query. Every
//! query is audited (SQLite on disk, `synchronous=FULL`), as in
//! production; `max_in_flight` is raised so that the 1,000 clients are not
//! shed. Run: `cargo bench -p meshgate-gateway --bench load [fan_out |
//! throughput]`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark setup"
)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshgate_gateway::dev_issuer::DevIssuer;
use serde_json::json;

const PARTNER_LATENCY: Duration = Duration::from_millis(20);
const ROWS: usize = 20;
const FAN_OUT: [usize; 4] = [1, 3, 10, 30];
const FAN_OUT_QUERIES: usize = 300;
const CLIENTS: usize = 1_000;
const LOAD_TIME: Duration = Duration::from_secs(10);

/// A partner answering every QIDO-RS search after [`PARTNER_LATENCY`]:
/// [`ROWS`] studies on the first page, none after; it logs each request's
/// arrival and answer.
struct Partner {
    url: String,
    log: Arc<Mutex<Vec<(Instant, Instant)>>>,
}

async fn partner(index: usize) -> Partner {
    let log: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let rows: Vec<serde_json::Value> = (0..ROWS)
        .map(|i| {
            json!({
                "0020000D": {"vr": "UI", "Value": [format!("1.2.826.0.1.3680043.10.{index}.{i}")]},
                "00080020": {"vr": "DA", "Value": [format!("2020{:02}{:02}", 1 + i % 12, 1 + i % 28)]},
                "00080061": {"vr": "CS", "Value": ["CT"]},
                "00081030": {"vr": "LO", "Value": ["CT chest"]},
                "00100040": {"vr": "CS", "Value": ["F"]},
            })
        })
        .collect();
    let first_page = serde_json::to_string(&rows).unwrap();
    let requests = Arc::clone(&log);
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let requests = Arc::clone(&requests);
        let first_page = first_page.clone();
        async move {
            let arrived = Instant::now();
            tokio::time::sleep(PARTNER_LATENCY).await;
            let later_page = uri
                .query()
                .unwrap_or("")
                .split('&')
                .any(|p| p.starts_with("offset=") && p != "offset=0");
            let body = if later_page {
                "[]".to_owned()
            } else {
                first_page
            };
            requests.lock().unwrap().push((arrived, Instant::now()));
            ([("content-type", "application/dicom+json")], body)
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/dicom-web/", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Partner { url, log }
}

/// A `meshgate serve` process over `partners`, stopped when dropped.
struct Gateway {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    async fn start(issuer: &DevIssuer, partners: &[Partner], cache_ttl_seconds: u64) -> Gateway {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        write(
            dir.path(),
            "allow.cedar",
            "permit (principal, action in Meshgate::Action::\"QueryStudies\", resource) when { principal.projects.contains(context.project) };",
        );
        write(dir.path(), "key", &"k".repeat(32));
        write(
            dir.path(),
            "checkpoint.pem",
            &meshgate_gateway::audit::new_checkpoint_key_pem().unwrap(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let mut config = format!(
            r#"listen = "{address}"
[auth]
[[auth.issuers]]
issuer = "{issuer}"
audiences = ["meshgate"]
jwks_url = "{jwks}"
trusted_for = {{ institutions = ["*"], roles = ["*"], projects = ["*"], permissions = ["*"] }}

[policies]
consortium = ["allow.cedar"]

[deidentification]
key = "${{file:{dir}/key}}"

[audit]
store = "sqlite:audit.db"
checkpoint_key = "${{file:{dir}/checkpoint.pem}}"

[server]
max_connections = 2048
max_connections_per_address = 2048
max_in_flight = 2048
per_address = {{ concurrent = 4096, per_second = 1000000.0, burst = 1000000 }}
per_principal = {{ concurrent = 4096, per_second = 1000000.0, burst = 1000000 }}

[cache]
ttl_seconds = {cache_ttl_seconds}

[[projects]]
id = "p1"
title = "Project one"
purposes = ["DUO:0000042"]
"#,
            issuer = issuer.issuer(),
            jwks = issuer.jwks_url(),
            dir = dir.path().display(),
        );
        for (index, partner) in partners.iter().enumerate() {
            config.push_str(&format!(
                "\n[[partners]]\nid = \"p{index}\"\nname = \"Partner {index}\"\ninstitution = \"i{index}\"\n\
                 data_use = {{ permission = \"DUO:0000042\" }}\npolicies = [\"allow.cedar\"]\n\
                 protection = {{ max_concurrent_calls = 64 }}\n\
                 connector = {{ kind = \"dicomweb\", url = \"{}\" }}\n",
                partner.url
            ));
        }
        write(dir.path(), "meshgate.toml", &config);
        let mut child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
            .args(["serve", "--config"])
            .arg(dir.path().join("meshgate.toml"))
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let url = format!("http://{address}");
        let client = reqwest::Client::new();
        let started = Instant::now();
        while !client
            .get(format!("{url}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(
                started.elapsed() < Duration::from_secs(30) && running(&mut child),
                "gateway did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Gateway {
            child,
            url,
            _dir: dir,
        }
    }

    /// The process's resident memory now and at its peak, in MiB.
    fn rss_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|rest| {
                    rest.trim()
                        .trim_end_matches(" kB")
                        .trim()
                        .parse::<f64>()
                        .unwrap()
                })
                .unwrap()
                / 1024.0
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

fn running(child: &mut Child) -> bool {
    child.try_wait().is_ok_and(|status| status.is_none())
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn count_query(partners: usize) -> serde_json::Value {
    let ids: Vec<String> = (0..partners).map(|i| format!("p{i}")).collect();
    json!({
        "query": "query Count($partners: [ID!]) { cohortCount(project: \"p1\", filter: {partners: $partners}) { total partners { partner status } } }",
        "variables": {"partners": ids},
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// CPU time the process has used so far, in ms (user + system).
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // utime and stime, in clock ticks of 10 ms.
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) * 10.0
}

/// Sends `body` to the gateway `rounds` times after 20 warm-up rounds;
/// returns each round's latency (ms) and the longest partner busy time
/// among `partners` during it (ms), and the gateway's CPU per round (ms).
async fn rounds(
    gateway: &Gateway,
    token: &str,
    body: &serde_json::Value,
    partners: &[Partner],
) -> (Vec<f64>, Vec<f64>, f64) {
    let client = reqwest::Client::new();
    let (mut totals, mut busiest) = (Vec::new(), Vec::new());
    let mut cpu_before = 0.0;
    for round in 0..FAN_OUT_QUERIES + 20 {
        if round == 20 {
            cpu_before = cpu_ms(gateway.child.id());
        }
        for partner in partners {
            partner.log.lock().unwrap().clear();
        }
        let started = Instant::now();
        let response = client
            .post(format!("{}/graphql", gateway.url))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
        let answer: serde_json::Value = response.json().await.unwrap();
        let total = started.elapsed();
        assert!(answer.get("errors").is_none(), "{answer}");
        if let Some(total) = answer["data"]["cohortCount"]["total"].as_u64() {
            assert_eq!(total as usize, partners.len() * ROWS, "{answer}");
        }
        let partner_time = partners
            .iter()
            .map(|p| {
                let log = p.log.lock().unwrap();
                let first = log.iter().map(|(a, _)| *a).min().unwrap();
                let last = log.iter().map(|(_, d)| *d).max().unwrap();
                last - first
            })
            .max()
            .unwrap_or_default();
        if round >= 20 {
            totals.push(ms(total));
            busiest.push(ms(partner_time));
        }
    }
    let cpu = (cpu_ms(gateway.child.id()) - cpu_before) / FAN_OUT_QUERIES as f64;
    (totals, busiest, cpu)
}

async fn fan_out(issuer: &DevIssuer, token: &str) {
    let partners: Vec<Partner> = futures::future::join_all((0..30).map(partner)).await;
    let gateway = Gateway::start(issuer, &partners, 0).await;
    println!(
        "fan-out overhead: cohort count, cache off, partners answering {ROWS} rows after {} ms; {FAN_OUT_QUERIES} queries each",
        ms(PARTNER_LATENCY)
    );
    println!(
        "{:>3}  {:>10}  {:>11}  {:>12}  {:>12}  {:>6}  {:>13}",
        "N", "query p50", "partner p50", "overhead p50", "overhead p99", "ratio", "gateway CPU/q"
    );
    // The floor: a query that asks no partner (token, GraphQL, audit commit).
    let me = json!({"query": "{ me { subject } }"});
    let (mut totals, _, cpu) = rounds(&gateway, token, &me, &[]).await;
    totals.sort_by(f64::total_cmp);
    println!(
        "{:>3}  {:>7.2} ms  {:>11}  {:>9.2} ms  {:>9.2} ms  {:>6}  {cpu:>10.2} ms",
        0,
        percentile(&totals, 0.5),
        "-",
        percentile(&totals, 0.5),
        percentile(&totals, 0.99),
        "-"
    );
    for n in FAN_OUT {
        let (totals, busiest, cpu) = rounds(&gateway, token, &count_query(n), &partners[..n]).await;
        let mut overheads: Vec<f64> = totals.iter().zip(&busiest).map(|(t, b)| t - b).collect();
        let (mut totals, mut busiest) = (totals, busiest);
        for v in [&mut totals, &mut busiest, &mut overheads] {
            v.sort_by(f64::total_cmp);
        }
        let (total, partner) = (percentile(&totals, 0.5), percentile(&busiest, 0.5));
        println!(
            "{n:>3}  {total:>7.2} ms  {partner:>8.2} ms  {:>9.2} ms  {:>9.2} ms  {:>6.3}  {cpu:>10.2} ms",
            percentile(&overheads, 0.5),
            percentile(&overheads, 0.99),
            total / partner,
        );
    }
}

/// Requests answered 200 per second by `CLIENTS` clients sending `request`
/// over their own connections for [`LOAD_TIME`].
async fn load(
    make: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder + Clone + Send + 'static,
) -> (f64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (stop, ok, failed, make) = (
                Arc::clone(&stop),
                Arc::clone(&ok),
                Arc::clone(&failed),
                make.clone(),
            );
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .build()
                    .unwrap();
                while !stop.load(Ordering::Relaxed) {
                    match make(&client).send().await {
                        Ok(response) if response.status().is_success() => {
                            let _ = response.bytes().await;
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    // Let every client connect before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (start_ok, started) = (ok.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(LOAD_TIME).await;
    let done = ok.load(Ordering::Relaxed) - start_ok;
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    (
        done as f64 / elapsed.as_secs_f64(),
        failed.load(Ordering::Relaxed),
    )
}

async fn throughput(issuer: &DevIssuer, token: &str) {
    let partners: Vec<Partner> = futures::future::join_all((0..3).map(partner)).await;
    let gateway = Gateway::start(issuer, &partners, 600).await;
    let body = count_query(3);
    let client = reqwest::Client::new();
    let warm = client
        .post(format!("{}/graphql", gateway.url))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(warm.status().is_success());
    let (idle, _) = gateway.rss_mib();

    let url = format!("{}/healthz", gateway.url);
    let (floor, floor_failed) = load(move |client| client.get(&url)).await;
    let (url, token) = (format!("{}/graphql", gateway.url), token.to_owned());
    let (queries, failed) =
        load(move |client| client.post(&url).bearer_auth(&token).json(&body)).await;
    let (_, peak) = gateway.rss_mib();
    println!(
        "cached cohort count, 3 partners, {CLIENTS} concurrent clients, {} s each",
        LOAD_TIME.as_secs()
    );
    println!("  GET /healthz (floor): {floor:>8.0} req/s  ({floor_failed} failed)");
    println!(
        "  cached queries:       {queries:>8.0} q/s    ({failed} failed)  ratio to floor {:.3}",
        queries / floor
    );
    println!(
        "  gateway RSS: idle {idle:.1} MiB, peak {peak:.1} MiB (ratio {:.2})",
        peak / idle
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let issuer = DevIssuer::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let token = issuer.token(
            &json!({"sub": "bench", "roles": ["researcher"], "projects": ["p1"]}),
            Duration::from_secs(3600),
        );
        let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
        if only.as_deref().is_none_or(|o| "fan_out".contains(o)) {
            fan_out(&issuer, &token).await;
        }
        if only.as_deref().is_none_or(|o| "throughput".contains(o)) {
            throughput(&issuer, &token).await;
        }
    });
}
