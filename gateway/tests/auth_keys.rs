//! Keys at an issuer: the gateway follows the issuer's JWKS when a token
//! names a key it has not seen, stops trusting keys the issuer has
//! dropped, refuses short RSA keys, cuts off an oversized JWKS as it
//! streams in, and keeps serving held keys while the issuer hangs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use common::peak_rss;
use jsonwebtoken::jwk::JwkSet;
use meshgate_gateway::auth::{
    Allowed, AuthError, Authenticator, ClaimNames, DEFAULT_ALGORITHMS, DEFAULT_TOKEN_TYPES,
    IssuerSettings, Trust,
};
use meshgate_gateway::dev_issuer::DevIssuer;
use serde_json::{Value, json};

const ISSUER: &str = "https://login.example.org/rotating";

/// Serves whatever JWKS the test puts in `keys`.
async fn jwks_server(keys: Arc<Mutex<Value>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", listener.local_addr().unwrap());
    let app = Router::new().route(
        "/jwks",
        get(move || {
            let keys = keys.lock().unwrap().clone();
            async move { axum::Json(keys) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn jwks(issuer: &DevIssuer) -> Value {
    serde_json::to_value(JwkSet {
        keys: vec![issuer.jwk().clone()],
    })
    .unwrap()
}

/// A token from `signer` that claims to come from the rotating issuer.
fn token(signer: &DevIssuer) -> String {
    signer.token(
        &json!({"iss": ISSUER, "sub": "alice", "realm": {"roles": ["researcher", "astronaut"]}, "projects": "p2 p1"}),
        Duration::from_secs(300),
    )
}

fn settings(url: &str, max_key_age: Duration) -> IssuerSettings {
    IssuerSettings {
        issuer: ISSUER.into(),
        audiences: vec!["meshgate".into()],
        jwks_url: url.parse().unwrap(),
        algorithms: DEFAULT_ALGORITHMS.to_vec(),
        token_types: DEFAULT_TOKEN_TYPES
            .iter()
            .map(|t| (*t).to_owned())
            .collect(),
        leeway: Duration::from_secs(30),
        require_nbf: true,
        max_lifetime: Duration::from_secs(24 * 3600),
        claims: ClaimNames {
            roles: "realm.roles".into(),
            ..ClaimNames::default()
        },
        trust: Trust {
            institutions: Allowed::Any,
            roles: Allowed::Any,
            projects: Allowed::Any,
            permissions: Allowed::Any,
        },
        refresh_interval: Duration::ZERO,
        max_key_age,
    }
}

/// An RSA key of `bits` made by the `openssl` command (which, unlike the
/// gateway's crypto library, still makes short ones): its JWK, and a
/// function signing RS256 tokens with it.
fn openssl_rsa(bits: u32, kid: &str) -> (Value, impl Fn(&Value) -> String) {
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pem");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("the openssl command (scripts/install-test-deps installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    run(&["genrsa", "-out", key.to_str().unwrap(), &bits.to_string()]);
    let modulus = String::from_utf8(run(&[
        "rsa",
        "-in",
        key.to_str().unwrap(),
        "-noout",
        "-modulus",
    ]))
    .unwrap();
    let hex = modulus.trim().trim_start_matches("Modulus=");
    let n: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let jwk =
        json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": b64(&n), "e": "AQAB"});
    let kid = kid.to_owned();
    let sign = move |claims: &Value| {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": kid});
        let input = format!(
            "{}.{}",
            b64(&serde_json::to_vec(&header).unwrap()),
            b64(&serde_json::to_vec(claims).unwrap())
        );
        let message = dir.path().join("input");
        std::fs::write(&message, &input).unwrap();
        let signature = run(&[
            "dgst",
            "-sha256",
            "-sign",
            key.to_str().unwrap(),
            message.to_str().unwrap(),
        ]);
        format!("{input}.{}", b64(&signature))
    };
    (jwk, sign)
}

fn rsa_claims() -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    json!({"iss": ISSUER, "aud": "meshgate", "sub": "alice", "iat": now, "nbf": now, "exp": now + 300})
}

#[tokio::test]
async fn an_rsa_key_shorter_than_2048_bits_is_not_trusted() {
    let (short, sign_short) = openssl_rsa(1024, "short");
    let (long, sign_long) = openssl_rsa(2048, "long");
    let url = jwks_server(Arc::new(Mutex::new(json!({"keys": [short, long]})))).await;
    let authenticator = Authenticator::new(vec![settings(&url, Duration::from_secs(600))]).unwrap();
    let bearer = |token: String| format!("Bearer {token}");
    assert!(
        authenticator
            .authenticate(Some(&bearer(sign_long(&rsa_claims()))))
            .await
            .is_ok(),
        "a 2,048-bit key is trusted"
    );
    assert_eq!(
        authenticator
            .authenticate(Some(&bearer(sign_short(&rsa_claims()))))
            .await,
        Err(AuthError::UnknownKey),
        "a 1,024-bit key in the issuer's JWKS is not"
    );
}

#[tokio::test]
async fn a_chunked_jwks_of_a_gigabyte_is_cut_off_as_it_streams_in() {
    use axum::body::Body;
    // A JWKS sent chunked (no length stated), 1 GiB of it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", listener.local_addr().unwrap());
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = Arc::clone(&sent);
    let app = Router::new().route(
        "/jwks",
        get(move || {
            let counted = Arc::clone(&counted);
            async move {
                let chunk = axum::body::Bytes::from(vec![b' '; 1 << 20]);
                let stream = futures::stream::iter((0..1024).map(move |_| {
                    counted.fetch_add(1 << 20, std::sync::atomic::Ordering::Relaxed);
                    Ok::<_, std::io::Error>(chunk.clone())
                }));
                Body::from_stream(stream)
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let before = peak_rss(None);
    let issuer = DevIssuer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let authenticator = Authenticator::new(vec![settings(&url, Duration::from_secs(600))]).unwrap();
    assert_eq!(
        authenticator
            .authenticate(Some(&format!("Bearer {}", token(&issuer))))
            .await,
        Err(AuthError::KeysUnavailable)
    );
    let grown = peak_rss(None).saturating_sub(before);
    assert!(
        grown < 64 << 20,
        "reading the JWKS grew the process by {} MiB",
        grown >> 20
    );
    assert!(
        sent.load(std::sync::atomic::Ordering::Relaxed) < 256 << 20,
        "the gateway kept reading past the limit"
    );
}

#[tokio::test]
async fn a_hanging_jwks_endpoint_does_not_stall_tokens_whose_key_is_held() {
    let issuer = DevIssuer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let keys = jwks(&issuer);
    let hang = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", listener.local_addr().unwrap());
    let hanging = Arc::clone(&hang);
    let app = Router::new().route(
        "/jwks",
        get(move || {
            let (keys, hanging) = (keys.clone(), Arc::clone(&hanging));
            async move {
                if hanging.load(std::sync::atomic::Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                axum::Json(keys)
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    // Keys count as old after 200 ms.
    let authenticator =
        Authenticator::new(vec![settings(&url, Duration::from_millis(200))]).unwrap();
    let bearer = format!("Bearer {}", token(&issuer));
    assert!(authenticator.authenticate(Some(&bearer)).await.is_ok());
    hang.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The keys are due for a refresh and the issuer hangs (the fetch would
    // wait 5 s for it): tokens signed with held keys still get in at once.
    for _ in 0..20 {
        let started = std::time::Instant::now();
        assert!(authenticator.authenticate(Some(&bearer)).await.is_ok());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a held key waited {:?} for a hanging issuer",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn a_rotated_key_is_fetched_on_first_sight_and_a_dropped_key_stops_working() {
    let old_key = DevIssuer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let new_key = DevIssuer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let served = Arc::new(Mutex::new(jwks(&old_key)));
    let url = jwks_server(Arc::clone(&served)).await;
    let authenticator = Authenticator::new(vec![settings(&url, Duration::from_secs(600))]).unwrap();
    let bearer = |token: String| format!("Bearer {token}");

    let principal = authenticator
        .authenticate(Some(&bearer(token(&old_key))))
        .await
        .unwrap();
    assert_eq!(principal.issuer, ISSUER);
    assert_eq!(
        principal.roles,
        [meshgate_schema::Role::Researcher],
        "unknown roles are dropped"
    );
    assert_eq!(
        principal.projects,
        ["p1", "p2"],
        "a space-separated claim is a list"
    );

    // The issuer rotates: the new key is fetched when a token first names it.
    *served.lock().unwrap() = jwks(&new_key);
    assert!(
        authenticator
            .authenticate(Some(&bearer(token(&new_key))))
            .await
            .is_ok()
    );
    // The dropped key is no longer trusted once the JWKS has been fetched again.
    assert_eq!(
        authenticator
            .authenticate(Some(&bearer(token(&old_key))))
            .await,
        Err(AuthError::UnknownKey)
    );
}
