//! Bearer tokens against a real JWKS served over HTTP: only a valid token
//! gets in, and a refused request never reaches a partner.
//!
//! The cases include what the JWT library's defaults would let through
//! (no `nbf` check, 60 s of leeway, `iss`/`aud`/`sub` optional) and the
//! classic forgeries (`alg: none`, HS256 keyed with the public key, keys
//! named or embedded by the token itself).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::AlgorithmParameters;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use meshgate_gateway::dev_issuer::DevIssuer;
use meshgate_tests::{Gateway, Orthanc, TcpProxy, dicomweb_partner};
use serde_json::{Value, json};

const QUERY: &str =
    r#"{ cohortCount(project: "ground-truth") { total partners { partner status } } }"#;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

/// Claims that pass, for the issuer `iss`.
fn claims(iss: &str) -> Value {
    let now = now();
    json!({
        "iss": iss, "aud": "meshgate", "sub": "mallory",
        "iat": now, "nbf": now, "exp": now + 300,
        "roles": ["researcher"], "projects": ["ground-truth"],
    })
}

fn with(mut claims: Value, changes: Value) -> Value {
    for (name, value) in changes.as_object().unwrap() {
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(name);
        } else {
            claims[name] = value.clone();
        }
    }
    claims
}

/// Everything the process logs, at debug level and below.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

struct Sent {
    status: u16,
    code: Option<String>,
    challenge: Option<String>,
}

async fn send(gateway: &Gateway, authorization: &str) -> Sent {
    let response = reqwest::Client::new()
        .post(&gateway.url)
        .header("authorization", authorization)
        .json(&json!({"query": QUERY}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: Value = response.json().await.unwrap();
    Sent {
        status,
        code: body["errors"][0]["extensions"]["code"]
            .as_str()
            .map(str::to_owned),
        challenge,
    }
}

#[tokio::test]
async fn only_a_valid_token_gets_in_and_refused_ones_never_reach_a_partner() {
    let logs = Logs::default();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "debug,meshgate_gateway=trace",
        ))
        .with_writer(logs.clone())
        .with_ansi(false)
        .init();
    let orthanc = Orthanc::start("auth").await;
    let proxy = TcpProxy::start(
        format!("127.0.0.1:{}", orthanc.port).parse().unwrap(),
        Duration::ZERO,
    )
    .await;
    let gateway = Gateway::start(&dicomweb_partner("north", &proxy.url(), 5_000, None)).await;
    let issuer = &gateway.issuer;
    let iss = issuer.issuer().to_owned();
    let other = DevIssuer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();

    // The valid token gets in and the partner is asked.
    let valid = issuer.sign(&claims(&iss));
    let sent = send(&gateway, &format!("Bearer {valid}")).await;
    assert_eq!((sent.status, sent.code), (200, None));
    let asked = proxy.bytes_sent();
    assert!(asked > 0, "the valid request reached the partner");
    assert_eq!(issuer.jwks_requests(), 1);

    let public_key = match &issuer.jwk().algorithm {
        AlgorithmParameters::OctetKeyPair(okp) => okp.x.clone(),
        other => panic!("unexpected key {other:?}"),
    };
    let hs256 = |secret: &[u8]| {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(issuer.kid().to_owned());
        encode(
            &header,
            &claims(&iss),
            &EncodingKey::from_secret(secret).unwrap(),
        )
        .unwrap()
    };
    let with_kid = |kid: Option<&str>| {
        let mut header = issuer.header();
        header.kid = kid.map(str::to_owned);
        issuer.sign_with(&header, &claims(&iss))
    };
    let mut embedded = other.header();
    embedded.jwk = Some(other.jwk().clone());
    let mut wrong_type = issuer.header();
    wrong_type.typ = Some("dpop+jwt".into());
    let [header, _, signature]: [&str; 3] =
        valid.split('.').collect::<Vec<_>>().try_into().unwrap();
    let escalated = with(
        claims(&iss),
        json!({"roles": ["governance"], "sub": "admin"}),
    );
    let mut flipped = valid.clone();
    let last = flipped.pop().unwrap();
    flipped.push(if last == 'A' { 'B' } else { 'A' });

    let cases: Vec<(&str, String)> = vec![
        (
            "expired an hour ago",
            issuer.sign(&with(claims(&iss), json!({"exp": now() - 3600}))),
        ),
        (
            "expired 45 s ago (the library's default leeway would accept it)",
            issuer.sign(&with(claims(&iss), json!({"exp": now() - 45}))),
        ),
        (
            "not valid for another two minutes",
            issuer.sign(&with(claims(&iss), json!({"nbf": now() + 120}))),
        ),
        (
            "wrong issuer",
            issuer.sign(&with(
                claims(&iss),
                json!({"iss": "https://idp.example.org"}),
            )),
        ),
        (
            "wrong audience",
            issuer.sign(&with(claims(&iss), json!({"aud": "another-service"}))),
        ),
        (
            "no aud",
            issuer.sign(&with(claims(&iss), json!({"aud": null}))),
        ),
        (
            "no iss",
            issuer.sign(&with(claims(&iss), json!({"iss": null}))),
        ),
        (
            "no sub",
            issuer.sign(&with(claims(&iss), json!({"sub": null}))),
        ),
        (
            "empty sub",
            issuer.sign(&with(claims(&iss), json!({"sub": ""}))),
        ),
        (
            "no exp",
            issuer.sign(&with(claims(&iss), json!({"exp": null}))),
        ),
        (
            "no nbf",
            issuer.sign(&with(claims(&iss), json!({"nbf": null}))),
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT"})),
                b64(&claims(&iss))
            ),
        ),
        (
            "HS256 keyed with the public key as published",
            hs256(public_key.as_bytes()),
        ),
        (
            "HS256 keyed with the raw public key",
            hs256(&URL_SAFE_NO_PAD.decode(&public_key).unwrap()),
        ),
        ("an unknown kid", with_kid(Some("rotated-away"))),
        ("no kid", with_kid(None)),
        ("a key from another issuer", other.sign(&claims(&iss))),
        (
            "a key embedded in the token's header",
            other.sign_with(&embedded, &claims(&iss)),
        ),
        (
            "a typ that is not an access token",
            issuer.sign_with(&wrong_type, &claims(&iss)),
        ),
        (
            "a tampered payload",
            format!("{header}.{}.{signature}", b64(&escalated)),
        ),
        ("a tampered signature", flipped),
        (
            "valid for a hundred years",
            issuer.sign(&with(
                claims(&iss),
                json!({"exp": now() + 100 * 365 * 86_400}),
            )),
        ),
        (
            "valid for two days, without iat",
            issuer.sign(&with(
                claims(&iss),
                json!({"iat": null, "exp": now() + 2 * 86_400}),
            )),
        ),
        (
            "issued an hour from now",
            issuer.sign(&with(claims(&iss), json!({"iat": now() + 3600}))),
        ),
        (
            "a NUL in the subject",
            issuer.sign(&with(claims(&iss), json!({"sub": "mallory\u{0}admin"}))),
        ),
        (
            "CR/LF in a project, forging a log line",
            issuer.sign(&with(
                claims(&iss),
                json!({"projects": ["ground-truth\r\nINFO granted governance"]}),
            )),
        ),
        (
            "a right-to-left override in the subject",
            issuer.sign(&with(claims(&iss), json!({"sub": "mallory\u{202E}nimda"}))),
        ),
        ("not a JWT", "not-a-token".to_owned()),
        ("an oversized token", "a".repeat(20_000)),
    ];
    for (case, token) in &cases {
        let sent = send(&gateway, &format!("Bearer {token}")).await;
        assert_eq!(
            (sent.status, sent.code.as_deref()),
            (401, Some("UNAUTHENTICATED")),
            "{case}"
        );
        let challenge = sent.challenge.unwrap_or_default();
        assert!(
            challenge.starts_with("Bearer realm=\"meshgate\""),
            "{case}: {challenge}"
        );
        assert!(
            challenge.contains("error=\"invalid_token\""),
            "{case}: {challenge}"
        );
    }
    for authorization in ["", "Basic bWFsbG9yeTpzZWNyZXQ=", "Bearer"] {
        let sent = send(&gateway, authorization).await;
        assert_eq!(sent.status, 401, "{authorization:?}");
        assert!(sent.challenge.is_some());
    }
    assert_eq!(
        proxy.bytes_sent(),
        asked,
        "a refused request reached the partner"
    );
    assert_eq!(
        issuer.jwks_requests(),
        1,
        "unknown kids must not make every request fetch the JWKS"
    );
    assert_eq!(
        other.jwks_requests(),
        0,
        "a token never chooses where keys come from"
    );
}
