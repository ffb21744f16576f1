//! Opaque page cursors. A cursor carries the last study's position in the
//! merged order and the fingerprint of the filter it was issued for, so it
//! cannot silently page through a different query.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use time::PrimitiveDateTime;
use time::macros::format_description;

use crate::federation::SortKey;

#[derive(Serialize, Deserialize)]
struct CursorBody {
    v: u8,
    /// Filter fingerprint.
    q: String,
    /// Study start, `YYYY-MM-DDTHH:MM:SS`, absent for undated studies.
    t: Option<String>,
    p: String,
    u: String,
}

const STARTED: &[time::format_description::BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");

/// Why a cursor was refused (stable code `INVALID_CURSOR`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    #[error("the cursor is malformed")]
    Malformed,
    #[error("the cursor belongs to a different filter")]
    OtherFilter,
}

pub fn encode(key: &SortKey, fingerprint: &str) -> String {
    let body = CursorBody {
        v: 1,
        q: fingerprint.to_owned(),
        t: key.started.and_then(|t| t.format(STARTED).ok()),
        p: key.partner.clone(),
        u: key.uid.clone(),
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&body).unwrap_or_default())
}

pub fn decode(cursor: &str, fingerprint: &str) -> Result<SortKey, CursorError> {
    if cursor.len() > 1024 {
        return Err(CursorError::Malformed);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| CursorError::Malformed)?;
    let body: CursorBody = serde_json::from_slice(&bytes).map_err(|_| CursorError::Malformed)?;
    if body.v != 1 {
        return Err(CursorError::Malformed);
    }
    if body.q != fingerprint {
        return Err(CursorError::OtherFilter);
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
    use super::*;
    use time::macros::datetime;

    #[test]
    fn a_cursor_round_trips_only_for_its_own_filter() {
        let key = SortKey {
            started: Some(datetime!(2020-02-03 04:05:06)),
            partner: "north".into(),
            uid: "1.2.3".into(),
        };
        let cursor = encode(&key, "abc");
        assert_eq!(decode(&cursor, "abc"), Ok(key));
        assert_eq!(decode(&cursor, "abd"), Err(CursorError::OtherFilter));
        assert_eq!(decode("not a cursor!", "abc"), Err(CursorError::Malformed));
        assert_eq!(
            decode(&URL_SAFE_NO_PAD.encode(b"{}"), "abc"),
            Err(CursorError::Malformed)
        );
    }
}
