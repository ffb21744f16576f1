//! The audit log as operators rely on it: it survives the process being
//! killed at any moment, `meshgate audit verify` finds any tampering, and a
//! PostgreSQL log shared by two gateways stays one chain and fails closed
//! while the server is down.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use meshgate_gateway::audit::{self, AuditLog, Store, StoreLocation};
use meshgate_gateway::request::RequestContext;
use rand::Rng;

use common::{Killed, Setup, counting_partner, free_port, meshgate, serve};

const COUNT: &str = r#"{"query": "{ cohortCount(project: \"p1\") { total } }"}"#;

/// Sends one query; the request id if it was answered 2xx.
async fn query(client: &reqwest::Client, port: u16, token: &str) -> Option<(u16, String)> {
    let response = client
        .post(format!("http://127.0.0.1:{port}/graphql"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(COUNT)
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    let id = response
        .headers()
        .get("x-request-id")?
        .to_str()
        .ok()?
        .to_owned();
    // Only a response read to its end was received.
    response.bytes().await.ok()?;
    Some((status, id))
}

/// `meshgate audit verify --config F`: exit code and output.
fn verify(config: &Path, checkpoints: Option<&Path>) -> (Option<i32>, String) {
    let mut command = meshgate();
    command.args(["audit", "verify", "--config"]).arg(config);
    if let Some(file) = checkpoints {
        command.arg("--checkpoints").arg(file);
    }
    let output = command.output().unwrap();
    (
        output.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

async fn request_ids(store: &Store) -> HashSet<String> {
    let mut ids = HashSet::new();
    let mut after = 0;
    loop {
        let rows = store.range(after, 10_000).await.unwrap();
        let Some(last) = rows.last() else {
            return ids;
        };
        after = last.seq;
        for row in &rows {
            let record: serde_json::Value = serde_json::from_str(&row.record).unwrap();
            ids.insert(record["request_id"].as_str().unwrap().to_owned());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_answered_request_survives_sigkill_at_random_moments_and_the_chain_verifies() {
    let setup = Setup::new().await;
    let connector = setup.files_connector();
    let client = reqwest::Client::new();
    let mut answered: Vec<String> = Vec::new();
    let mut rng = rand::thread_rng();
    let iterations = 100;
    let mut config = PathBuf::new();
    for _ in 0..iterations {
        let port = free_port();
        config = setup.config("crash", port, "sqlite:audit.db", &connector);
        let mut gateway = serve(&config, port).await;
        let answered_now = Arc::new(AtomicU32::new(0));
        let senders: Vec<_> = (0..4)
            .map(|_| {
                let client = client.clone();
                let token = setup.token.clone();
                let answered_now = Arc::clone(&answered_now);
                tokio::spawn(async move {
                    let mut ids = Vec::new();
                    while let Some((status, id)) = query(&client, port, &token).await {
                        if (200..300).contains(&status) {
                            ids.push(id);
                            answered_now.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    ids
                })
            })
            .collect();
        // Once traffic flows (however loaded the machine), at a random
        // moment within the next 60 ms.
        let deadline = Instant::now() + Duration::from_secs(10);
        while answered_now.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..60))).await;
        // SIGKILL: no shutdown, no flush, no goodbye.
        gateway.0.kill().unwrap();
        gateway.0.wait().unwrap();
        for sender in senders {
            answered.extend(sender.await.unwrap());
        }
    }
    assert!(
        answered.len() >= iterations,
        "too few answers to mean much: {}",
        answered.len()
    );
    let store = Store::open(&StoreLocation::Sqlite(setup.dir.path().join("audit.db")))
        .await
        .unwrap();
    let recorded = request_ids(&store).await;
    let lost: Vec<&String> = answered
        .iter()
        .filter(|id| !recorded.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} answered requests have no audit record",
        lost.len()
    );
    let (code, output) = verify(&config, None);
    assert_eq!(code, Some(0), "{output}");
    println!(
        "{iterations} kills, {} answered requests, {} records: {output}",
        answered.len(),
        recorded.len()
    );
}

/// Makes a consistent copy of the SQLite log, changes it with `sql`, and
/// returns the verifier's exit code and output on the copy (checked
/// against the published checkpoint file, kept outside the log).
async fn tampered(setup: &Setup, name: &str, sql: &[&str]) -> (Option<i32>, String) {
    let dir = setup.dir.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("audit.db");
    let original = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        setup.dir.path().join("audit.db").display()
    ))
    .await
    .unwrap();
    sqlx::query(&format!("VACUUM INTO '{}'", copy.display()))
        .execute(&original)
        .await
        .unwrap();
    original.close().await;
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", copy.display()))
        .await
        .unwrap();
    for statement in sql {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    pool.close().await;
    let config = setup.config(
        &format!("{name}/meshgate"),
        free_port(),
        "sqlite:audit.db",
        "{ kind = \"files\", path = \"/nonexistent\" }",
    );
    verify(&config, Some(&setup.dir.path().join("checkpoints.jsonl")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_the_first_edited_deleted_swapped_inserted_or_cut_record() {
    let setup = Setup::new().await;
    let log =
        AuditLog::open(&setup.settings(StoreLocation::Sqlite(setup.dir.path().join("audit.db"))))
            .await
            .unwrap();
    let fatal: audit::FatalHandler = Arc::new(|error| panic!("{error}"));
    for n in 1..=30 {
        let record = RequestContext::new(format!("request-{n:02}"), None)
            .audit_record(Some(format!("operation-{n:02}")), Vec::new());
        log.append(&record, &fatal).await.unwrap();
    }
    // Checkpoints at 10, 20 and 30 are in the published file.
    let published = std::fs::read_to_string(setup.dir.path().join("checkpoints.jsonl")).unwrap();
    assert_eq!(published.lines().count(), 3, "{published}");

    let (code, output) = tampered(&setup, "untouched", &[]).await;
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("intact: 30 records"), "{output}");

    // A forger who knows the format computes a valid hash for the record
    // they insert; the record after it no longer follows.
    let row17 = log.store().range(16, 1).await.unwrap().remove(0);
    let forged_record = r#"{"accesses":[],"client":null,"error_codes":[],"operation":"forged","outcome":"success","principal":null,"request_id":"forged"}"#;
    let forged_hash = audit::entry_hash(18, &row17.recorded, &row17.hash, forged_record);
    let insert = format!(
        "INSERT INTO audit_log (seq, recorded, prev_hash, hash, issuer, subject, institution, outcome, projects, partners, record) \
         VALUES (18, '{}', '{}', '{forged_hash}', NULL, NULL, NULL, 'success', ',', ',', '{forged_record}')",
        row17.recorded, row17.hash
    );
    let cases: Vec<(&str, Vec<String>, i64)> = vec![
        (
            "edited",
            vec!["UPDATE audit_log SET record = replace(record, 'operation-07', 'operation-99') WHERE seq = 7".into()],
            7,
        ),
        (
            "edited-column",
            vec!["UPDATE audit_log SET subject = 'someone-else' WHERE seq = 9".into()],
            9,
        ),
        ("deleted", vec!["DELETE FROM audit_log WHERE seq = 12".into()], 12),
        (
            "swapped",
            vec![
                "UPDATE audit_log SET seq = -15 WHERE seq = 15".into(),
                "UPDATE audit_log SET seq = 15 WHERE seq = 16".into(),
                "UPDATE audit_log SET seq = 16 WHERE seq = -15".into(),
            ],
            15,
        ),
        (
            "inserted",
            vec![
                "UPDATE audit_log SET seq = seq + 1000 WHERE seq >= 18".into(),
                "UPDATE audit_log SET seq = seq - 999 WHERE seq >= 1018".into(),
                insert,
            ],
            19,
        ),
        (
            // The tail behind the last published checkpoint cut off, and
            // the log's own checkpoints and head made to match.
            "cut",
            vec![
                "DELETE FROM audit_log WHERE seq > 20".into(),
                "DELETE FROM audit_checkpoints WHERE seq > 20".into(),
                "UPDATE audit_head SET seq = 20, hash = (SELECT hash FROM audit_log WHERE seq = 20)".into(),
            ],
            21,
        ),
    ];
    for (name, sql, first_bad) in cases {
        let statements: Vec<&str> = sql.iter().map(String::as_str).collect();
        let (code, output) = tampered(&setup, name, &statements).await;
        assert_eq!(code, Some(1), "{name}: {output}");
        assert!(
            output.contains(&format!("first bad record {first_bad}:")),
            "{name}: expected record {first_bad}: {output}"
        );
    }
}

/// A PostgreSQL server of its own (Debian's `postgresql` package), on a
/// free port, its data in a temporary folder; run as user `postgres` when
/// the tests run as root.
struct Postgres {
    bin: PathBuf,
    data: tempfile::TempDir,
    port: u16,
    server: Option<Killed>,
}

impl Postgres {
    fn start() -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is installed (Debian package postgresql)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("postgres").exists())
            .max()
            .unwrap();
        let data = tempfile::tempdir().unwrap();
        let root = rustix::process::geteuid().is_root();
        if root {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(data.path())
                .status()
                .unwrap();
            assert!(status.success());
        }
        let mut postgres = Postgres {
            bin,
            data,
            port: free_port(),
            server: None,
        };
        let status = postgres
            .command("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(postgres.data.path().join("db"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "initdb failed");
        postgres.run();
        postgres
    }

    /// `program` from the server's bin folder, as user `postgres` when
    /// running as root (the server refuses to run as root).
    fn command(&self, program: &str) -> Command {
        use std::os::unix::process::CommandExt as _;
        let mut command = Command::new(self.bin.join(program));
        if rustix::process::geteuid().is_root() {
            let id = |flag: &str| -> u32 {
                let output = Command::new("id")
                    .args([flag, "postgres"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&output.stdout)
                    .trim()
                    .parse()
                    .unwrap()
            };
            command.uid(id("-u")).gid(id("-g"));
        }
        command
    }

    fn run(&mut self) {
        let server = self
            .command("postgres")
            .arg("-D")
            .arg(self.data.path().join("db"))
            .args([
                "-p",
                &self.port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-k",
            ])
            .arg(self.data.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.server = Some(Killed(server));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "PostgreSQL did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Accepting connections is not yet accepting queries.
        let status = loop {
            let status = self
                .command("pg_isready")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .stdout(Stdio::null())
                .status()
                .unwrap();
            if status.success() || Instant::now() > deadline {
                break status;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "PostgreSQL is not ready");
    }

    /// Stops the server the way `pg_ctl stop -m fast` does (SIGINT).
    fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let pid = rustix::process::Pid::from_child(&server.0);
            rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
            server.0.wait().unwrap();
        }
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_share_one_postgres_chain_and_fail_closed_while_it_is_down() {
    let setup = Setup::new().await;
    let mut postgres = Postgres::start();
    let store = postgres.url();
    let (partner_url, partner_hits, _, _) = counting_partner().await;
    let connector = format!("{{ kind = \"dicomweb\", url = \"{partner_url}\" }}");
    let ports = [free_port(), free_port()];
    let configs: Vec<PathBuf> = ports
        .iter()
        .enumerate()
        .map(|(n, port)| setup.config(&format!("replica-{n}"), *port, &store, &connector))
        .collect();
    let _first = serve(&configs[0], ports[0]).await;
    let _second = serve(&configs[1], ports[1]).await;

    // Both replicas append at once: one gap-free chain.
    let client = reqwest::Client::new();
    let per_sender = 25;
    let senders: Vec<_> = (0..4)
        .map(|n| {
            let client = client.clone();
            let token = setup.token.clone();
            let port = ports[n % 2];
            tokio::spawn(async move {
                let mut ok = 0;
                for _ in 0..per_sender {
                    if let Some((200, _)) = query(&client, port, &token).await {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let mut answered = 0;
    for sender in senders {
        answered += sender.await.unwrap();
    }
    assert_eq!(answered, 4 * per_sender);
    let (code, output) = verify(&configs[0], None);
    assert_eq!(code, Some(0), "{output}");
    assert!(
        output.contains(&format!("intact: {} records", 4 * per_sender)),
        "{output}"
    );

    // PostgreSQL stops: 503 with the stable code, and no partner is asked.
    postgres.stop();
    let before = partner_hits.load(Ordering::SeqCst);
    for port in ports {
        let response = client
            .post(format!("http://127.0.0.1:{port}/graphql"))
            .bearer_auth(&setup.token)
            .header("content-type", "application/json")
            .body(COUNT)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["errors"][0]["extensions"]["code"], "AUDIT_UNAVAILABLE");
        assert!(body.get("data").is_none());
    }
    assert_eq!(
        partner_hits.load(Ordering::SeqCst),
        before,
        "no partner was called"
    );

    // It comes back, and so do the gateways, by themselves.
    postgres.run();
    let deadline = Instant::now() + Duration::from_secs(20);
    for port in ports {
        loop {
            if let Some((200, _)) = query(&client, port, &setup.token).await {
                break;
            }
            assert!(Instant::now() < deadline, "the gateway did not recover");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let (code, output) = verify(&configs[1], None);
    assert_eq!(code, Some(0), "{output}");

    // Governance reads work on PostgreSQL too: the caller's own events that
    // involved partner north, through either replica.
    let events = client
        .post(format!("http://127.0.0.1:{}/graphql", ports[1]))
        .bearer_auth(&setup.token)
        .header("content-type", "application/json")
        .body(r#"{"query": "{ auditEvents(filter: {partner: \"north\", outcome: SUCCESS}, first: 5) { nodes { sequence subject accesses { partners { partner } } } hasNextPage } }"}"#)
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    let nodes = events["data"]["auditEvents"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 5, "{events}");
    assert!(
        nodes.iter().all(|n| n["subject"] == "auditor-test"),
        "{events}"
    );
    assert_eq!(events["data"]["auditEvents"]["hasNextPage"], true);
}
