//! A DEVELOPMENT token issuer: an Ed25519 key made at start-up, its JWKS
//! served on a loopback address, and tokens minted on request. `meshgate
//! demo` and the tests use it; a real deployment trusts the consortium's
//! identity provider instead. It refuses to listen anywhere but loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::routing::get;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rand::RngCore;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The audience the development issuer's tokens are for.
pub const DEV_AUDIENCE: &str = "meshgate";

/// PKCS#8 v1 prefix of an Ed25519 private key (RFC 8410): 16 bytes, then the 32-byte seed.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

#[derive(Debug, thiserror::Error)]
pub enum DevIssuerError {
    #[error("the development issuer listens on loopback addresses only, not {0}")]
    NotLoopback(SocketAddr),
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot make a key: {0}")]
    Key(#[from] jsonwebtoken::errors::Error),
}

/// A running development issuer; stops when dropped.
pub struct DevIssuer {
    issuer: String,
    kid: String,
    key: EncodingKey,
    jwk: Jwk,
    jwks_requests: Arc<AtomicU64>,
    _stop: oneshot::Sender<()>,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIssuer")
            .field("issuer", &self.issuer)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl DevIssuer {
    /// Makes a fresh key and serves its JWKS on `listen` (loopback only).
    pub async fn start(listen: SocketAddr) -> Result<DevIssuer, DevIssuerError> {
        if !listen.ip().is_loopback() {
            return Err(DevIssuerError::NotLoopback(listen));
        }
        let listener = TcpListener::bind(listen).await?;
        let address = listener.local_addr()?;
        let mut seed = [0_u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        let mut der = ED25519_PKCS8_PREFIX.to_vec();
        der.extend_from_slice(&seed);
        let key = EncodingKey::from_ed_der(&der);
        let kid = format!("dev-{:08x}", rand::rngs::OsRng.next_u32());
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::EdDSA)?;
        jwk.common.key_id = Some(kid.clone());
        jwk.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Signature);
        let issuer = format!("http://{address}/meshgate-dev-issuer");
        let jwks = serde_json::to_value(JwkSet {
            keys: vec![jwk.clone()],
        })
        .unwrap_or_default();
        let discovery = json!({
            "issuer": issuer,
            "jwks_uri": format!("http://{address}/meshgate-dev-issuer/jwks.json"),
            "id_token_signing_alg_values_supported": ["EdDSA"],
        });
        let jwks_requests = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&jwks_requests);
        let app = Router::new()
            .route(
                "/meshgate-dev-issuer/jwks.json",
                get(move || {
                    counter.fetch_add(1, Ordering::Relaxed);
                    let jwks = jwks.clone();
                    async move { axum::Json(jwks) }
                }),
            )
            .route(
                "/meshgate-dev-issuer/.well-known/openid-configuration",
                get(move || {
                    let discovery = discovery.clone();
                    async move { axum::Json(discovery) }
                }),
            );
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(error) = served {
                tracing::warn!(%error, "development issuer stopped");
            }
        });
        tracing::warn!(%issuer, "DEVELOPMENT token issuer running: tokens are minted locally; never trust it outside a demo");
        Ok(DevIssuer {
            issuer,
            kid,
            key,
            jwk,
            jwks_requests,
            _stop: stop,
        })
    }

    /// How many times its JWKS has been fetched.
    pub fn jwks_requests(&self) -> u64 {
        self.jwks_requests.load(Ordering::Relaxed)
    }

    /// The `iss` of its tokens.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Where its JWKS is served.
    pub fn jwks_url(&self) -> String {
        format!("{}/jwks.json", self.issuer)
    }

    /// The public key, as published.
    pub fn jwk(&self) -> &Jwk {
        &self.jwk
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// A token valid for `ttl` with these claims added to `iss`, `aud`,
    /// `iat`, `nbf` and `exp` (claims given here win).
    pub fn token(&self, claims: &Value, ttl: Duration) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let mut body = json!({
            "iss": self.issuer,
            "aud": DEV_AUDIENCE,
            "iat": now,
            "nbf": now,
            "exp": now + ttl.as_secs(),
        });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), claims.as_object()) {
            for (name, value) in extra {
                body.insert(name.clone(), value.clone());
            }
        }
        self.sign(&body)
    }

    /// Signs exactly these claims (no defaults added).
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with(&self.header(), claims)
    }

    /// The header of its tokens: EdDSA, its `kid`, `typ: JWT`.
    pub fn header(&self) -> Header {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        header
    }

    /// Signs these claims under this header with the issuer's key.
    pub fn sign_with(&self, header: &Header, claims: &Value) -> String {
        encode(header, claims, &self.key).unwrap_or_default()
    }
}
