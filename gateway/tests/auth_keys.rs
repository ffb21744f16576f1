//! Key rotation at an issuer: the gateway follows the issuer's JWKS when a
//! token names a key it has not seen, and stops trusting keys the issuer
//! has dropped.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
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
    let authenticator = Authenticator::new(vec![IssuerSettings {
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
        max_key_age: Duration::from_secs(600),
    }])
    .unwrap();
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
