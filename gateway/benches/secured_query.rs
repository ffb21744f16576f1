//! What authentication, policies and de-identification add to a query,
//! as ratios to the same query without them, measured in the same run.
//!
//! Three partners of 300 synthetic studies each (files connectors, so the
//! partners themselves cost little and the gateway's own work shows). The
//! query: a cohort count and the first page of 20 studies with FHIR, for
//! CT or MR since 2010 (a date range: de-identifying partners evaluate it on
//! the shifted dates they release).
//! - baseline: the GraphQL schema executed in process for a caller already
//!   known, under a permit-all policy that releases identified records (the
//!   gateway has no policy-free mode);
//! - auth: the same through the HTTP router with a bearer token verified
//!   against the issuer's JWKS (keys cached);
//! - auth + policies + de-identification: the example consortium policies
//!   and every partner releasing records under the fullest de-identification
//!   profile, with count disclosure control.
//!
//! Run: `cargo bench -p meshgate-gateway --bench secured_query`

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

use std::path::Path;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use criterion::{Criterion, criterion_group, criterion_main};
use meshgate_gateway::config::{Config, ProcessEnvironment};
use meshgate_gateway::dev_issuer::DevIssuer;
use meshgate_gateway::graphql::schema;
use meshgate_gateway::request::RequestContext;
use meshgate_gateway::synth::{SynthSpec, synthesise};
use meshgate_gateway::{Gateway, build_app, start};
use serde_json::json;
use tower::ServiceExt;

const QUERY: &str = r#"{
  cohortCount(project: "lung-cancer", filter: {modalities: [CT, MR], studyDate: {from: "2010-01-01"}}) { total partners { partner count } }
  imagingStudies(project: "lung-cancer", first: 20, filter: {modalities: [CT, MR], studyDate: {from: "2010-01-01"}}) {
    nodes { studyInstanceUid started patient { reference age } fhir }
    partners { partner status count }
  }
}"#;

const PERMIT_ALL: &str =
    "permit (principal, action in Meshgate::Action::\"QueryStudies\", resource);";

const DEIDENTIFY_ALL: &str = "@deidentification(\"basic retain-longitudinal-modified-dates retain-patient-characteristics\")\n\
     permit (principal, action in [Meshgate::Action::\"CountStudies\", Meshgate::Action::\"SearchDeidentifiedStudies\"], resource);";

/// A gateway over the three partners under the given policies.
async fn gateway(
    dir: &Path,
    issuer: &DevIssuer,
    consortium: &str,
    partner_policy: &str,
) -> Gateway {
    std::fs::write(dir.join("consortium.cedar"), consortium).unwrap();
    std::fs::write(dir.join("partner.cedar"), partner_policy).unwrap();
    std::fs::write(
        dir.join("checkpoint.pem"),
        meshgate_gateway::audit::new_checkpoint_key_pem().unwrap(),
    )
    .unwrap();
    let mut text = format!(
        "[auth]\n[[auth.issuers]]\nissuer = \"{}\"\naudiences = [\"meshgate\"]\njwks_url = \"{}\"\ntrusted_for = {{ institutions = [\"*\"], roles = [\"*\"], projects = [\"*\"], permissions = [\"*\"] }}\n\n\
         [policies]\nconsortium = [\"consortium.cedar\"]\n\n[deidentification]\nkey = \"${{file:{}}}\"\n\n\
         [audit]\nstore = \"sqlite:audit.db\"\ncheckpoint_key = \"${{file:{}}}\"\n\n\
         [[projects]]\nid = \"lung-cancer\"\ntitle = \"Lung\"\npurposes = [\"DUO:0000006\"]\nethics_approved = true\n",
        issuer.issuer(),
        issuer.jwks_url(),
        dir.join("key").display(),
        dir.join("checkpoint.pem").display(),
    );
    for id in ["north", "south", "east"] {
        text.push_str(&format!(
            "\n[[partners]]\nid = \"{id}\"\nname = \"{id}\"\ninstitution = \"{id}\"\nmin_count = 10\n\
             data_use = {{ permission = \"DUO:0000042\" }}\npolicies = [\"partner.cedar\"]\n\
             connector = {{ kind = \"files\", path = \"{}\" }}\n",
            dir.join(id).join("dicom").display()
        ));
    }
    let loaded = Config::from_toml(&text, &dir.join("bench.toml"), &ProcessEnvironment).unwrap();
    start(&loaded).await.unwrap()
}

fn benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("key"),
        "bench pseudonymisation key, 32 bytes or more",
    )
    .unwrap();
    for (id, seed) in [("north", 1), ("south", 2), ("east", 3)] {
        synthesise(
            &SynthSpec {
                partner: id.into(),
                studies: 300,
                seed,
            },
            &dir.path().join(id),
        )
        .unwrap();
    }
    let (issuer, open, secured) = runtime.block_on(async {
        let issuer = DevIssuer::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let consortium = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../policies/examples/consortium/access.cedar"),
        )
        .unwrap();
        let open = gateway(dir.path(), &issuer, PERMIT_ALL, PERMIT_ALL).await;
        let secured_dir = dir.path().join("secured");
        std::fs::create_dir_all(&secured_dir).unwrap();
        for id in ["north", "south", "east"] {
            std::os::unix::fs::symlink(dir.path().join(id), secured_dir.join(id)).unwrap();
        }
        std::fs::write(
            secured_dir.join("key"),
            "bench pseudonymisation key, 32 bytes or more",
        )
        .unwrap();
        let secured = gateway(&secured_dir, &issuer, &consortium, DEIDENTIFY_ALL).await;
        (issuer, open, secured)
    });
    let token = issuer.token(
        &json!({"sub": "bench", "roles": ["researcher"], "projects": ["lung-cancer"]}),
        Duration::from_secs(3600),
    );
    let principal = meshgate_schema::Principal {
        issuer: issuer.issuer().into(),
        subject: "bench".into(),
        roles: vec![meshgate_schema::Role::Researcher],
        projects: vec!["lung-cancer".into()],
        ..Default::default()
    };
    let baseline_schema = schema(open.server.profile);
    let baseline_services = open.registry.current().services.clone();
    let open_router = build_app(open);
    let secured_router = build_app(secured);

    let baseline = || async {
        let mut context = RequestContext::new("bench".into(), None);
        context.principal = Some(principal.clone());
        let response = baseline_schema
            .execute(
                async_graphql::Request::new(QUERY)
                    .data(context)
                    .data(baseline_services.clone()),
            )
            .await;
        assert!(response.errors.is_empty(), "{:?}", response.errors);
    };
    let routed = |router: &axum::Router| {
        let router = router.clone();
        let token = token.clone();
        async move {
            let request = Request::post("/graphql")
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {token}"))
                .body(Body::from(json!({"query": QUERY}).to_string()))
                .unwrap();
            let response = router.oneshot(request).await.unwrap();
            assert_eq!(response.status(), 200);
            axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
        }
    };

    // Interleaved rounds, so noise from other work on the machine falls on all three.
    let mut times = [Vec::new(), Vec::new(), Vec::new()];
    runtime.block_on(async {
        for _ in 0..5 {
            baseline().await;
            routed(&open_router).await;
            routed(&secured_router).await;
        }
        for _ in 0..200 {
            let started = Instant::now();
            baseline().await;
            times[0].push(started.elapsed());
            let started = Instant::now();
            routed(&open_router).await;
            times[1].push(started.elapsed());
            let started = Instant::now();
            routed(&secured_router).await;
            times[2].push(started.elapsed());
        }
    });
    let median = |samples: &mut Vec<Duration>| {
        samples.sort();
        samples[samples.len() / 2].as_secs_f64() * 1000.0
    };
    let [mut a, mut b, mut d] = times;
    let (base, auth, full) = (median(&mut a), median(&mut b), median(&mut d));
    println!(
        "query median over 200 interleaved rounds: baseline {base:.2} ms; auth {auth:.2} ms (ratio {:.2}); auth + policies + de-identification {full:.2} ms (ratio {:.2})",
        auth / base,
        full / base
    );

    c.bench_function("query/baseline", |bench| {
        bench.to_async(&runtime).iter(baseline)
    });
    c.bench_function("query/auth", |bench| {
        bench.to_async(&runtime).iter(|| routed(&open_router))
    });
    c.bench_function("query/auth+policies+deidentification", |bench| {
        bench.to_async(&runtime).iter(|| routed(&secured_router))
    });
}

criterion_group!(secured_query, benches);
criterion_main!(secured_query);
