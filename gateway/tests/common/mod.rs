//! What the gateway's integration tests share.

#![allow(dead_code, reason = "each test file uses a part")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use meshgate_gateway::audit::{self, AuditSettings, StoreLocation};
use meshgate_gateway::dev_issuer::DevIssuer;
use meshgate_gateway::synth::{SynthSpec, synthesise};
use serde_json::json;

/// A DICOMweb partner that answers every QIDO-RS search with no rows (or
/// with 500 while `failing` is set, after `delay` ms), and counts requests.
/// Returns its URL, the count, the failing switch and the delay.
pub async fn counting_partner() -> (String, Arc<AtomicU32>, Arc<AtomicBool>, Arc<AtomicU32>) {
    let hits = Arc::new(AtomicU32::new(0));
    let failing = Arc::new(AtomicBool::new(false));
    let delay = Arc::new(AtomicU32::new(0));
    let (counter, fail, wait) = (Arc::clone(&hits), Arc::clone(&failing), Arc::clone(&delay));
    let partner = axum::Router::new().fallback(move || {
        let counter = Arc::clone(&counter);
        let fail = Arc::clone(&fail);
        let wait = u64::from(wait.load(Ordering::SeqCst));
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            if fail.load(Ordering::SeqCst) {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [("content-type", "text/plain")],
                    "down",
                );
            }
            (
                StatusCode::OK,
                [("content-type", "application/dicom+json")],
                "[]",
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/dicom-web/", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, partner).await });
    (url, hits, failing, delay)
}

pub fn meshgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshgate"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A configuration with one partner, and the audit log at `store`.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub issuer: DevIssuer,
    pub token: String,
}

impl Setup {
    pub async fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let issuer = DevIssuer::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let token = issuer.token(
            &json!({"sub": "auditor-test", "roles": ["researcher"], "projects": ["p1"]}),
            Duration::from_secs(3600),
        );
        std::fs::write(dir.path().join("key"), "k".repeat(32)).unwrap();
        std::fs::write(
            dir.path().join("checkpoint.pem"),
            audit::new_checkpoint_key_pem().unwrap(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("allow.cedar"),
            "permit (principal, action in Meshgate::Action::\"QueryStudies\", resource) when { principal.projects.contains(context.project) };",
        )
        .unwrap();
        Setup { dir, issuer, token }
    }

    /// Writes `name.toml`: audit at `store`, checkpoints every 10 records,
    /// the one partner given as its `connector = {…}` value.
    pub fn config(&self, name: &str, port: u16, store: &str, connector: &str) -> PathBuf {
        let text = format!(
            r#"listen = "127.0.0.1:{port}"

[auth]
[[auth.issuers]]
issuer = "{issuer}"
audiences = ["meshgate"]
jwks_url = "{jwks}"
trusted_for = {{ institutions = ["*"], roles = ["*"], projects = ["*"], permissions = ["*"] }}

[policies]
consortium = ["{allow}"]

[deidentification]
key = "${{file:{key}}}"

[audit]
store = "{store}"
checkpoint_key = "${{file:{pem}}}"
checkpoint_every_records = 10
checkpoint_file = "checkpoints.jsonl"

[[projects]]
id = "p1"
title = "Project one"
purposes = ["DUO:0000042"]

[[partners]]
id = "north"
name = "North"
institution = "north"
data_use = {{ permission = "DUO:0000042" }}
policies = ["{allow}"]
connector = {connector}
"#,
            issuer = self.issuer.issuer(),
            jwks = self.issuer.jwks_url(),
            key = self.dir.path().join("key").display(),
            pem = self.dir.path().join("checkpoint.pem").display(),
            allow = self.dir.path().join("allow.cedar").display(),
        );
        let file = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&file, text).unwrap();
        file
    }

    pub fn files_connector(&self) -> String {
        let data = self.dir.path().join("north");
        if !data.exists() {
            synthesise(
                &SynthSpec {
                    partner: "north".into(),
                    studies: 20,
                    seed: 7,
                },
                &data,
            )
            .unwrap();
        }
        format!(
            "{{ kind = \"files\", path = \"{}\" }}",
            data.join("dicom").display()
        )
    }

    pub fn settings(&self, store: StoreLocation) -> AuditSettings {
        let pem = std::fs::read_to_string(self.dir.path().join("checkpoint.pem")).unwrap();
        use ed25519_dalek::pkcs8::DecodePrivateKey as _;
        AuditSettings {
            store,
            signing_key: Arc::new(ed25519_dalek::SigningKey::from_pkcs8_pem(&pem).unwrap()),
            checkpoint_every_records: 10,
            checkpoint_every: Duration::from_secs(3600),
            checkpoint_file: Some(self.dir.path().join("checkpoints.jsonl")),
        }
    }
}

/// Starts `meshgate serve` and waits until it answers.
pub async fn serve(config: &Path, port: u16) -> Killed {
    let child = Killed(
        meshgate()
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if client
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .is_ok()
        {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the gateway did not start");
}

/// The peak resident set (`VmHWM`) of process `pid` (this one: `None`),
/// in bytes.
pub fn peak_rss(pid: Option<u32>) -> u64 {
    let path = pid.map_or_else(
        || "/proc/self/status".to_owned(),
        |pid| format!("/proc/{pid}/status"),
    );
    let status = std::fs::read_to_string(path).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// A connection to `address` from the loopback address `source`, so that
/// a test can be another client than its attacker.
pub async fn connect_from(
    source: &str,
    address: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    socket.connect(address).await
}
