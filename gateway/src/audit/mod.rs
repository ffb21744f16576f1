//! The tamper-evident audit log.
//!
//! Every GraphQL operation, allowed or refused, becomes one entry, committed
//! before its response leaves. Entries form a hash chain: entry `n` carries
//! the SHA-256 of entry `n - 1`, and its own hash covers its sequence
//! number, time, that previous hash and the record as canonical JSON
//! ([`entry_hash`]). Every N entries or T seconds the chain head is signed
//! with the gateway's Ed25519 key and published as a [`Checkpoint`] (stored,
//! appended to a file, served at `/audit/checkpoint`), so a copy held
//! elsewhere proves later that the tail was not cut or rewritten.
//! [`verify`] checks all of it and names the first bad record.
//!
//! Failing closed: a request whose record cannot be committed gets `503
//! AUDIT_UNAVAILABLE` and no data; [`AuditLog::ready`] is asked before any
//! partner is, so a store known to be down costs no partner calls. An I/O
//! error from the database file (a failed write or fsync) is fatal: the
//! process stops rather than carry on over a log it cannot trust.

mod fhir;
mod store;
mod verify;
pub mod view;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

pub use fhir::audit_event;
pub use store::{Scope, Selection, Store, StoreLocation, StoredEntry};
pub use verify::{Finding, VerifyReport, verify};

use crate::request::AuditRecord;

/// The previous hash of entry 1.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Why the audit log could not do something. The gateway answers `503
/// AUDIT_UNAVAILABLE` for all of them; messages name no credentials.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("the audit log is unavailable: {0}")]
    Unavailable(String),
    /// The database reported an I/O failure on its file: a write or fsync
    /// failed, and what is on disk can no longer be trusted.
    #[error("the audit log's storage failed (I/O error {0})")]
    Io(String),
    #[error("the audit log is misconfigured: {0}")]
    Config(String),
}

impl AuditError {
    fn from_sqlx(error: sqlx::Error) -> AuditError {
        if let sqlx::Error::Database(database) = &error
            && let Some(code) = database.code()
            && let Ok(number) = code.parse::<u32>()
            // SQLITE_IOERR and its extended codes (IOERR_FSYNC, IOERR_WRITE…)
            && number & 0xff == 10
        {
            return AuditError::Io(number.to_string());
        }
        // Only the kind: messages can echo connection details.
        let kind = match &error {
            sqlx::Error::Database(database) => {
                format!("database error {}", database.code().unwrap_or_default())
            }
            sqlx::Error::PoolTimedOut => "no connection within the time limit".into(),
            sqlx::Error::Io(_) => "connection failed".into(),
            sqlx::Error::PoolClosed => "closed".into(),
            _ => "request failed".into(),
        };
        AuditError::Unavailable(kind)
    }
}

/// A signed statement of the chain head: "entry `seq` has hash `hash`".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: i64,
    pub hash: String,
    pub recorded: String,
    /// The first 16 hex digits of the SHA-256 of the public key.
    pub key_id: String,
    /// Ed25519 over [`Checkpoint::message`], base64.
    pub signature: String,
}

impl Checkpoint {
    pub fn message(seq: i64, hash: &str, recorded: &str) -> String {
        format!("meshgate-audit-checkpoint-v1\n{seq}\n{hash}\n{recorded}")
    }

    /// Whether the signature is `key`'s over this checkpoint.
    pub fn signed_by(&self, key: &VerifyingKey) -> bool {
        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(&self.signature) else {
            return false;
        };
        let Ok(signature) = ed25519_dalek::Signature::from_slice(&bytes) else {
            return false;
        };
        key.verify_strict(
            Self::message(self.seq, &self.hash, &self.recorded).as_bytes(),
            &signature,
        )
        .is_ok()
    }
}

/// Writes a key file readable and writable by its owner only (mode 0600),
/// refusing to replace one that exists.
pub fn write_key_file(path: &std::path::Path, text: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(text))
}

/// A new Ed25519 checkpoint key as PKCS#8 PEM (what `[audit]
/// checkpoint_key` reads; `openssl genpkey -algorithm ed25519` makes the
/// same).
pub fn new_checkpoint_key_pem() -> Result<String, AuditError> {
    use ed25519_dalek::pkcs8::EncodePrivateKey as _;
    use rand::RngCore as _;
    let mut seed = [0_u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    SigningKey::from_bytes(&seed)
        .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
        .map(|pem| pem.to_string())
        .map_err(|_| AuditError::Config("a checkpoint key could not be encoded".into()))
}

/// The key id of a public key.
pub fn key_id(key: &VerifyingKey) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What the configuration says about the audit log.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub store: StoreLocation,
    pub signing_key: Arc<SigningKey>,
    pub checkpoint_every_records: i64,
    pub checkpoint_every: Duration,
    pub checkpoint_file: Option<PathBuf>,
}

/// The audit log a gateway appends to and governance reads.
#[derive(Debug)]
pub struct AuditLog {
    store: Store,
    /// Records waiting for the writer, which commits them together.
    queue: mpsc::UnboundedSender<Pending>,
    signing_key: Arc<SigningKey>,
    every_records: i64,
    checkpoint_file: Option<PathBuf>,
    /// The last append failed: check the store before trusting it again.
    failing: AtomicBool,
    /// The highest sequence number checkpointed by this process.
    checkpointed: AtomicI64,
    /// One checkpoint file write at a time.
    file_lock: tokio::sync::Mutex<()>,
}

/// A record waiting to be committed, and who waits for the outcome.
#[derive(Debug)]
struct Pending {
    entry: Entry,
    done: oneshot::Sender<Result<StoredEntry, AuditError>>,
}

/// The most records committed in one transaction.
const MAX_GROUP: usize = 256;

/// Commits what is queued, in groups: each transaction takes every record
/// waiting when it starts (up to [`MAX_GROUP`]), so under load one fsync
/// serves many requests and at rest a record commits alone at once.
async fn write_groups(store: Store, mut queue: mpsc::UnboundedReceiver<Pending>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while queue.recv_many(&mut group, MAX_GROUP).await > 0 {
        let result = store
            .append(group.len(), |index, seq, prev| {
                group[index].entry.chain(seq, prev)
            })
            .await;
        match result {
            Ok(rows) => {
                for (pending, row) in group.drain(..).zip(rows) {
                    let _ = pending.done.send(Ok(row));
                }
            }
            Err(error) => {
                for pending in group.drain(..) {
                    let _ = pending.done.send(Err(error.clone()));
                }
            }
        }
    }
}

/// What happens on a fatal storage error; the binary stops the process.
pub type FatalHandler = Arc<dyn Fn(&AuditError) + Send + Sync>;

impl AuditLog {
    /// Opens the store (creating the tables) and starts the periodic
    /// checkpoint task.
    pub async fn open(settings: &AuditSettings) -> Result<Arc<AuditLog>, AuditError> {
        let store = Store::open(&settings.store).await?;
        let last = store
            .latest_checkpoint()
            .await?
            .map(|c| c.seq)
            .unwrap_or_default();
        let (queue, queued) = mpsc::unbounded_channel();
        tokio::spawn(write_groups(store.clone(), queued));
        let log = Arc::new(AuditLog {
            store,
            queue,
            signing_key: Arc::clone(&settings.signing_key),
            every_records: settings.checkpoint_every_records.max(1),
            checkpoint_file: settings.checkpoint_file.clone(),
            failing: AtomicBool::new(false),
            checkpointed: AtomicI64::new(last),
            file_lock: tokio::sync::Mutex::new(()),
        });
        let weak = Arc::downgrade(&log);
        let every = settings.checkpoint_every.max(Duration::from_secs(1));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(log) = weak.upgrade() else { return };
                if let Err(error) = log.checkpoint_head().await {
                    tracing::warn!(%error, "periodic audit checkpoint failed");
                }
            }
        });
        Ok(log)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing_key.verifying_key()
    }

    /// Asked before a request reaches any partner: whether its record can
    /// be expected to commit.
    pub async fn ready(&self) -> Result<(), AuditError> {
        let result = self.store.ready().await;
        if result.is_ok() && self.failing.swap(false, Ordering::SeqCst) {
            tracing::info!("the audit log is writable again");
        }
        result
    }

    /// Appends one record and returns its sequence number once it is
    /// committed, possibly together with others. Once queued, the record is
    /// committed even if the request that asked for it goes away.
    pub async fn append(
        self: &Arc<Self>,
        record: &AuditRecord,
        fatal: &FatalHandler,
    ) -> Result<i64, AuditError> {
        let entry = Entry::of(record)?;
        let (done, outcome) = oneshot::channel();
        let gone = || AuditError::Unavailable("the audit writer stopped".into());
        let appended = match self.queue.send(Pending { entry, done }) {
            Ok(()) => outcome.await.unwrap_or_else(|_| Err(gone())),
            Err(_) => Err(gone()),
        };
        match appended {
            Ok(row) => {
                if row.seq % self.every_records == 0
                    && let Err(error) = self.checkpoint(row.seq, &row.hash, &row.recorded).await
                {
                    tracing::warn!(%error, seq = row.seq, "audit checkpoint failed");
                }
                Ok(row.seq)
            }
            Err(error) => {
                crate::metrics::METRICS.audit_failure();
                self.failing.store(true, Ordering::SeqCst);
                tracing::error!(%error, "an audit record could not be committed; failing closed");
                if matches!(error, AuditError::Io(_)) {
                    fatal(&error);
                }
                Err(error)
            }
        }
    }

    /// Signs and publishes the current head, if it moved since the last
    /// checkpoint.
    pub async fn checkpoint_head(&self) -> Result<Option<Checkpoint>, AuditError> {
        let (seq, hash) = self.store.head().await?;
        if seq == 0 || seq <= self.checkpointed.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let recorded = self
            .store
            .range(seq - 1, 1)
            .await?
            .first()
            .map(|row| row.recorded.clone())
            .unwrap_or_default();
        self.checkpoint(seq, &hash, &recorded).await.map(Some)
    }

    async fn checkpoint(
        &self,
        seq: i64,
        hash: &str,
        recorded: &str,
    ) -> Result<Checkpoint, AuditError> {
        let signature = self
            .signing_key
            .sign(Checkpoint::message(seq, hash, recorded).as_bytes());
        let checkpoint = Checkpoint {
            seq,
            hash: hash.to_owned(),
            recorded: recorded.to_owned(),
            key_id: key_id(&self.verifying_key()),
            signature: base64::engine::general_purpose::STANDARD.encode(signature.to_bytes()),
        };
        self.store.insert_checkpoint(&checkpoint).await?;
        if let Some(path) = &self.checkpoint_file {
            // The write and its fsync block: not on an async worker.
            let _guard = self.file_lock.lock().await;
            let (path, line) = (path.clone(), checkpoint.clone());
            tokio::task::spawn_blocking(move || append_line(&path, &line))
                .await
                .map_err(std::io::Error::other)
                .and_then(|written| written)
                .map_err(|e| AuditError::Unavailable(format!("checkpoint file: {}", e.kind())))?;
        }
        self.checkpointed.fetch_max(seq, Ordering::SeqCst);
        tracing::info!(seq, "audit checkpoint signed");
        Ok(checkpoint)
    }

    /// The newest checkpoint, if any.
    pub async fn latest_checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        self.store.latest_checkpoint().await
    }
}

fn append_line(path: &std::path::Path, checkpoint: &Checkpoint) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let line = serde_json::to_string(checkpoint).map_err(std::io::Error::other)?;
    file.write_all(format!("{line}\n").as_bytes())?;
    file.sync_all()
}

/// A record ready to be chained: its canonical JSON and indexed columns.
#[derive(Debug, Clone)]
struct Entry {
    recorded: String,
    record: String,
    issuer: Option<String>,
    subject: Option<String>,
    institution: Option<String>,
    outcome: String,
    projects: String,
    partners: String,
}

impl Entry {
    fn of(record: &AuditRecord) -> Result<Entry, AuditError> {
        let value = serde_json::to_value(record)
            .map_err(|_| AuditError::Unavailable("the record could not be encoded".into()))?;
        let recorded = now_rfc3339();
        Ok(Entry::from_canonical(recorded, canonical_json(&value)))
    }

    /// The indexed columns, derived from the record itself (so `verify`
    /// can check them too).
    fn from_canonical(recorded: String, record: String) -> Entry {
        let value: Value = serde_json::from_str(&record).unwrap_or(Value::Null);
        let text = |pointer: &str| {
            value
                .pointer(pointer)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let mut projects = std::collections::BTreeSet::new();
        let mut partners = std::collections::BTreeSet::new();
        for access in value["accesses"].as_array().into_iter().flatten() {
            if let Some(project) = access["project"].as_str() {
                projects.insert(project.to_owned());
            }
            for partner in access["partners"].as_array().into_iter().flatten() {
                if let Some(id) = partner["partner"].as_str() {
                    partners.insert(id.to_owned());
                }
            }
        }
        let delimited = |set: std::collections::BTreeSet<String>| {
            if set.is_empty() {
                ",".to_owned()
            } else {
                format!(",{},", set.into_iter().collect::<Vec<_>>().join(","))
            }
        };
        Entry {
            issuer: text("/principal/issuer"),
            subject: text("/principal/subject"),
            institution: text("/principal/institution"),
            outcome: text("/outcome").unwrap_or_default(),
            projects: delimited(projects),
            partners: delimited(partners),
            recorded,
            record,
        }
    }

    fn chain(&self, seq: i64, prev_hash: &str) -> StoredEntry {
        StoredEntry {
            seq,
            hash: entry_hash(seq, &self.recorded, prev_hash, &self.record),
            prev_hash: prev_hash.to_owned(),
            recorded: self.recorded.clone(),
            issuer: self.issuer.clone(),
            subject: self.subject.clone(),
            institution: self.institution.clone(),
            outcome: self.outcome.clone(),
            projects: self.projects.clone(),
            partners: self.partners.clone(),
            record: self.record.clone(),
        }
    }
}

/// The hash of one entry: SHA-256, lower-case hex, over
/// `meshgate-audit-v1 \n seq \n recorded \n prev_hash \n record`.
pub fn entry_hash(seq: i64, recorded: &str, prev_hash: &str, record: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(format!("meshgate-audit-v1\n{seq}\n{recorded}\n{prev_hash}\n").as_bytes());
    hasher.update(record.as_bytes());
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// JSON with object keys sorted at every level and no insignificant
/// whitespace: one encoding per value, whatever produced it.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (index, key) in keys.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                if let Some(inner) = map.get(key) {
                    write_canonical(inner, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Now, as RFC 3339 UTC with milliseconds: sorts as it reads.
pub fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

/// A time as RFC 3339 UTC with milliseconds, the gateway's one timestamp form.
pub fn rfc3339(at: time::OffsetDateTime) -> String {
    at.to_offset(time::UtcOffset::UTC)
        .format(time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        ))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let value = serde_json::json!({"b": 1, "a": {"d": [true, null], "c": "x"}});
        assert_eq!(
            canonical_json(&value),
            r#"{"a":{"c":"x","d":[true,null]},"b":1}"#
        );
    }

    #[test]
    fn indexed_columns_come_from_the_record() {
        let entry = Entry::from_canonical(
            "2026-01-01T00:00:00.000Z".into(),
            r#"{"accesses":[{"partners":[{"partner":"south"},{"partner":"north"}],"project":"p1"}],"outcome":"success","principal":{"issuer":"i","subject":"s"}}"#.into(),
        );
        assert_eq!(entry.partners, ",north,south,");
        assert_eq!(entry.projects, ",p1,");
        assert_eq!(entry.subject.as_deref(), Some("s"));
        assert_eq!(entry.outcome, "success");
    }
}
