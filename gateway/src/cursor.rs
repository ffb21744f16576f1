//! Opaque page cursors. A cursor carries the last study's position in the
//! merged order, authenticated with a key only the gateway holds and bound
//! to what it was issued for: the caller, the project, every partner's
//! policy decision and the filter. A cursor edited, or replayed by another
//! caller, in another project, under changed decisions or with another
//! filter, is refused (`INVALID_CURSOR`) before any partner is asked.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use meshgate_policies::MasterKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::PrimitiveDateTime;
use time::macros::format_description;

use crate::federation::SortKey;

#[derive(Serialize, Deserialize)]
struct CursorBody {
    v: u8,
    /// Study start, `YYYY-MM-DDTHH:MM:SS`, absent for undated studies.
    t: Option<String>,
    p: String,
    u: String,
}

const VERSION: u8 = 2;
/// Bytes of the tag a cursor carries (128 bits).
const TAG_BYTES: usize = 16;

const STARTED: &[time::format_description::BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");

/// Why a cursor was refused (stable code `INVALID_CURSOR`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    #[error("the cursor is malformed")]
    Malformed,
    #[error(
        "the cursor was not issued for this query: another filter, project, caller or policy decision"
    )]
    NotIssuedHere,
}

/// What a cursor is bound to: a digest of the caller, project, decisions
/// and filter. Built the same way when a cursor is issued and when it
/// comes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding([u8; 32]);

impl Binding {
    /// `decisions` are each asked partner's id and decision, in any order.
    pub fn new(
        issuer: &str,
        subject: &str,
        project: &str,
        fingerprint: &str,
        mut decisions: Vec<(String, String)>,
    ) -> Binding {
        decisions.sort();
        let mut digest = Sha256::new();
        for part in [issuer, subject, project, fingerprint]
            .into_iter()
            .chain(decisions.iter().flat_map(|(p, d)| [p.as_str(), d.as_str()]))
        {
            digest.update(u64::try_from(part.len()).unwrap_or(u64::MAX).to_be_bytes());
            digest.update(part.as_bytes());
        }
        Binding(digest.finalize().into())
    }
}

fn tag(key: &MasterKey, binding: &Binding, body: &[u8]) -> [u8; 32] {
    key.tag("page cursor", &[&binding.0, body])
}

pub fn encode(key: &MasterKey, binding: &Binding, position: &SortKey) -> String {
    let body = CursorBody {
        v: VERSION,
        t: position.started.and_then(|t| t.format(STARTED).ok()),
        p: position.partner.clone(),
        u: position.uid.clone(),
    };
    let body = serde_json::to_vec(&body).unwrap_or_default();
    let tag = tag(key, binding, &body);
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(&body),
        URL_SAFE_NO_PAD.encode(&tag[..TAG_BYTES])
    )
}

pub fn decode(key: &MasterKey, binding: &Binding, cursor: &str) -> Result<SortKey, CursorError> {
    if cursor.len() > 1024 {
        return Err(CursorError::Malformed);
    }
    let (body, given) = cursor.split_once('.').ok_or(CursorError::Malformed)?;
    let body = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| CursorError::Malformed)?;
    let given = URL_SAFE_NO_PAD
        .decode(given)
        .map_err(|_| CursorError::Malformed)?;
    let expected = tag(key, binding, &body);
    let expected = expected.get(..TAG_BYTES).unwrap_or_default();
    // Compared in constant time: how much of a forged tag matched stays unknown.
    let differs = given.len() != TAG_BYTES
        || given
            .iter()
            .zip(expected)
            .fold(0_u8, |acc, (a, b)| acc | (a ^ b))
            != 0;
    if differs {
        return Err(CursorError::NotIssuedHere);
    }
    let body: CursorBody = serde_json::from_slice(&body).map_err(|_| CursorError::Malformed)?;
    if body.v != VERSION {
        return Err(CursorError::Malformed);
    }
    let started = body
        .t
        .map(|t| PrimitiveDateTime::parse(&t, STARTED).map_err(|_| CursorError::Malformed))
        .transpose()?;
    Ok(SortKey {
        started,
        partner: body.p,
        uid: body.u,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]
    use super::*;
    use time::macros::datetime;

    fn binding(subject: &str, project: &str, fingerprint: &str, decision: &str) -> Binding {
        Binding::new(
            "https://issuer",
            subject,
            project,
            fingerprint,
            vec![("north".into(), decision.into())],
        )
    }

    #[test]
    fn a_cursor_is_accepted_only_where_it_was_issued_and_only_as_issued() {
        let key = MasterKey::new(&[5_u8; 32]).unwrap();
        let position = SortKey {
            started: Some(datetime!(2020-02-03 04:05:06)),
            partner: "north".into(),
            uid: "1.2.3".into(),
        };
        let issued = binding("alice", "p1", "abc", "IDENTIFIED");
        let cursor = encode(&key, &issued, &position);
        assert_eq!(decode(&key, &issued, &cursor), Ok(position));
        for other in [
            binding("mallory", "p1", "abc", "IDENTIFIED"),
            binding("alice", "p2", "abc", "IDENTIFIED"),
            binding("alice", "p1", "abd", "IDENTIFIED"),
            binding("alice", "p1", "abc", "DEIDENTIFIED:basic"),
        ] {
            assert_eq!(
                decode(&key, &other, &cursor),
                Err(CursorError::NotIssuedHere)
            );
        }
        let other_key = MasterKey::new(&[6_u8; 32]).unwrap();
        assert_eq!(
            decode(&other_key, &issued, &cursor),
            Err(CursorError::NotIssuedHere)
        );
        // An edited position, with the original tag, is refused.
        let (_, tag) = cursor.split_once('.').unwrap();
        let edited = format!(
            "{}.{tag}",
            URL_SAFE_NO_PAD.encode(br#"{"v":2,"t":null,"p":"north","u":"1.2.4"}"#)
        );
        assert_eq!(
            decode(&key, &issued, &edited),
            Err(CursorError::NotIssuedHere)
        );
        assert_eq!(
            decode(&key, &issued, "not a cursor!"),
            Err(CursorError::Malformed)
        );
        assert_eq!(
            decode(&key, &issued, &URL_SAFE_NO_PAD.encode(b"{}")),
            Err(CursorError::Malformed)
        );
    }
}
