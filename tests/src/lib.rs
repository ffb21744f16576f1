//! End-to-end test harness: real Orthanc servers with the DICOMweb plugin,
//! synthetic partners loaded into them, and the real gateway served over
//! HTTP on port 0.
//!
//! Where to start reading: [`Orthanc`] starts and loads a server,
//! [`Gateway`] starts meshgate in front of partners, [`TcpProxy`] sits in
//! between to delay traffic or prove that none was sent, and
//! [`GroundTruth`] answers cohort questions from the synthesiser's
//! manifests, independently of the query path.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test harness: failing loudly is the point"
)]

pub mod cloud;
pub mod healthimaging;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use meshgate_gateway::config::ProcessEnvironment;
use meshgate_gateway::demo::{DEMO_PARTNERS, DEMO_PROJECTS};
use meshgate_gateway::dev_issuer::DevIssuer;
use meshgate_gateway::synth::{DICOM_DIR, ManifestRow, SynthSpec, synthesise};
use meshgate_gateway::{Config, build_app, run, start};
use serde_json::{Value, json};
use time::macros::date;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// The Orthanc binary (Debian package `orthanc`); override with `ORTHANC_BIN`.
fn orthanc_bin() -> String {
    std::env::var("ORTHANC_BIN").unwrap_or_else(|_| "Orthanc".to_owned())
}

/// The DICOMweb plugin (Debian package `orthanc-dicomweb`); override with
/// `ORTHANC_DICOMWEB_PLUGIN`.
fn dicomweb_plugin() -> String {
    std::env::var("ORTHANC_DICOMWEB_PLUGIN")
        .unwrap_or_else(|_| "/usr/share/orthanc/plugins/libOrthancDicomWeb.so".to_owned())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A synthetic partner written to a temporary folder.
#[derive(Debug)]
pub struct SyntheticPartner {
    pub id: String,
    pub dir: tempfile::TempDir,
    pub manifest: Vec<ManifestRow>,
}

impl SyntheticPartner {
    pub fn new(id: &str, studies: usize, seed: u64) -> SyntheticPartner {
        let dir = tempfile::tempdir().unwrap();
        let manifest = synthesise(
            &SynthSpec {
                partner: id.to_owned(),
                studies,
                seed,
            },
            dir.path(),
        )
        .unwrap();
        SyntheticPartner {
            id: id.to_owned(),
            dir,
            manifest,
        }
    }

    pub fn dicom_dir(&self) -> PathBuf {
        self.dir.path().join(DICOM_DIR)
    }

    /// Every DICOM file the partner holds, in path order.
    pub fn dicom_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        collect_files(&self.dicom_dir(), &mut files);
        files.sort();
        files
    }

    /// Every identifying value in the partner's DICOM files, read from the
    /// files themselves: patient names, IDs, birth dates (as DICOM and ISO
    /// dates), accession numbers, and study, series and SOP instance UIDs.
    pub fn identifiers(&self) -> Vec<String> {
        use dicom_dictionary_std::tags;
        let mut found = std::collections::BTreeSet::new();
        for path in self.dicom_files() {
            let object = dicom_object::OpenFileOptions::new()
                .read_until(tags::PIXEL_DATA)
                .open_file(&path)
                .unwrap();
            for tag in [
                tags::PATIENT_NAME,
                tags::PATIENT_ID,
                tags::PATIENT_BIRTH_DATE,
                tags::ACCESSION_NUMBER,
                tags::STUDY_INSTANCE_UID,
                tags::SERIES_INSTANCE_UID,
                tags::SOP_INSTANCE_UID,
            ] {
                let value = object.element(tag).unwrap().to_str().unwrap();
                let value = value.trim_end_matches(['\0', ' ']).to_owned();
                // The ISO form only for births before 2000: later ones
                // could equal a (shifted) study date, which may be shown.
                if tag == tags::PATIENT_BIRTH_DATE && value.len() == 8 && value.as_str() < "2000" {
                    found.insert(format!("{}-{}-{}", &value[..4], &value[4..6], &value[6..]));
                }
                found.insert(value);
            }
        }
        found.into_iter().filter(|v| !v.is_empty()).collect()
    }
}

/// A running Orthanc with the DICOMweb plugin, on a free port with its own
/// storage. Killed when dropped.
#[derive(Debug)]
pub struct Orthanc {
    child: Option<Child>,
    pub port: u16,
    _storage: tempfile::TempDir,
}

impl Orthanc {
    /// Starts an Orthanc on a free port. A free port can be taken by another
    /// test between choosing it and Orthanc binding it, so the server that
    /// answers must be this one (a unique name), or it is started again on
    /// another port.
    pub async fn start(name: &str) -> Orthanc {
        static STARTED: AtomicU64 = AtomicU64::new(0);
        for _ in 0..5 {
            let unique = format!(
                "{name}-{}-{}",
                std::process::id(),
                STARTED.fetch_add(1, Ordering::SeqCst)
            );
            if let Some(orthanc) = Orthanc::try_start(&unique).await {
                return orthanc;
            }
        }
        panic!("Orthanc {name} did not start on any of 5 ports");
    }

    async fn try_start(name: &str) -> Option<Orthanc> {
        let storage = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = json!({
            "Name": name,
            "StorageDirectory": storage.path().join("db"),
            "IndexDirectory": storage.path().join("db"),
            "HttpPort": port,
            "DicomServerEnabled": false,
            "DicomPort": free_port(),
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "HttpDescribeErrors": false,
            "StableAge": 1,
            "Plugins": [dicomweb_plugin()],
            "DicomWeb": {"Enable": true, "Root": "/dicom-web/"},
        });
        let config_path = storage.path().join("orthanc.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let log = std::fs::File::create(storage.path().join("orthanc.log")).unwrap();
        let child = Command::new(orthanc_bin())
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start Orthanc ({}): {e}; install the Debian packages orthanc and orthanc-dicomweb", orthanc_bin()));
        let mut orthanc = Orthanc {
            child: Some(child),
            port,
            _storage: storage,
        };
        let client = reqwest::Client::new();
        // Up to 30 s: a first start on a fresh machine creates the index.
        for _ in 0..600 {
            if orthanc
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some())
            {
                return None; // it exited: most likely the port was taken
            }
            let ready = client
                .get(format!("{}/dicom-web/studies?limit=1", orthanc.url()))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                let system: Value = client
                    .get(format!("{}/system", orthanc.url()))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                // Another test's Orthanc on the same port is not ours.
                return (system["Name"] == name).then_some(orthanc);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn dicomweb_url(&self) -> String {
        format!("{}/dicom-web/", self.url())
    }

    /// Uploads every DICOM file of a partner through Orthanc's REST API.
    pub async fn load(&self, partner: &SyntheticPartner) {
        let files = partner.dicom_files();
        let client = reqwest::Client::new();
        let url = format!("{}/instances", self.url());
        let uploads = files.into_iter().map(|path| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let body = tokio::fs::read(&path).await.unwrap();
                // Storing an instance is idempotent: a connection Orthanc
                // closed under the request is simply tried again.
                let mut last = String::new();
                for _ in 0..3 {
                    match client.post(&url).body(body.clone()).send().await {
                        Ok(response) if response.status().is_success() => return,
                        Ok(response) => last = response.status().to_string(),
                        Err(error) => last = error.to_string(),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                panic!("Orthanc refused {}: {last}", path.display());
            }
        });
        use futures::StreamExt as _;
        // A few uploads in flight at once; Orthanc indexes serially anyway.
        futures::stream::iter(uploads)
            .buffer_unordered(8)
            .collect::<Vec<()>>()
            .await;
    }

    /// Stops the server (SIGKILL), as a partner outage would.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// A TCP proxy that counts the bytes and HTTP GET requests clients send
/// upstream and can hold each connection's traffic back for a while (a
/// slow partner).
#[derive(Debug)]
pub struct TcpProxy {
    pub address: SocketAddr,
    upstream: Arc<std::sync::Mutex<SocketAddr>>,
    sent: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    _stop: oneshot::Sender<()>,
}

impl TcpProxy {
    pub async fn start(upstream: SocketAddr, delay: Duration) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let target = Arc::new(std::sync::Mutex::new(upstream));
        let upstream_now = Arc::clone(&target);
        let (stop, mut stopped) = oneshot::channel::<()>();
        let counter = Arc::clone(&sent);
        let request_counter = Arc::clone(&requests);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = &mut stopped => return,
                };
                let Ok((mut client, _)) = accepted else {
                    return;
                };
                let counter = Arc::clone(&counter);
                let request_counter = Arc::clone(&request_counter);
                let upstream = *upstream_now.lock().unwrap();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.split();
                    let (mut server_read, mut server_write) = server.split();
                    let upstream_leg = async {
                        let mut buffer = vec![0u8; 16 * 1024];
                        loop {
                            use tokio::io::AsyncReadExt;
                            let n = match client_read.read(&mut buffer).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            counter.fetch_add(n as u64, Ordering::SeqCst);
                            // GETs carry no body: each "GET /" starts a request.
                            let gets = buffer[..n].windows(5).filter(|w| w == b"GET /").count();
                            request_counter.fetch_add(gets as u64, Ordering::SeqCst);
                            tokio::time::sleep(delay).await;
                            if server_write.write_all(&buffer[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = server_write.shutdown().await;
                    };
                    let downstream_leg = async {
                        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                        let _ = client_write.shutdown().await;
                    };
                    tokio::join!(upstream_leg, downstream_leg);
                });
            }
        });
        TcpProxy {
            address,
            upstream: target,
            sent,
            requests,
            _stop: stop,
        }
    }

    /// Bytes clients have sent upstream so far.
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Sends new connections to `upstream` from now on (a partner moved or
    /// came back).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.upstream.lock().unwrap() = upstream;
    }

    /// HTTP GET requests clients have sent upstream so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("http://{}/dicom-web/", self.address)
    }
}

/// A synthetic partner loaded into its own Orthanc and reached through a
/// proxy that counts the bytes the gateway sends it.
#[derive(Debug)]
pub struct OrthancPartner {
    pub data: SyntheticPartner,
    pub orthanc: Orthanc,
    pub proxy: TcpProxy,
}

impl OrthancPartner {
    pub async fn start(id: &str, studies: usize, seed: u64) -> OrthancPartner {
        let data = SyntheticPartner::new(id, studies, seed);
        let orthanc = Orthanc::start(id).await;
        orthanc.load(&data).await;
        let proxy = TcpProxy::start(
            format!("127.0.0.1:{}", orthanc.port).parse().unwrap(),
            Duration::ZERO,
        )
        .await;
        OrthancPartner {
            data,
            orthanc,
            proxy,
        }
    }

    /// Its `[[partners]]` table, reaching it through the proxy.
    pub fn table(&self, deadline_ms: u64, page_size: Option<u32>) -> String {
        dicomweb_partner(&self.data.id, &self.proxy.url(), deadline_ms, page_size)
    }
}

/// Which policies a test gateway runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policies {
    /// Test-only policies: anyone approved for project `ground-truth` reads
    /// identified records from every partner, so answers can be compared
    /// with the synthesiser's manifests.
    GroundTruth,
    /// The shipped example policies (`policies/examples`) with the demo's
    /// partners (north, south, east) and projects (demo, lung-cancer).
    Examples,
}

/// The project the ground-truth policies serve.
pub const GROUND_TRUTH_PROJECT: &str = "ground-truth";

/// The one institution [`Gateway::partner_issuer`] is trusted for.
pub const PARTNER_ISSUER_INSTITUTION: &str = "eastbrook-imaging-institute";

/// What a Prometheus scraper presents for the test gateway's `/metrics`.
pub const METRICS_TOKEN: &str = "test-scraper-token-5b1e";

/// A running gateway with its own development token issuer (a real JWKS
/// over HTTP), stopped when dropped.
#[derive(Debug)]
pub struct Gateway {
    pub url: String,
    pub issuer: DevIssuer,
    /// A second trusted issuer, a partner's own: trusted only for
    /// researchers of [`PARTNER_ISSUER_INSTITUTION`], in any project.
    pub partner_issuer: DevIssuer,
    /// A researcher approved for the ground-truth and example projects.
    pub token: String,
    client: reqwest::Client,
    /// The configuration it runs with (its audit log is `audit.db` beside it).
    pub config_file: PathBuf,
    /// Its partners, policies and issuers in force; reloads them.
    pub registry: std::sync::Arc<meshgate_gateway::registry::Registry>,
    _dir: tempfile::TempDir,
    _stop: oneshot::Sender<()>,
}

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

impl Gateway {
    /// Starts a gateway whose `[[partners]]` tables are `partners_toml`,
    /// under the ground-truth policies.
    pub async fn start(partners_toml: &str) -> Gateway {
        Gateway::start_with(partners_toml, Policies::GroundTruth).await
    }

    /// Starts a gateway whose `[[partners]]` tables are `partners_toml`;
    /// each partner's institution, data use and policies come from `policies`.
    pub async fn start_with(partners_toml: &str, policies: Policies) -> Gateway {
        Gateway::start_with_kinds(
            partners_toml,
            policies,
            &meshgate_connectors::kind::builtin(),
        )
        .await
    }

    /// [`Gateway::start_with`], its connectors of `kinds`.
    pub async fn start_with_kinds(
        partners_toml: &str,
        policies: Policies,
        kinds: &[meshgate_connectors::kind::Kind],
    ) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let issuer = DevIssuer::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let partner_issuer = DevIssuer::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let key = dir.path().join("pseudonym.key");
        std::fs::write(&key, PSEUDONYM_KEY).unwrap();
        std::fs::write(dir.path().join("metrics.token"), METRICS_TOKEN).unwrap();
        let checkpoint_key = dir.path().join("checkpoint-key.pem");
        std::fs::write(
            &checkpoint_key,
            meshgate_gateway::audit::new_checkpoint_key_pem().unwrap(),
        )
        .unwrap();
        let allow = dir.path().join("allow.cedar");
        std::fs::write(
            &allow,
            "permit (principal, action in Meshgate::Action::\"QueryStudies\", resource)\n\
             when { principal.projects.contains(context.project) };\n",
        )
        .unwrap();

        let mut partners: toml::Table = toml::from_str(partners_toml).unwrap();
        for partner in partners["partners"].as_array_mut().unwrap() {
            let table = partner.as_table_mut().unwrap();
            let id = table["id"].as_str().unwrap().to_owned();
            let (institution, data_use, policy) = match policies {
                Policies::GroundTruth => (
                    format!("{id}-hospital"),
                    "DUO:0000042".to_owned(),
                    allow.clone(),
                ),
                Policies::Examples => {
                    let demo = DEMO_PARTNERS
                        .iter()
                        .find(|p| p.id == id)
                        .expect("example policies exist for north, south and east");
                    (
                        demo.institution.to_owned(),
                        demo.data_use.to_owned(),
                        repository().join(format!("policies/examples/partners/{id}.cedar")),
                    )
                }
            };
            table.insert("institution".into(), institution.into());
            table.insert(
                "data_use".into(),
                toml::Value::Table(toml::Table::from_iter([(
                    "permission".to_owned(),
                    data_use.into(),
                )])),
            );
            table.insert(
                "policies".into(),
                vec![toml::Value::from(policy.display().to_string())].into(),
            );
        }
        let (consortium, projects) = match policies {
            Policies::GroundTruth => (
                allow.display().to_string(),
                format!(
                    "[[projects]]\nid = \"{GROUND_TRUTH_PROJECT}\"\ntitle = \"Ground truth\"\npurposes = [\"DUO:0000042\"]\n"
                ),
            ),
            Policies::Examples => (
                repository()
                    .join("policies/examples/consortium")
                    .display()
                    .to_string(),
                DEMO_PROJECTS
                    .iter()
                    .map(|(id, title, purpose)| {
                        format!(
                            "[[projects]]\nid = \"{id}\"\ntitle = \"{title}\"\npurposes = [\"{purpose}\"]\nethics_approved = true\n"
                        )
                    })
                    .collect(),
            ),
        };
        let text = format!(
            "listen = \"127.0.0.1:0\"\n\n[auth]\n[[auth.issuers]]\nissuer = {issuer}\naudiences = [\"meshgate\"]\njwks_url = {jwks}\nalgorithms = [\"EdDSA\"]\ntrusted_for = {{ institutions = [\"*\"], roles = [\"*\"], projects = [\"*\"], permissions = [\"*\"] }}\n\n\
             [[auth.issuers]]\nissuer = {partner_issuer}\naudiences = [\"meshgate\"]\njwks_url = {partner_jwks}\nalgorithms = [\"EdDSA\"]\n\
             trusted_for = {{ institutions = [\"{PARTNER_ISSUER_INSTITUTION}\"], roles = [\"researcher\"], projects = [\"*\"] }}\n\n\
             [policies]\nconsortium = [{consortium}]\n\n[deidentification]\nkey = {key}\n\n\
             [audit]\nstore = \"sqlite:audit.db\"\ncheckpoint_key = {checkpoint_key}\ncheckpoint_every_records = 10\ncheckpoint_file = \"checkpoints.jsonl\"\n\n\
             [server]\nper_principal = {{ concurrent = 64, per_second = 10000.0, burst = 10000 }}\nper_address = {{ concurrent = 64, per_second = 10000.0, burst = 10000 }}\n\n\
             [metrics]\ntoken = \"${{file:metrics.token}}\"\n\n{projects}\n{partners}",
            issuer = toml_string(issuer.issuer()),
            jwks = toml_string(&issuer.jwks_url()),
            partner_issuer = toml_string(partner_issuer.issuer()),
            partner_jwks = toml_string(&partner_issuer.jwks_url()),
            consortium = toml_string(&consortium),
            key = toml_string(&format!("${{file:{}}}", key.display())),
            checkpoint_key = toml_string(&format!("${{file:{}}}", checkpoint_key.display())),
            partners = toml::to_string(&partners).unwrap(),
        );
        let config_file = dir.path().join("e2e.toml");
        std::fs::write(&config_file, &text).unwrap();
        let loaded = Config::from_toml_with(&text, &config_file, &ProcessEnvironment, kinds)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        let gateway = start(&loaded).await.unwrap();
        let registry = std::sync::Arc::clone(&gateway.registry);
        let server = gateway.server;
        let app = build_app(gateway);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/graphql", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            run(listener, app, &server, async {
                let _ = stopped.await;
            })
            .await
        });
        let token = issuer.token(
            &json!({
                "sub": "e2e-researcher",
                "institution": "e2e-university",
                "roles": ["researcher"],
                "projects": [GROUND_TRUTH_PROJECT, "demo", "lung-cancer"],
            }),
            Duration::from_secs(3600),
        );
        Gateway {
            url,
            issuer,
            partner_issuer,
            token,
            client: reqwest::Client::new(),
            config_file,
            registry,
            _dir: dir,
            _stop: stop,
        }
    }

    /// Sends a GraphQL query as the default researcher; returns the HTTP
    /// status and the JSON body.
    pub async fn post(&self, query: &str, variables: Value) -> (u16, Value) {
        self.post_as(Some(&self.token), query, variables).await
    }

    /// Sends a GraphQL query with this bearer token (or none).
    pub async fn post_as(
        &self,
        token: Option<&str>,
        query: &str,
        variables: Value,
    ) -> (u16, Value) {
        let (status, bytes) = self.post_raw(token, query, variables).await;
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    /// Sends a GraphQL query; returns the status and the raw response body.
    pub async fn post_raw(
        &self,
        token: Option<&str>,
        query: &str,
        variables: Value,
    ) -> (u16, Vec<u8>) {
        let mut request = self
            .client
            .post(&self.url)
            .json(&json!({"query": query, "variables": variables}));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.bytes().await.unwrap().to_vec())
    }

    /// `/metrics` as the scraper reads it.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url.replace("/graphql", "/metrics"))
            .bearer_auth(METRICS_TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Sends a GraphQL query that must succeed without errors; returns `data`.
    pub async fn query(&self, query: &str, variables: Value) -> Value {
        let (status, body) = self.post(query, variables).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.get("errors").is_none(), "unexpected errors: {body}");
        body["data"].clone()
    }
}

/// A `[[partners]]` table for a DICOMweb partner.
pub fn dicomweb_partner(id: &str, url: &str, deadline_ms: u64, page_size: Option<u32>) -> String {
    let page_size = page_size
        .map(|n| format!("page_size = {n}\n"))
        .unwrap_or_default();
    format!(
        "[[partners]]\nid = \"{id}\"\nname = \"{id} hospital\"\ndeadline_ms = {deadline_ms}\nutc_offset = \"+01:00\"\n[partners.connector]\nkind = \"dicomweb\"\nprofile = \"orthanc\"\nurl = \"{url}\"\n{page_size}\n"
    )
}

/// A `[[partners]]` table for a files partner.
pub fn files_partner(id: &str, dir: &Path) -> String {
    format!(
        "[[partners]]\nid = \"{id}\"\nname = \"{id} archive\"\nconnector = {{ kind = \"files\", path = {} }}\n\n",
        toml_string(&dir.display().to_string())
    )
}

fn toml_string(text: &str) -> String {
    serde_json::to_string(text).unwrap()
}

/// The pseudonymisation key of every test gateway.
pub const PSEUDONYM_KEY: &str = "test pseudonymisation key material, 32+ bytes";

/// How a partner that de-identifies with shifted dates shows one of its
/// studies in `project`: its pseudonymous UID and its shifted date.
pub fn released(project: &str, partner: &str, row: &ManifestRow) -> (String, time::Date) {
    use meshgate_policies::deid::DeidOption;
    use meshgate_policies::{Deidentifier, MasterKey, Profile};
    let deid = Deidentifier::new(
        MasterKey::new(PSEUDONYM_KEY.as_bytes())
            .unwrap()
            .project_key(project),
        Profile::with([DeidOption::RetainLongitudinalModifiedDates]),
        partner,
    );
    let study = meshgate_schema::Study {
        uid: row.study_uid.clone(),
        patient_id: Some(row.patient_id.clone()),
        date: Some(row.study_date),
        ..Default::default()
    };
    (
        deid.uid(&row.study_uid),
        deid.released_date(&study).unwrap(),
    )
}

/// Expected answers computed from the synthesiser's manifests.
#[derive(Debug, Default)]
pub struct GroundTruth {
    rows: Vec<(String, ManifestRow)>,
}

/// A cohort question, asked of the ground truth directly.
#[derive(Debug, Clone, Default)]
pub struct Cohort {
    pub modalities: Vec<&'static str>,
    pub body_part: Option<&'static str>,
    pub from: Option<time::Date>,
    pub to: Option<time::Date>,
    pub description: Option<&'static str>,
    pub sex: Option<&'static str>,
    pub min_age: Option<u16>,
    pub max_age: Option<u16>,
    pub study_uids: Option<Vec<String>>,
    pub partners: Option<Vec<&'static str>>,
}

impl Cohort {
    /// The same question as a GraphQL `StudyFilter`.
    pub fn filter(&self) -> Value {
        let mut filter = serde_json::Map::new();
        if !self.modalities.is_empty() {
            filter.insert("modalities".into(), json!(self.modalities));
        }
        if let Some(part) = self.body_part {
            filter.insert("bodyPart".into(), json!(part));
        }
        if self.from.is_some() || self.to.is_some() {
            filter.insert("studyDate".into(), json!({"from": self.from.map(|d| d.to_string()), "to": self.to.map(|d| d.to_string())}));
        }
        if let Some(text) = self.description {
            filter.insert("description".into(), json!(text));
        }
        if let Some(sex) = self.sex {
            filter.insert(
                "patientSex".into(),
                json!(match sex {
                    "F" => "FEMALE",
                    "M" => "MALE",
                    _ => "OTHER",
                }),
            );
        }
        if self.min_age.is_some() || self.max_age.is_some() {
            filter.insert(
                "patientAge".into(),
                json!({"min": self.min_age, "max": self.max_age}),
            );
        }
        if let Some(uids) = &self.study_uids {
            filter.insert("studyInstanceUids".into(), json!(uids));
        }
        if let Some(partners) = &self.partners {
            filter.insert("partners".into(), json!(partners));
        }
        Value::Object(filter)
    }

    fn matches(&self, partner: &str, row: &ManifestRow) -> bool {
        // Modality and body part must hold for the same series.
        row.series.iter().any(|series| {
            (self.modalities.is_empty() || self.modalities.contains(&series.modality.as_str()))
                && self.body_part.is_none_or(|p| series.body_part == p)
        }) && self.from.is_none_or(|d| row.study_date >= d)
            && self.to.is_none_or(|d| row.study_date <= d)
            && self
                .description
                .is_none_or(|t| row.description.to_lowercase().contains(&t.to_lowercase()))
            && self.sex.is_none_or(|s| row.patient_sex == s)
            && self.min_age.is_none_or(|a| row.patient_age >= a)
            && self.max_age.is_none_or(|a| row.patient_age <= a)
            && self
                .study_uids
                .as_ref()
                .is_none_or(|uids| uids.contains(&row.study_uid))
            && self
                .partners
                .as_ref()
                .is_none_or(|ps| ps.contains(&partner))
    }
}

impl GroundTruth {
    pub fn add(&mut self, partner: &SyntheticPartner) {
        self.rows.extend(
            partner
                .manifest
                .iter()
                .map(|row| (partner.id.clone(), row.clone())),
        );
    }

    /// Every matching (partner, study UID), in the gateway's documented
    /// order: newest first, then partner id, then study UID.
    pub fn answer(&self, cohort: &Cohort) -> Vec<(String, String)> {
        let mut matching: Vec<&(String, ManifestRow)> = self
            .rows
            .iter()
            .filter(|(partner, row)| cohort.matches(partner, row))
            .collect();
        matching.sort_by(|(pa, a), (pb, b)| {
            (b.study_date, b.study_time)
                .cmp(&(a.study_date, a.study_time))
                .then_with(|| pa.cmp(pb))
                .then_with(|| a.study_uid.cmp(&b.study_uid))
        });
        matching
            .into_iter()
            .map(|(p, row)| (p.clone(), row.study_uid.clone()))
            .collect()
    }

    pub fn rows(&self) -> impl Iterator<Item = &(String, ManifestRow)> {
        self.rows.iter()
    }
}

/// Validates ImagingStudy resources with the independent validator.
pub fn validate_imaging_studies(resources: &[Value]) {
    validate_fhir("ImagingStudy", resources);
}

/// Validates FHIR R4 resources of one type with the independent validator
/// in `tests/fhir/validate.py` (Python `fhir.resources`).
pub fn validate_fhir(resource_type: &str, resources: &[Value]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fhir/validate.py");
    let mut child = Command::new("python3")
        .arg(script)
        .arg(resource_type)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed for FHIR validation");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(serde_json::to_string(resources).unwrap().as_bytes())
            .unwrap();
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "FHIR validation failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

// ---------------------------------------------------------------------------
// Cohort cases shared by the search suites.

pub const PAGE_QUERY: &str = r#"
query Page($filter: StudyFilter, $first: Int!, $after: String) {
  imagingStudies(project: "ground-truth", filter: $filter, first: $first, after: $after) {
    nodes { studyInstanceUid partner connectorKind started modalities fhir }
    pageInfo { hasNextPage endCursor }
    totalCount
    partners { partner status count latencyMs code }
  }
}"#;

pub const COUNT_QUERY: &str = r#"
query Count($filter: StudyFilter) {
  cohortCount(project: "ground-truth", filter: $filter) { total complete partners { partner status count } }
}"#;

/// Walks every page of a query; returns the (partner, uid) sequence and all FHIR resources.
pub async fn walk(
    gateway: &Gateway,
    filter: &Value,
    first: i64,
) -> (Vec<(String, String)>, Vec<Value>) {
    let mut seen = Vec::new();
    let mut resources = Vec::new();
    let mut after = Value::Null;
    loop {
        let data = gateway
            .query(
                PAGE_QUERY,
                json!({"filter": filter, "first": first, "after": after}),
            )
            .await;
        let page = &data["imagingStudies"];
        for status in page["partners"].as_array().unwrap() {
            assert_eq!(status["status"], "OK", "{status}");
        }
        let nodes = page["nodes"].as_array().unwrap();
        assert!(nodes.len() <= first as usize);
        for node in nodes {
            seen.push((
                node["partner"].as_str().unwrap().to_owned(),
                node["studyInstanceUid"].as_str().unwrap().to_owned(),
            ));
            resources.push(node["fhir"].clone());
        }
        if !page["pageInfo"]["hasNextPage"].as_bool().unwrap() {
            return (seen, resources);
        }
        after = page["pageInfo"]["endCursor"].clone();
        assert!(seen.len() < 10_000, "paging does not end");
    }
}

/// The cohort cases every search suite runs; `two` names two of its partners.
pub fn cohorts(truth: &GroundTruth, two: [&'static str; 2]) -> Vec<(&'static str, Cohort)> {
    let some_uids: Vec<String> = truth
        .rows()
        .step_by(9)
        .map(|(_, row)| row.study_uid.clone())
        .collect();
    let mut cases = vec![
        ("everything", Cohort::default()),
        (
            "CT or MR of the chest, 2018 to 2022",
            Cohort {
                modalities: vec!["CT", "MR"],
                body_part: Some("CHEST"),
                from: Some(date!(2018 - 01 - 01)),
                to: Some(date!(2022 - 12 - 31)),
                ..Cohort::default()
            },
        ),
        (
            "women aged 50 to 70",
            Cohort {
                sex: Some("F"),
                min_age: Some(50),
                max_age: Some(70),
                ..Cohort::default()
            },
        ),
        (
            "description contains 'with contrast'",
            Cohort {
                description: Some("WITH contrast"),
                ..Cohort::default()
            },
        ),
        (
            "studies on the first day of 2015 exactly",
            Cohort {
                from: Some(date!(2015 - 01 - 01)),
                to: Some(date!(2015 - 01 - 01)),
                ..Cohort::default()
            },
        ),
        (
            "open-ended date range since 2024",
            Cohort {
                from: Some(date!(2024 - 01 - 01)),
                ..Cohort::default()
            },
        ),
        (
            "open-ended date range until 2006",
            Cohort {
                to: Some(date!(2006 - 12 - 31)),
                ..Cohort::default()
            },
        ),
        (
            "a body part nobody has",
            Cohort {
                body_part: Some("TAIL"),
                ..Cohort::default()
            },
        ),
        (
            "named studies",
            Cohort {
                study_uids: Some(some_uids),
                ..Cohort::default()
            },
        ),
        (
            "only two partners",
            Cohort {
                partners: Some(two.to_vec()),
                modalities: vec!["CR", "DX"],
                ..Cohort::default()
            },
        ),
        (
            "men over 80 with NM or PT",
            Cohort {
                sex: Some("M"),
                min_age: Some(80),
                modalities: vec!["NM", "PT"],
                ..Cohort::default()
            },
        ),
        (
            "knee MR since 2010",
            Cohort {
                modalities: vec!["MR"],
                body_part: Some("KNEE"),
                from: Some(date!(2010 - 01 - 01)),
                ..Cohort::default()
            },
        ),
        (
            "empty result: no studies in the future",
            Cohort {
                from: Some(date!(2030 - 01 - 01)),
                ..Cohort::default()
            },
        ),
    ];
    for modality in ["CT", "MR", "CR", "DX", "US", "PT", "MG", "NM"] {
        cases.push((
            "each modality",
            Cohort {
                modalities: vec![modality],
                ..Cohort::default()
            },
        ));
    }
    cases
}

/// Every cohort case: the count and the fully paged studies equal the
/// ground truth, in order, and every partner answered completely.
pub async fn cohort_counts_and_every_page_equal_the_ground_truth(
    gateway: &Gateway,
    truth: &GroundTruth,
    two: [&'static str; 2],
) {
    let cases = cohorts(truth, two);
    let mut non_empty = 0;
    for (name, cohort) in &cases {
        let expected = truth.answer(cohort);
        non_empty += usize::from(!expected.is_empty());
        let count = gateway
            .query(COUNT_QUERY, json!({"filter": cohort.filter()}))
            .await;
        assert_eq!(
            count["cohortCount"]["total"],
            expected.len(),
            "count of {name} ({cohort:?}): {count}, expected {expected:?}"
        );
        assert_eq!(count["cohortCount"]["complete"], true, "{name}: {count}");
        let (studies, _) = walk(gateway, &cohort.filter(), 25).await;
        assert_eq!(studies, expected, "studies of {name} ({cohort:?})");
    }
    assert!(
        non_empty >= 15,
        "too few cases have answers to mean much: {non_empty}"
    );
}
