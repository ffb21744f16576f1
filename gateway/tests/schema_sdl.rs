//! The committed SDL (`schema/meshgate.graphql`) is the API contract
//! clients read; it must match what the code serves.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

#[test]
fn committed_sdl_matches_the_schema_the_gateway_serves() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema/meshgate.graphql");
    let committed = std::fs::read_to_string(&path).unwrap();
    let served = meshgate_gateway::graphql::sdl();
    assert!(
        committed == served,
        "schema/meshgate.graphql is out of date: run `cargo run -p meshgate-gateway -- schema > schema/meshgate.graphql` and review the diff"
    );
}
