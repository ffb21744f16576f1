//! AWS Signature Version 4 request signing (HMAC-SHA256), as AWS
//! HealthImaging requires for both its DICOMweb and native APIs (service
//! name `medical-imaging`). Checked against AWS's published test suite
//! (`connectors/tests/fixtures/sigv4/`).

use std::fmt::Write as _;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::macros::format_description;

use crate::Secret;

/// The SigV4 service name of AWS HealthImaging (DICOMweb and native APIs).
pub const HEALTHIMAGING_SERVICE: &str = "medical-imaging";

/// AWS credentials: an access key, its secret, and a session token for
/// temporary credentials.
#[derive(Debug, Clone)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
}

/// What a signature is for.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub region: &'a str,
    pub service: &'a str,
    pub time: OffsetDateTime,
}

/// The headers to add to a request so that it is signed: `x-amz-date`,
/// `x-amz-security-token` (temporary credentials) and `authorization`.
///
/// `headers` are the request's other headers to sign (name, value), for
/// example `content-type`; `host` is taken from the URL. Header names are
/// compared case-insensitively; values are trimmed and inner runs of spaces
/// collapsed, as the canonical form requires.
pub fn sign(
    method: &str,
    url: &reqwest::Url,
    headers: &[(&str, &str)],
    payload: &[u8],
    credentials: &AwsCredentials,
    scope: Scope<'_>,
) -> Vec<(&'static str, String)> {
    let utc = scope.time.to_offset(time::UtcOffset::UTC);
    let amz_date = utc
        .format(format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .unwrap_or_default();
    let date = amz_date.get(..8).unwrap_or_default().to_owned();

    let mut canonical_headers: Vec<(String, String)> = headers
        .iter()
        .map(|(name, value)| (name.to_ascii_lowercase(), normalise_value(value)))
        .filter(|(name, _)| name != "host" && name != "x-amz-date" && name != "authorization")
        .collect();
    let host = match url.port() {
        Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_owned(),
    };
    canonical_headers.push(("host".to_owned(), host));
    canonical_headers.push(("x-amz-date".to_owned(), amz_date.clone()));
    if let Some(token) = &credentials.session_token {
        canonical_headers.retain(|(name, _)| name != "x-amz-security-token");
        canonical_headers.push(("x-amz-security-token".to_owned(), token.expose().to_owned()));
    }
    canonical_headers.sort();
    let signed_headers = canonical_headers
        .iter()
        .map(|(name, _)| name.as_str())
        .collect::<Vec<_>>()
        .join(";");

    let mut canonical = String::new();
    let _ = writeln!(canonical, "{method}");
    let _ = writeln!(canonical, "{}", canonical_path(url.path()));
    let _ = writeln!(canonical, "{}", canonical_query(url));
    for (name, value) in &canonical_headers {
        let _ = writeln!(canonical, "{name}:{value}");
    }
    let _ = writeln!(canonical);
    let _ = writeln!(canonical, "{signed_headers}");
    canonical.push_str(&hex(&Sha256::digest(payload)));

    let credential_scope = format!("{date}/{}/{}/aws4_request", scope.region, scope.service);
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{credential_scope}\n{}",
        hex(&Sha256::digest(canonical.as_bytes()))
    );
    let mut key = hmac(
        format!("AWS4{}", credentials.secret_access_key.expose()).as_bytes(),
        date.as_bytes(),
    );
    for part in [scope.region, scope.service, "aws4_request"] {
        key = hmac(&key, part.as_bytes());
    }
    let signature = hex(&hmac(&key, string_to_sign.as_bytes()));

    let mut added = vec![("x-amz-date", amz_date)];
    if let Some(token) = &credentials.session_token {
        added.push(("x-amz-security-token", token.expose().to_owned()));
    }
    added.push((
        "authorization",
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{credential_scope}, SignedHeaders={signed_headers}, Signature={signature}",
            credentials.access_key_id
        ),
    ));
    added
}

/// Trimmed, with inner runs of spaces collapsed to one.
fn normalise_value(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The path, each segment URI-encoded again (AWS services other than S3
/// sign the encoded path encoded once more); `/` for an empty path.
fn canonical_path(path: &str) -> String {
    if path.is_empty() {
        return "/".to_owned();
    }
    path.split('/')
        .map(uri_encode)
        .collect::<Vec<_>>()
        .join("/")
}

/// Query parameters, decoded, URI-encoded, sorted by name then value.
fn canonical_query(url: &reqwest::Url) -> String {
    let mut pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(name, value)| (uri_encode(&name), uri_encode(&value)))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// RFC 3986 encoding: unreserved characters as they are, every other byte
/// as `%XX` (upper case).
pub fn uri_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC takes keys of any length.
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(data);
            mac.finalize().into_bytes().to_vec()
        }
        Err(_) => Vec::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}
