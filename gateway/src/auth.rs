//! Bearer-token authentication: JWTs from configured issuers, verified with
//! keys from each issuer's JWKS endpoint, mapped into a [`Principal`].
//!
//! What is checked, and why some of it is spelled out: the JWT library's
//! defaults accept tokens a reader would expect to be refused. Its
//! `Validation` requires only `exp`, does not check `nbf` at all, allows 60
//! seconds of leeway, and ignores `typ`. Here `iss`, `aud`, `exp`, `nbf`
//! and `sub` are required, `nbf` is checked, the leeway is small, `typ` must
//! be an access-token type when present, the algorithm must be on the
//! issuer's allow-list (asymmetric only by default; `none` and HMAC are
//! never accepted from a JWKS), and the key is chosen by `kid` from the
//! issuer's own JWKS — never from `jku`, `jwk` or `x5u` in the token.
//!
//! Unknown `kid`s refresh the JWKS, at most once per `refresh_interval`,
//! so a flood of forged tokens cannot turn into a flood of JWKS fetches.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::jwk::{JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use meshgate_schema::{Principal, Role};
use serde_json::Value;
use tokio::sync::{Mutex, RwLock};
use tokio::time::Instant;

/// Longest bearer token accepted.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 256 * 1024;
/// RSA keys shorter than this are not trusted (NIST SP 800-131A).
const MIN_RSA_BITS: usize = 2048;

/// The algorithms an issuer accepts unless configured otherwise: asymmetric only.
pub const DEFAULT_ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Token types (`typ` header) accepted when a token states one.
pub const DEFAULT_TOKEN_TYPES: [&str; 2] = ["JWT", "at+jwt"];

/// Where in the token's claims the principal's attributes are found.
/// Dotted paths reach into objects (`realm_access.roles`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimNames {
    pub institution: String,
    pub roles: String,
    pub projects: String,
    pub permissions: String,
}

impl Default for ClaimNames {
    fn default() -> Self {
        ClaimNames {
            institution: "institution".into(),
            roles: "roles".into(),
            projects: "projects".into(),
            permissions: "permissions".into(),
        }
    }
}

/// The values of one kind an issuer may assert.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Allowed {
    /// Any value (`"*"`).
    Any,
    /// Only these; none when empty.
    #[default]
    None,
    Only(std::collections::BTreeSet<String>),
}

impl Allowed {
    pub fn of(values: &[String]) -> Allowed {
        if values.iter().any(|v| v == "*") {
            Allowed::Any
        } else if values.is_empty() {
            Allowed::None
        } else {
            Allowed::Only(values.iter().cloned().collect())
        }
    }

    pub fn allows(&self, value: &str) -> bool {
        match self {
            Allowed::Any => true,
            Allowed::None => false,
            Allowed::Only(values) => values.contains(value),
        }
    }
}

/// What an issuer is believed about. A claim outside it is dropped (the
/// token still proves its subject): a token from an issuer trusted for one
/// institution that claims another gets what no institution would get.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Trust {
    pub institutions: Allowed,
    pub roles: Allowed,
    pub projects: Allowed,
    pub permissions: Allowed,
}

/// One trusted issuer.
#[derive(Debug, Clone)]
pub struct IssuerSettings {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub jwks_url: reqwest::Url,
    pub algorithms: Vec<Algorithm>,
    pub token_types: Vec<String>,
    pub leeway: Duration,
    pub require_nbf: bool,
    /// The longest `exp` may lie after `iat` (or after now, without `iat`).
    pub max_lifetime: Duration,
    pub claims: ClaimNames,
    /// What its tokens may assert.
    pub trust: Trust,
    /// Least time between two JWKS fetches.
    pub refresh_interval: Duration,
    /// Keys older than this are fetched again before use.
    pub max_key_age: Duration,
}

/// Why a request is not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a bearer token is required")]
    Missing,
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token's issuer is not trusted")]
    UnknownIssuer,
    #[error("the token is signed with an algorithm this issuer may not use")]
    Algorithm,
    #[error("the token's type is not an access token")]
    TokenType,
    #[error("the token's signing key is not among its issuer's keys")]
    UnknownKey,
    #[error("{0}")]
    Invalid(&'static str),
    #[error("the token has no {0} claim")]
    MissingClaim(String),
    #[error("the issuer's keys cannot be fetched; try again later")]
    KeysUnavailable,
}

impl AuthError {
    /// The stable code clients see.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::KeysUnavailable => "AUTH_UNAVAILABLE",
            _ => "UNAUTHENTICATED",
        }
    }
}

#[derive(Debug, Default)]
struct KeyCache {
    keys: HashMap<String, (DecodingKey, Option<Algorithm>)>,
    fetched: Option<Instant>,
}

#[derive(Debug)]
struct Issuer {
    settings: IssuerSettings,
    cache: RwLock<KeyCache>,
    /// When the JWKS was last asked for; held while fetching.
    last_fetch: Mutex<Option<Instant>>,
}

/// Verifies bearer tokens from the configured issuers.
#[derive(Debug)]
pub struct Authenticator {
    issuers: Vec<Arc<Issuer>>,
    client: reqwest::Client,
}

impl Authenticator {
    pub fn new(issuers: Vec<IssuerSettings>) -> Result<Authenticator, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Authenticator {
            issuers: issuers
                .into_iter()
                .map(|settings| {
                    Arc::new(Issuer {
                        settings,
                        cache: RwLock::default(),
                        last_fetch: Mutex::default(),
                    })
                })
                .collect(),
            client,
        })
    }

    /// Fetches every issuer's keys once, so the first request does not wait.
    /// Failures are logged, not fatal: keys are fetched again on demand.
    pub async fn warm_up(&self) {
        for issuer in &self.issuers {
            if let Err(error) = issuer.refresh(&self.client, true).await {
                tracing::warn!(issuer = %issuer.settings.issuer, %error, "JWKS not available yet");
            }
        }
    }

    /// The principal an `Authorization` header value proves.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        let value = authorization.ok_or(AuthError::Missing)?;
        let (scheme, token) = value.split_once(' ').ok_or(AuthError::Missing)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Missing);
        }
        let token = token.trim();
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed);
        }
        // `alg: none` and unknown algorithms fail here: the library has no
        // such algorithm to parse into.
        let header = decode_header(token).map_err(|_| AuthError::Malformed)?;
        // The issuer is read unverified only to pick its keys; the signature
        // and `iss` are then checked against that issuer.
        let claimed: Value = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|_| AuthError::Malformed)?;
        let issuer = match claimed.get("iss") {
            Some(Value::String(iss)) => self
                .issuers
                .iter()
                .find(|i| i.settings.issuer == *iss)
                .ok_or(AuthError::UnknownIssuer)?,
            _ => return Err(AuthError::MissingClaim("iss".into())),
        };
        let settings = &issuer.settings;
        if !settings.algorithms.contains(&header.alg) {
            return Err(AuthError::Algorithm);
        }
        if let Some(typ) = &header.typ
            && !settings
                .token_types
                .iter()
                .any(|t| t.eq_ignore_ascii_case(typ))
        {
            return Err(AuthError::TokenType);
        }
        let kid = header.kid.as_deref().ok_or(AuthError::UnknownKey)?;
        let (key, key_algorithm) = issuer.key(&self.client, kid).await?;
        if key_algorithm.is_some_and(|alg| alg != header.alg) {
            return Err(AuthError::Algorithm);
        }

        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&settings.issuer]);
        validation.set_audience(&settings.audiences);
        let mut required = vec!["exp", "iss", "aud", "sub"];
        if settings.require_nbf {
            required.push("nbf");
        }
        validation.set_required_spec_claims(&required);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.leeway = settings.leeway.as_secs();
        let claims = decode::<Value>(token, &key, &validation)
            .map_err(|error| {
                use jsonwebtoken::errors::ErrorKind;
                match error.into_kind() {
                    ErrorKind::ExpiredSignature => AuthError::Invalid("the token has expired"),
                    ErrorKind::ImmatureSignature => {
                        AuthError::Invalid("the token is not valid yet")
                    }
                    ErrorKind::InvalidAudience => {
                        AuthError::Invalid("the token is not meant for this gateway (aud)")
                    }
                    ErrorKind::InvalidIssuer => AuthError::UnknownIssuer,
                    ErrorKind::MissingRequiredClaim(claim) => AuthError::MissingClaim(claim),
                    ErrorKind::InvalidSignature => {
                        AuthError::Invalid("the token's signature does not verify")
                    }
                    ErrorKind::InvalidAlgorithm => AuthError::Algorithm,
                    _ => AuthError::Invalid("the token is not valid"),
                }
            })?
            .claims;
        check_times(settings, &claims)?;
        if has_control_characters(&claims) {
            return Err(AuthError::Invalid(
                "the token's claims contain control or bidirectional-override characters",
            ));
        }
        principal(settings, &claims)
    }
}

impl Issuer {
    /// The key named `kid`. A held key is used at once; when the keys are
    /// older than `max_key_age` they are fetched again in the background,
    /// so an issuer whose JWKS endpoint hangs does not stall its tokens.
    /// Only a `kid` not held waits for a fetch.
    async fn key(
        self: &Arc<Self>,
        client: &reqwest::Client,
        kid: &str,
    ) -> Result<(DecodingKey, Option<Algorithm>), AuthError> {
        let cached = |cache: &KeyCache| cache.keys.get(kid).cloned();
        {
            let cache = self.cache.read().await;
            if let Some(key) = cached(&cache) {
                let stale = cache
                    .fetched
                    .is_none_or(|at| at.elapsed() >= self.settings.max_key_age);
                // One background fetch at a time: a fetch in progress holds
                // `last_fetch`.
                if stale && self.last_fetch.try_lock().is_ok() {
                    let issuer = Arc::clone(self);
                    let client = client.clone();
                    tokio::spawn(async move {
                        let _ = issuer.refresh(&client, false).await;
                    });
                }
                return Ok(key);
            }
        }
        let refreshed = self.refresh(client, false).await;
        let cache = self.cache.read().await;
        match (cached(&cache), refreshed) {
            (Some(key), _) => Ok(key),
            (None, Err(RefreshError::Fetch(_))) if cache.fetched.is_none() => {
                Err(AuthError::KeysUnavailable)
            }
            (None, _) => Err(AuthError::UnknownKey),
        }
    }

    /// Fetches the JWKS unless it was fetched less than `refresh_interval` ago
    /// (or `force`). Keeps the old keys when the fetch fails.
    async fn refresh(&self, client: &reqwest::Client, force: bool) -> Result<(), RefreshError> {
        let mut last = self.last_fetch.lock().await;
        if !force && last.is_some_and(|at| at.elapsed() < self.settings.refresh_interval) {
            return Err(RefreshError::RateLimited);
        }
        *last = Some(Instant::now());
        let keys = fetch_jwks(client, &self.settings.jwks_url)
            .await
            .map_err(|error| {
                tracing::warn!(issuer = %self.settings.issuer, %error, "JWKS fetch failed");
                RefreshError::Fetch(error)
            })?;
        let mut cache = self.cache.write().await;
        tracing::info!(issuer = %self.settings.issuer, keys = keys.len(), "JWKS fetched");
        cache.keys = keys;
        cache.fetched = Some(Instant::now());
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
enum RefreshError {
    #[error("fetched too recently")]
    RateLimited,
    #[error("{0}")]
    Fetch(String),
}

async fn fetch_jwks(
    client: &reqwest::Client,
    url: &reqwest::Url,
) -> Result<HashMap<String, (DecodingKey, Option<Algorithm>)>, String> {
    let response = client
        .get(url.clone())
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| {
            if e.is_timeout() {
                "timed out".to_owned()
            } else {
                "cannot connect".to_owned()
            }
        })?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status().as_u16()));
    }
    if response
        .content_length()
        .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
    {
        return Err("the JWKS is too large".into());
    }
    // Counted as it arrives: a chunked body states no length.
    let mut response = response;
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|_| "body cut short".to_owned())?
    {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err("the JWKS is too large".into());
        }
        body.extend_from_slice(&chunk);
    }
    // Keys are read one by one, so one key of an unknown kind does not hide the rest.
    let document: Value = serde_json::from_slice(&body).map_err(|_| "not JSON".to_owned())?;
    let mut keys = HashMap::new();
    for raw in document
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("no keys array")?
    {
        let Ok(set) = serde_json::from_value::<JwkSet>(serde_json::json!({ "keys": [raw] })) else {
            continue;
        };
        for jwk in set.keys {
            let usable = matches!(
                jwk.common.public_key_use,
                None | Some(PublicKeyUse::Signature)
            );
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            if !usable {
                continue;
            }
            let algorithm = jwk
                .common
                .key_algorithm
                .and_then(|a| Algorithm::try_from(a).ok());
            // Symmetric keys never belong in a JWKS a gateway trusts, nor
            // RSA keys too short to resist factoring.
            match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_) => continue,
                jsonwebtoken::jwk::AlgorithmParameters::RSA(rsa)
                    if rsa_bits(&rsa.n) < MIN_RSA_BITS =>
                {
                    tracing::warn!(
                        %kid,
                        bits = rsa_bits(&rsa.n),
                        "JWKS key ignored: RSA keys must have at least {MIN_RSA_BITS} bits"
                    );
                    continue;
                }
                _ => {}
            }
            if let Ok(key) = DecodingKey::from_jwk(&jwk) {
                keys.insert(kid, (key, algorithm));
            }
        }
    }
    Ok(keys)
}

/// The size in bits of an RSA modulus given as base64url (0 if unreadable).
fn rsa_bits(modulus: &str) -> usize {
    use base64::Engine as _;
    let Ok(bytes) =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(modulus.trim_end_matches('='))
    else {
        return 0;
    };
    let bytes = match bytes.iter().position(|b| *b != 0) {
        Some(first) => &bytes[first..],
        None => return 0,
    };
    bytes.len() * 8 - bytes[0].leading_zeros() as usize
}

/// `iat` not in the future, and a lifetime (`exp` less `iat`, or less now
/// without `iat`) within the issuer's maximum; both with the leeway.
fn check_times(settings: &IssuerSettings, claims: &Value) -> Result<(), AuthError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let leeway = settings.leeway.as_secs();
    let time = |name: &str| -> Result<Option<u64>, AuthError> {
        match claims.get(name) {
            None => Ok(None),
            Some(value) => value
                .as_u64()
                .or_else(|| value.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                .map(Some)
                .ok_or(AuthError::Invalid("the token's times are not numbers")),
        }
    };
    let issued = time("iat")?;
    if issued.is_some_and(|iat| iat > now.saturating_add(leeway)) {
        return Err(AuthError::Invalid(
            "the token was issued in the future (iat)",
        ));
    }
    let expires = time("exp")?.ok_or(AuthError::MissingClaim("exp".into()))?;
    let lifetime = expires.saturating_sub(issued.unwrap_or(now));
    if lifetime > settings.max_lifetime.as_secs().saturating_add(leeway) {
        return Err(AuthError::Invalid(
            "the token is valid for longer than this issuer's tokens may be",
        ));
    }
    Ok(())
}

/// Whether any string in the claims (names included) holds a control
/// character (NUL, CR, LF, ...) or a bidirectional override, which could
/// forge lines in logs or disguise a name shown to governance staff.
fn has_control_characters(value: &Value) -> bool {
    let bad = |text: &str| {
        text.chars().any(|c| {
            c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
        })
    };
    match value {
        Value::String(text) => bad(text),
        Value::Array(items) => items.iter().any(has_control_characters),
        Value::Object(fields) => fields
            .iter()
            .any(|(name, value)| bad(name) || has_control_characters(value)),
        _ => false,
    }
}

/// Maps verified claims into a principal.
fn principal(settings: &IssuerSettings, claims: &Value) -> Result<Principal, AuthError> {
    let subject = match claims.get("sub") {
        Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
        _ => return Err(AuthError::MissingClaim("sub".into())),
    };
    let names = &settings.claims;
    let trust = &settings.trust;
    let mut roles: Vec<Role> = strings(claim(claims, &names.roles))
        .iter()
        .filter(|r| trust.roles.allows(r))
        .filter_map(|r| Role::from_name(r))
        .collect();
    roles.sort();
    roles.dedup();
    let believed = |values: Vec<String>, allowed: &Allowed| {
        let mut values: Vec<String> = values.into_iter().filter(|v| allowed.allows(v)).collect();
        values.sort();
        values.dedup();
        values
    };
    Ok(Principal {
        issuer: settings.issuer.clone(),
        subject,
        institution: claim(claims, &names.institution)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && trust.institutions.allows(s))
            .map(str::to_owned),
        roles,
        projects: believed(strings(claim(claims, &names.projects)), &trust.projects),
        permissions: believed(
            strings(claim(claims, &names.permissions)),
            &trust.permissions,
        ),
    })
}

fn claim<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(claims, |value, key| value.get(key))
}

/// An array of strings, or one space-separated string (as OAuth `scope`).
fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        Some(Value::String(text)) => text.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}
