//! What the audit log costs, measured against baselines in the same run:
//! - one append (commit of one record), p50 and p99: SQLite on disk
//!   (WAL, synchronous=FULL, so one fsync per commit) against the same on
//!   tmpfs (`/dev/shm`, where fsync costs nothing); and on PostgreSQL when
//!   `MESHGATE_BENCH_POSTGRES_URL` is set (`bench/audit-postgres.sh`
//!   starts a throwaway server and sets it);
//! - one query end to end through the HTTP app (token, policies, partner
//!   search, audit commit): audit log on disk against audit log on tmpfs;
//! - `audit verify` over `MESHGATE_BENCH_VERIFY_RECORDS` records (default
//!   1,000,000).
//!
//! `cargo bench -p meshgate-gateway --bench audit`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark fails loudly"
)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use meshgate_gateway::audit::{
    self, AuditLog, AuditSettings, FatalHandler, Store, StoreLocation, canonical_json, entry_hash,
};
use meshgate_gateway::config::{Config, ProcessEnvironment};
use meshgate_gateway::dev_issuer::DevIssuer;
use meshgate_gateway::request::{AuditRecord, AuditedAccess, AuditedPartner, RequestContext};
use meshgate_gateway::synth::{SynthSpec, synthesise};
use meshgate_gateway::{build_app, start};
use meshgate_schema::{CountDisclosure, DisclosureLevel, PartnerOutcome};
use serde_json::json;
use tower::ServiceExt;

const APPENDS: usize = 2000;
const QUERIES: usize = 300;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A record as a three-partner count leaves it.
fn record(n: usize) -> AuditRecord {
    let context = RequestContext::new(format!("{n:016x}"), Some("10.1.2.3:4567".parse().unwrap()));
    context.note(AuditedAccess {
        field: "cohortCount",
        project: "lung-cancer".into(),
        filter_fingerprint: "0123456789abcdef01234567".into(),
        filter: json!({"modalities": ["CT"], "body_part": "CHEST", "study_date": {"from": "2019-01-01", "to": null},
                       "description": null, "patient_sex": "F", "patient_age": null, "study_uids": [], "partners": []}),
        partners: ["north", "south", "east"]
            .into_iter()
            .map(|id| AuditedPartner {
                partner: id.into(),
                status: PartnerOutcome::Ok,
                disclosure: DisclosureLevel::Deidentified,
                deidentification_profile: Some("basic".into()),
                count: Some(42),
                count_disclosure: Some(CountDisclosure::Exact),
                cached: false,
            })
            .collect(),
    });
    context.audit_record(Some("Count".into()), Vec::new())
}

fn settings(store: StoreLocation, dir: &Path) -> AuditSettings {
    std::fs::write(
        dir.join("checkpoint.pem"),
        audit::new_checkpoint_key_pem().unwrap(),
    )
    .unwrap();
    let pem = std::fs::read_to_string(dir.join("checkpoint.pem")).unwrap();
    use ed25519_dalek::pkcs8::DecodePrivateKey as _;
    AuditSettings {
        store,
        signing_key: Arc::new(ed25519_dalek::SigningKey::from_pkcs8_pem(&pem).unwrap()),
        checkpoint_every_records: 1000,
        checkpoint_every: Duration::from_secs(60),
        checkpoint_file: None,
    }
}

async fn appends(label: &str, store: StoreLocation, dir: &Path) -> (Duration, Duration) {
    let log = AuditLog::open(&settings(store, dir)).await.unwrap();
    let fatal: FatalHandler = Arc::new(|error| panic!("{error}"));
    for n in 0..50 {
        log.append(&record(n), &fatal).await.unwrap();
    }
    let mut times = Vec::with_capacity(APPENDS);
    for n in 0..APPENDS {
        let record = record(n);
        let started = Instant::now();
        log.append(&record, &fatal).await.unwrap();
        times.push(started.elapsed());
    }
    times.sort();
    let (p50, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
    println!(
        "append, {label}: p50 {:.3} ms, p99 {:.3} ms ({APPENDS} appends)",
        ms(p50),
        ms(p99)
    );
    (p50, p99)
}

/// A gateway over three synthetic files partners, its audit log in `audit_dir`.
async fn router(data: &Path, audit_dir: &Path, issuer: &DevIssuer) -> axum::Router {
    std::fs::create_dir_all(audit_dir).unwrap();
    std::fs::write(
        audit_dir.join("checkpoint.pem"),
        audit::new_checkpoint_key_pem().unwrap(),
    )
    .unwrap();
    let mut text = format!(
        "[auth]\n[[auth.issuers]]\nissuer = \"{}\"\naudiences = [\"meshgate\"]\njwks_url = \"{}\"\ntrusted_for = {{ institutions = [\"*\"], roles = [\"*\"], projects = [\"*\"], permissions = [\"*\"] }}\n\n\
         [policies]\nconsortium = [\"{allow}\"]\n\n[deidentification]\nkey = \"${{file:{key}}}\"\n\n\
         [audit]\nstore = \"sqlite:{db}\"\ncheckpoint_key = \"${{file:{pem}}}\"\n\n\
         [[projects]]\nid = \"p1\"\ntitle = \"P\"\npurposes = [\"DUO:0000042\"]\n",
        issuer.issuer(),
        issuer.jwks_url(),
        allow = data.join("allow.cedar").display(),
        key = data.join("key").display(),
        db = audit_dir.join("audit.db").display(),
        pem = audit_dir.join("checkpoint.pem").display(),
    );
    for id in ["north", "south", "east"] {
        text.push_str(&format!(
            "\n[[partners]]\nid = \"{id}\"\nname = \"{id}\"\ninstitution = \"{id}\"\ndata_use = {{ permission = \"DUO:0000042\" }}\npolicies = [\"{allow}\"]\nconnector = {{ kind = \"files\", path = \"{path}\" }}\n",
            allow = data.join("allow.cedar").display(),
            path = data.join(id).join("dicom").display(),
        ));
    }
    let loaded =
        Config::from_toml(&text, &audit_dir.join("meshgate.toml"), &ProcessEnvironment).unwrap();
    build_app(start(&loaded).await.unwrap())
}

async fn one_query(router: &axum::Router, token: &str) -> Duration {
    let body =
        json!({"query": "{ cohortCount(project: \"p1\", filter: {modalities: [CT]}) { total } }"})
            .to_string();
    let request = Request::post("/graphql")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {token}"))
        .body(Body::from(body))
        .unwrap();
    let started = Instant::now();
    let response = router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    started.elapsed()
}

/// Writes `records` chained entries straight into a new log (as appends
/// would, in large transactions), then times `verify` over them.
async fn verify_time(dir: &Path, records: i64) {
    let path = dir.join("verify.db");
    let store = Store::open(&StoreLocation::Sqlite(path.clone()))
        .await
        .unwrap();
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let text = canonical_json(&serde_json::to_value(record(0)).unwrap());
    let mut prev = audit::GENESIS.to_owned();
    let started = Instant::now();
    let mut seq = 0;
    while seq < records {
        let mut tx = pool.begin().await.unwrap();
        for _ in 0..10_000.min(records - seq) {
            seq += 1;
            let recorded = "2026-11-29T08:00:00.000Z";
            let hash = entry_hash(seq, recorded, &prev, &text);
            sqlx::query(
                "INSERT INTO audit_log (seq, recorded, prev_hash, hash, issuer, subject, institution, outcome, projects, partners, record)
                 VALUES ($1, $2, $3, $4, NULL, NULL, NULL, 'success', ',lung-cancer,', ',east,north,south,', $5)",
            )
            .bind(seq)
            .bind(recorded)
            .bind(&prev)
            .bind(&hash)
            .bind(&text)
            .execute(&mut *tx)
            .await
            .unwrap();
            prev = hash;
        }
        tx.commit().await.unwrap();
    }
    sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
        .bind(seq)
        .bind(&prev)
        .execute(&pool)
        .await
        .unwrap();
    println!(
        "wrote {records} records in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
    let started = Instant::now();
    let report = audit::verify(&store, &key, &[]).await.unwrap();
    assert!(report.first_bad.is_none());
    assert_eq!(report.entries, records);
    let elapsed = started.elapsed();
    println!(
        "audit verify, {records} records: {:.1} s ({:.1} µs per record)",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / records as f64
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else is understood.
    let disk = tempfile::tempdir().unwrap();
    let memory = tempfile::tempdir_in("/dev/shm").unwrap();

    let (disk_p50, disk_p99) = appends(
        "SQLite on disk",
        StoreLocation::Sqlite(disk.path().join("a.db")),
        disk.path(),
    )
    .await;
    let (shm_p50, shm_p99) = appends(
        "SQLite on tmpfs (baseline)",
        StoreLocation::Sqlite(memory.path().join("a.db")),
        memory.path(),
    )
    .await;
    println!(
        "append ratio disk / tmpfs: p50 {:.2}, p99 {:.2}",
        ms(disk_p50) / ms(shm_p50),
        ms(disk_p99) / ms(shm_p99)
    );
    if let Ok(url) = std::env::var("MESHGATE_BENCH_POSTGRES_URL") {
        let (pg_p50, pg_p99) = appends(
            "PostgreSQL",
            StoreLocation::Postgres(meshgate_connectors::Secret::new(url)),
            disk.path(),
        )
        .await;
        println!(
            "append ratio PostgreSQL / SQLite on disk: p50 {:.2}, p99 {:.2}",
            ms(pg_p50) / ms(disk_p50),
            ms(pg_p99) / ms(disk_p99)
        );
    }

    // End to end: the same gateway with its log on disk and on tmpfs.
    let data = tempfile::tempdir().unwrap();
    for (id, seed) in [("north", 1), ("south", 2), ("east", 3)] {
        synthesise(
            &SynthSpec {
                partner: id.into(),
                studies: 300,
                seed,
            },
            &data.path().join(id),
        )
        .unwrap();
    }
    std::fs::write(
        data.path().join("key"),
        "bench pseudonymisation key, 32 bytes or more",
    )
    .unwrap();
    std::fs::write(
        data.path().join("allow.cedar"),
        "permit (principal, action in Meshgate::Action::\"QueryStudies\", resource) when { principal.projects.contains(context.project) };",
    )
    .unwrap();
    let issuer = DevIssuer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let token = issuer.token(
        &json!({"sub": "bench", "roles": ["researcher"], "projects": ["p1"]}),
        Duration::from_secs(3600),
    );
    let on_disk = router(data.path(), &disk.path().join("e2e"), &issuer).await;
    let on_tmpfs = router(data.path(), &memory.path().join("e2e"), &issuer).await;
    for _ in 0..20 {
        one_query(&on_disk, &token).await;
        one_query(&on_tmpfs, &token).await;
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..QUERIES {
        a.push(one_query(&on_disk, &token).await);
        b.push(one_query(&on_tmpfs, &token).await);
    }
    a.sort();
    b.sort();
    println!(
        "query end to end (3 x 300 studies, count): audit on disk p50 {:.2} ms p99 {:.2} ms; on tmpfs p50 {:.2} ms p99 {:.2} ms; ratio p50 {:.2}, p99 {:.2}",
        ms(percentile(&a, 0.5)),
        ms(percentile(&a, 0.99)),
        ms(percentile(&b, 0.5)),
        ms(percentile(&b, 0.99)),
        ms(percentile(&a, 0.5)) / ms(percentile(&b, 0.5)),
        ms(percentile(&a, 0.99)) / ms(percentile(&b, 0.99)),
    );

    let records = std::env::var("MESHGATE_BENCH_VERIFY_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    verify_time(disk.path(), records).await;
}
