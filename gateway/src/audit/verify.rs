//! `meshgate audit verify`: walks the whole chain and checks every
//! checkpoint, stored or held elsewhere.

use std::collections::{BTreeMap, HashMap};

use ed25519_dalek::VerifyingKey;

use super::{AuditError, Checkpoint, Entry, GENESIS, Store, entry_hash};

/// The first thing found wrong, by sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub seq: i64,
    pub reason: String,
}

/// What a verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Entries read.
    pub entries: i64,
    /// Checkpoints whose signature and hash were checked.
    pub checkpoints: usize,
    /// `None`: the log is intact.
    pub first_bad: Option<Finding>,
}

/// Entries read per query.
const BATCH: i64 = 10_000;

/// Checks, in sequence order, that every entry follows the one before
/// (numbers without gaps, previous hash equal), that its hash matches its
/// contents and its indexed columns match its record; that the head agrees
/// with the last entry; and that every checkpoint (the store's and
/// `external` ones, e.g. copies of the published file) is signed by `key`
/// and matches the entry it names. A checkpoint beyond the last entry
/// means the tail was cut.
pub async fn verify(
    store: &Store,
    key: &VerifyingKey,
    external: &[Checkpoint],
) -> Result<VerifyReport, AuditError> {
    let mut checkpoints: Vec<Checkpoint> = store.checkpoints().await?;
    checkpoints.extend(external.iter().cloned());
    checkpoints.sort_by_key(|c| c.seq);
    checkpoints.dedup();
    let wanted: BTreeMap<i64, ()> = checkpoints.iter().map(|c| (c.seq, ())).collect();
    let mut hashes_at: HashMap<i64, String> = HashMap::new();

    let mut findings: Vec<Finding> = Vec::new();
    let mut last_seq = 0;
    let mut last_hash = GENESIS.to_owned();
    let mut entries = 0;
    'read: loop {
        let rows = store.range(last_seq, BATCH).await?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            entries += 1;
            let expected = last_seq + 1;
            if row.seq != expected {
                findings.push(Finding {
                    seq: expected,
                    reason: format!("record {expected} is missing (the next one is {})", row.seq),
                });
                break 'read;
            }
            if row.prev_hash != last_hash {
                findings.push(Finding {
                    seq: row.seq,
                    reason: format!("record {} does not follow record {}", row.seq, last_seq),
                });
                break 'read;
            }
            if entry_hash(row.seq, &row.recorded, &row.prev_hash, &row.record) != row.hash {
                findings.push(Finding {
                    seq: row.seq,
                    reason: format!("record {}'s contents do not match its hash", row.seq),
                });
                break 'read;
            }
            let derived = Entry::from_canonical(row.recorded.clone(), row.record.clone())
                .chain(row.seq, &row.prev_hash);
            if derived != row {
                findings.push(Finding {
                    seq: row.seq,
                    reason: format!(
                        "record {}'s indexed columns do not match its contents",
                        row.seq
                    ),
                });
                break 'read;
            }
            if wanted.contains_key(&row.seq) {
                hashes_at.insert(row.seq, row.hash.clone());
            }
            last_seq = row.seq;
            last_hash = row.hash;
        }
    }
    let intact_to = findings.first().map(|f| f.seq - 1).unwrap_or(last_seq);
    if findings.is_empty() {
        let (head_seq, head_hash) = store.head().await?;
        if head_seq != last_seq || head_hash != last_hash {
            findings.push(Finding {
                seq: last_seq + 1,
                reason: format!(
                    "the log ends at record {last_seq} but its head says {head_seq}: records were removed"
                ),
            });
        }
    }
    let mut previous_good = 0;
    for checkpoint in &checkpoints {
        if !checkpoint.signed_by(key) {
            findings.push(Finding {
                seq: checkpoint.seq,
                reason: format!(
                    "the checkpoint at record {} is not signed by this key",
                    checkpoint.seq
                ),
            });
            continue;
        }
        if checkpoint.seq > last_seq && checkpoint.seq > intact_to {
            findings.push(Finding {
                seq: last_seq + 1,
                reason: format!(
                    "the log ends at record {last_seq}, but record {} was signed in a checkpoint: the tail was cut",
                    checkpoint.seq
                ),
            });
            continue;
        }
        match hashes_at.get(&checkpoint.seq) {
            Some(hash) if *hash == checkpoint.hash => previous_good = checkpoint.seq,
            Some(_) => findings.push(Finding {
                seq: previous_good + 1,
                reason: format!(
                    "record {} differs from its signed checkpoint: records {}..={} were rewritten",
                    checkpoint.seq,
                    previous_good + 1,
                    checkpoint.seq
                ),
            }),
            // Beyond a break already reported.
            None => {}
        }
    }
    findings.sort_by_key(|f| f.seq);
    Ok(VerifyReport {
        entries,
        checkpoints: checkpoints.len(),
        first_bad: findings.into_iter().next(),
    })
}
