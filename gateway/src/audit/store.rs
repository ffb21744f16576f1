//! Where audit entries are kept: an SQLite file (the embedded default) or a
//! PostgreSQL database shared by several gateway replicas. The same SQL
//! serves both; the sequence number and the chain are assigned inside the
//! database transaction, so concurrent writers keep one gap-free chain.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Executor, Row};

use super::{AuditError, Checkpoint, GENESIS};

/// Where the audit log lives.
#[derive(Debug, Clone)]
pub enum StoreLocation {
    /// An SQLite file, created if missing.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL (it may carry a password: never logged).
    Postgres(meshgate_connectors::Secret),
}

/// One stored entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    pub seq: i64,
    pub recorded: String,
    pub prev_hash: String,
    pub hash: String,
    pub issuer: Option<String>,
    pub subject: Option<String>,
    pub institution: Option<String>,
    pub outcome: String,
    /// `,id,id,` so that one id can be matched with `LIKE '%,id,%'`.
    pub projects: String,
    pub partners: String,
    /// The record as canonical JSON: what the hash covers.
    pub record: String,
}

/// The entries a reader may see when not all: their own and those
/// involving some partners.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// The reader's (issuer, subject).
    pub own: Option<(String, String)>,
    pub partners: Vec<String>,
}

impl Scope {
    /// An entry as this reader may read it: their own whole; another's
    /// with only the parts of the partners the reader may see — every other
    /// partner's decision, status and count removed, so a partner's admin
    /// learns nothing about how the other partners answered.
    pub fn shown(&self, mut entry: StoredEntry) -> StoredEntry {
        let own = self.own.as_ref().is_some_and(|(issuer, subject)| {
            entry.issuer.as_deref() == Some(issuer) && entry.subject.as_deref() == Some(subject)
        });
        if own {
            return entry;
        }
        let visible = |id: &str| self.partners.iter().any(|p| p == id);
        let mut record: serde_json::Value = serde_json::from_str(&entry.record).unwrap_or_default();
        for access in record
            .get_mut("accesses")
            .and_then(serde_json::Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(partners) = access
                .get_mut("partners")
                .and_then(serde_json::Value::as_array_mut)
            {
                partners.retain(|p| p["partner"].as_str().is_some_and(visible));
            }
        }
        entry.record = super::canonical_json(&record);
        entry.partners = entry
            .partners
            .split(',')
            .filter(|id| id.is_empty() || visible(id))
            .collect::<Vec<_>>()
            .join(",");
        entry
    }
}

/// Which entries a reader may see and wants.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// `None`: every entry.
    pub scope: Option<Scope>,
    pub subject: Option<String>,
    pub institution: Option<String>,
    pub project: Option<String>,
    pub partner: Option<String>,
    pub outcome: Option<String>,
    /// Inclusive bounds on `recorded` (RFC 3339, UTC).
    pub from: Option<String>,
    pub to: Option<String>,
    /// Only entries before this sequence number (paging backwards).
    pub before: Option<i64>,
}

const SCHEMA: [&str; 6] = [
    "CREATE TABLE IF NOT EXISTS audit_log (
        seq BIGINT PRIMARY KEY,
        recorded TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        issuer TEXT,
        subject TEXT,
        institution TEXT,
        outcome TEXT NOT NULL,
        projects TEXT NOT NULL,
        partners TEXT NOT NULL,
        record TEXT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS audit_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq BIGINT NOT NULL,
        hash TEXT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS audit_checkpoints (
        seq BIGINT PRIMARY KEY,
        hash TEXT NOT NULL,
        recorded TEXT NOT NULL,
        key_id TEXT NOT NULL,
        signature TEXT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS audit_log_recorded ON audit_log (recorded)",
    "CREATE INDEX IF NOT EXISTS audit_log_subject ON audit_log (subject)",
    "CREATE INDEX IF NOT EXISTS audit_log_institution ON audit_log (institution)",
];

/// An open audit store.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite { pool: SqlitePool, path: PathBuf },
    Postgres(PgPool),
}

fn unavailable(error: sqlx::Error) -> AuditError {
    AuditError::from_sqlx(error)
}

macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            Store::Sqlite { pool: $pool, .. } => $body,
            Store::Postgres($pool) => $body,
        }
    };
}

impl Store {
    /// Opens (and creates, if new) the store.
    pub async fn open(location: &StoreLocation) -> Result<Store, AuditError> {
        let store = match location {
            StoreLocation::Sqlite(path) => {
                let options = SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    // Every commit is on disk before it returns.
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(Duration::from_secs(5));
                let pool = SqlitePoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_with(options)
                    .await
                    .map_err(unavailable)?;
                Store::Sqlite {
                    pool,
                    path: path.clone(),
                }
            }
            StoreLocation::Postgres(url) => {
                let options = PgConnectOptions::from_str(url.expose())
                    .map_err(|_| AuditError::Config("the PostgreSQL URL is not valid".into()))?;
                let pool = PgPoolOptions::new()
                    .max_connections(8)
                    // A stopped server must fail requests fast, not hang them.
                    .acquire_timeout(Duration::from_secs(2))
                    .connect_with(options)
                    .await
                    .map_err(unavailable)?;
                Store::Postgres(pool)
            }
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), AuditError> {
        on_pool!(self, pool => {
            for statement in SCHEMA {
                pool.execute(statement).await.map_err(unavailable)?;
            }
            sqlx::query(
                "INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, $1) ON CONFLICT (id) DO NOTHING",
            )
            .bind(GENESIS)
            .execute(pool)
            .await
            .map_err(unavailable)?;
        });
        Ok(())
    }

    /// Whether an append can be expected to succeed: the file is not made
    /// read-only, the server answers.
    pub async fn ready(&self) -> Result<(), AuditError> {
        match self {
            Store::Sqlite { path, .. } => {
                // `SELECT 1` would not touch the file: its permissions are
                // what an operator changes to freeze the log.
                if is_read_only(path) {
                    return Err(AuditError::Unavailable(
                        "the audit file is read-only".into(),
                    ));
                }
            }
            Store::Postgres(pool) => {
                sqlx::query("SELECT 1")
                    .execute(pool)
                    .await
                    .map_err(unavailable)?;
            }
        }
        Ok(())
    }

    /// Appends `count` entries in one transaction (group commit): takes the
    /// head's lock, makes each entry from the one before
    /// (`make(index, seq, prev_hash)`), inserts them and moves the head.
    /// Committed (and, for SQLite, synced) on return, all or none.
    pub async fn append(
        &self,
        count: usize,
        make: impl Fn(usize, i64, &str) -> StoredEntry,
    ) -> Result<Vec<StoredEntry>, AuditError> {
        on_pool!(self, pool => {
            let mut tx = pool.begin().await.map_err(unavailable)?;
            // A write that reads the head: SQLite takes its write lock and
            // PostgreSQL the head row's lock before the head is read.
            let head = sqlx::query("UPDATE audit_head SET seq = seq WHERE id = 1 RETURNING seq, hash")
                .fetch_one(&mut *tx)
                .await
                .map_err(unavailable)?;
            let mut seq: i64 = head.try_get("seq").map_err(unavailable)?;
            let mut prev: String = head.try_get("hash").map_err(unavailable)?;
            let mut rows = Vec::with_capacity(count);
            for index in 0..count {
                seq += 1;
                let row = make(index, seq, &prev);
                sqlx::query(
                    "INSERT INTO audit_log (seq, recorded, prev_hash, hash, issuer, subject, institution, outcome, projects, partners, record)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                )
                .bind(row.seq)
                .bind(&row.recorded)
                .bind(&row.prev_hash)
                .bind(&row.hash)
                .bind(&row.issuer)
                .bind(&row.subject)
                .bind(&row.institution)
                .bind(&row.outcome)
                .bind(&row.projects)
                .bind(&row.partners)
                .bind(&row.record)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
                prev.clone_from(&row.hash);
                rows.push(row);
            }
            sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
                .bind(seq)
                .bind(&prev)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)?;
            Ok(rows)
        })
    }

    /// The head: the last sequence number and its hash.
    pub async fn head(&self) -> Result<(i64, String), AuditError> {
        on_pool!(self, pool => {
            let row = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
                .fetch_one(pool)
                .await
                .map_err(unavailable)?;
            Ok((
                row.try_get("seq").map_err(unavailable)?,
                row.try_get("hash").map_err(unavailable)?,
            ))
        })
    }

    /// Up to `limit` entries after `after`, in sequence order.
    pub async fn range(&self, after: i64, limit: i64) -> Result<Vec<StoredEntry>, AuditError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT seq, recorded, prev_hash, hash, issuer, subject, institution, outcome, projects, partners, record
                 FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2",
            )
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await
            .map_err(unavailable)?;
            rows.iter().map(read_row).collect()
        })
    }

    /// Entries matching `selection`, newest first.
    pub async fn select(
        &self,
        selection: &Selection,
        limit: i64,
    ) -> Result<Vec<StoredEntry>, AuditError> {
        let mut conditions: Vec<String> = Vec::new();
        let mut texts: Vec<String> = Vec::new();
        let next = |value: String, texts: &mut Vec<String>| {
            texts.push(value);
            format!("${}", texts.len())
        };
        let like = |id: &str| {
            format!(
                "%,{},%",
                id.replace('\\', "\\\\")
                    .replace('%', "\\%")
                    .replace('_', "\\_")
            )
        };
        if let Some(Scope { own, partners }) = &selection.scope {
            let mut any = Vec::new();
            if let Some((issuer, subject)) = own {
                let i = next(issuer.clone(), &mut texts);
                let s = next(subject.clone(), &mut texts);
                any.push(format!("(issuer = {i} AND subject = {s})"));
            }
            for partner in partners {
                let p = next(like(partner), &mut texts);
                any.push(format!("partners LIKE {p} ESCAPE '\\'"));
            }
            if any.is_empty() {
                return Ok(Vec::new());
            }
            conditions.push(format!("({})", any.join(" OR ")));
        }
        for (column, value) in [
            ("subject", &selection.subject),
            ("institution", &selection.institution),
            ("outcome", &selection.outcome),
        ] {
            if let Some(value) = value {
                let p = next(value.clone(), &mut texts);
                conditions.push(format!("{column} = {p}"));
            }
        }
        for (column, value) in [
            ("projects", &selection.project),
            ("partners", &selection.partner),
        ] {
            if let Some(value) = value {
                let p = next(like(value), &mut texts);
                conditions.push(format!("{column} LIKE {p} ESCAPE '\\'"));
            }
        }
        if let Some(from) = &selection.from {
            let p = next(from.clone(), &mut texts);
            conditions.push(format!("recorded >= {p}"));
        }
        if let Some(to) = &selection.to {
            let p = next(to.clone(), &mut texts);
            conditions.push(format!("recorded <= {p}"));
        }
        let before = texts.len() + 1;
        let limit_at = texts.len() + 2;
        conditions.push(format!("seq < ${before}"));
        let sql = format!(
            "SELECT seq, recorded, prev_hash, hash, issuer, subject, institution, outcome, projects, partners, record
             FROM audit_log WHERE {} ORDER BY seq DESC LIMIT ${limit_at}",
            conditions.join(" AND ")
        );
        on_pool!(self, pool => {
            let mut query = sqlx::query(&sql);
            for text in &texts {
                query = query.bind(text);
            }
            let rows = query
                .bind(selection.before.unwrap_or(i64::MAX))
                .bind(limit)
                .fetch_all(pool)
                .await
                .map_err(unavailable)?;
            rows.iter().map(read_row).collect::<Result<Vec<_>, _>>()
        })
        .map(|entries| match &selection.scope {
            Some(scope) => entries.into_iter().map(|e| scope.shown(e)).collect(),
            None => entries,
        })
    }

    pub async fn insert_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), AuditError> {
        on_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO audit_checkpoints (seq, hash, recorded, key_id, signature) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (seq) DO NOTHING",
            )
            .bind(checkpoint.seq)
            .bind(&checkpoint.hash)
            .bind(&checkpoint.recorded)
            .bind(&checkpoint.key_id)
            .bind(&checkpoint.signature)
            .execute(pool)
            .await
            .map_err(unavailable)?;
            Ok(())
        })
    }

    /// Every stored checkpoint, oldest first.
    pub async fn checkpoints(&self) -> Result<Vec<Checkpoint>, AuditError> {
        self.select_checkpoints("ORDER BY seq").await
    }

    /// The newest stored checkpoint.
    pub async fn latest_checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        Ok(self
            .select_checkpoints("ORDER BY seq DESC LIMIT 1")
            .await?
            .pop())
    }

    async fn select_checkpoints(&self, order: &str) -> Result<Vec<Checkpoint>, AuditError> {
        let sql =
            format!("SELECT seq, hash, recorded, key_id, signature FROM audit_checkpoints {order}");
        on_pool!(self, pool => {
            let rows = sqlx::query(&sql)
            .fetch_all(pool)
            .await
            .map_err(unavailable)?;
            rows.iter()
                .map(|row| {
                    Ok(Checkpoint {
                        seq: row.try_get("seq").map_err(unavailable)?,
                        hash: row.try_get("hash").map_err(unavailable)?,
                        recorded: row.try_get("recorded").map_err(unavailable)?,
                        key_id: row.try_get("key_id").map_err(unavailable)?,
                        signature: row.try_get("signature").map_err(unavailable)?,
                    })
                })
                .collect()
        })
    }
}

fn read_row<R: Row>(row: &R) -> Result<StoredEntry, AuditError>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    i64: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    String: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    Option<String>: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(StoredEntry {
        seq: row.try_get("seq").map_err(unavailable)?,
        recorded: row.try_get("recorded").map_err(unavailable)?,
        prev_hash: row.try_get("prev_hash").map_err(unavailable)?,
        hash: row.try_get("hash").map_err(unavailable)?,
        issuer: row.try_get("issuer").map_err(unavailable)?,
        subject: row.try_get("subject").map_err(unavailable)?,
        institution: row.try_get("institution").map_err(unavailable)?,
        outcome: row.try_get("outcome").map_err(unavailable)?,
        projects: row.try_get("projects").map_err(unavailable)?,
        partners: row.try_get("partners").map_err(unavailable)?,
        record: row.try_get("record").map_err(unavailable)?,
    })
}

/// Whether the file's permissions say nobody may write it: an operator's
/// way of freezing the log, honoured even for a process that could.
fn is_read_only(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.permissions().readonly())
}
