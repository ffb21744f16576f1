//! What policy decisions and de-identification cost, each as a ratio to a
//! baseline measured in the same run (machines here are shared and noisy).
//!
//! - Policy decision (one partner, one query: up to three actions, each
//!   against the consortium's and the partner's set) with the example
//!   policies and with ~500 policies, against the same decision with empty
//!   policy sets (entity building and request checks only). p50/p99 come
//!   from 20,000 timed decisions; criterion reports means.
//! - De-identifying one study (4 series × 3 instances) under the fullest
//!   profile, against cloning it.
//!
//! Run: `cargo bench -p meshgate-policies --bench decisions`

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use meshgate_policies::deid::DeidOption;
use meshgate_policies::{
    Authorizer, Deidentifier, MasterKey, PartnerFacts, PolicyConfig, PolicyFile, Profile,
    ProjectFacts,
};
use meshgate_schema::{Instance, PatientSex, Principal, Role, Series, Study};

const NOW: i64 = 1_790_000_000;

fn examples(name: &str) -> PolicyFile {
    PolicyFile::read(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(name),
    )
    .unwrap()
}

fn partner(id: &str, data_use: &str) -> PartnerFacts {
    PartnerFacts {
        id: id.into(),
        institution: format!("{id}-institution"),
        data_use: data_use.into(),
        data_use_modifiers: vec![],
    }
}

fn project(id: &str, purpose: &str) -> ProjectFacts {
    ProjectFacts {
        id: id.into(),
        purposes: vec![purpose.into()],
        commercial: false,
        ethics_approved: true,
    }
}

/// The example policies, partners and projects.
fn example_config() -> PolicyConfig {
    PolicyConfig {
        consortium: ["access", "administration", "data-use"]
            .map(|n| examples(&format!("consortium/{n}.cedar")))
            .to_vec(),
        partners: vec![
            (
                partner("north", "DUO:0000042"),
                vec![examples("partners/north.cedar")],
            ),
            (
                partner("south", "DUO:0000042"),
                vec![examples("partners/south.cedar")],
            ),
            (
                partner("east", "DUO:0000006"),
                vec![examples("partners/east.cedar")],
            ),
        ],
        projects: vec![
            project("demo", "DUO:0000042"),
            project("lung-cancer", "DUO:0000006"),
        ],
    }
}

/// The example set plus ~490 project-specific rules a large consortium
/// accumulates: per-project forbids and per-project permits.
fn large_config() -> PolicyConfig {
    let mut config = example_config();
    let mut forbids = String::new();
    let mut permits = String::new();
    for i in 0..245 {
        forbids.push_str(&format!(
            "@reason(\"project {{project}} may not use {{partner}}'s data after its approval ends\")\n\
             forbid (principal, action in Meshgate::Action::\"QueryStudies\", resource)\n\
             when {{ context.project == Meshgate::Project::\"p{i}\" && context.now > {} }};\n",
            NOW + 86_400 + i
        ));
        permits.push_str(&format!(
            "permit (principal, action == Meshgate::Action::\"CountStudies\", resource)\n\
             when {{ principal.permissions.contains(\"grant-{i}\") && principal.projects.contains(context.project) }};\n"
        ));
        config
            .projects
            .push(project(&format!("p{i}"), "DUO:0000006"));
    }
    config.consortium.push(PolicyFile {
        path: "generated-forbids.cedar".into(),
        text: forbids,
    });
    config.partners[0].1.push(PolicyFile {
        path: "generated-permits.cedar".into(),
        text: permits,
    });
    config
}

fn empty_config() -> PolicyConfig {
    let mut config = example_config();
    config.consortium.clear();
    for (_, files) in &mut config.partners {
        files.clear();
    }
    config
}

fn researcher() -> Principal {
    Principal {
        issuer: "bench".into(),
        subject: "alice".into(),
        institution: Some("westfield-university".into()),
        roles: vec![Role::Researcher],
        projects: vec!["demo".into(), "lung-cancer".into()],
        permissions: vec!["grant-7".into()],
    }
}

fn percentiles(authorizer: &Authorizer, principal: &Principal) -> (f64, f64) {
    let mut samples: Vec<u128> = (0..20_000)
        .map(|_| {
            let started = Instant::now();
            black_box(authorizer.decide(principal, "lung-cancer", "north", NOW));
            started.elapsed().as_nanos()
        })
        .collect();
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize] as f64 / 1000.0;
    (at(0.50), at(0.99))
}

fn study() -> Study {
    Study {
        uid: "2.25.123456789012345678901234567890".into(),
        patient_id: Some("NOR0001234".into()),
        patient_name: Some("DOE^JANE".into()),
        patient_sex: Some(PatientSex::Female),
        patient_birth_date: Some(time::macros::date!(1950 - 02 - 03)),
        date: Some(time::macros::date!(2020 - 05 - 06)),
        time: Some(time::macros::time!(10:30)),
        accession_number: Some("NORA00012345".into()),
        description: Some("CT chest".into()),
        modalities: vec!["CT".into()],
        body_parts: vec!["CHEST".into()],
        number_of_series: Some(4),
        number_of_instances: Some(12),
        series: (0..4)
            .map(|s| Series {
                uid: format!("2.25.1234567890123456789012345678{s}"),
                number: Some(s + 1),
                modality: Some("CT".into()),
                body_part: Some("CHEST".into()),
                description: Some("axial".into()),
                date: Some(time::macros::date!(2020 - 05 - 06)),
                number_of_instances: Some(3),
                instances: (0..3)
                    .map(|i| Instance {
                        uid: format!("2.25.98765432109876543210987654321{s}{i}"),
                        sop_class: Some("1.2.840.10008.5.1.4.1.1.2".into()),
                        number: Some(i + 1),
                    })
                    .collect(),
                ..Series::default()
            })
            .collect(),
        ..Study::default()
    }
}

fn benches(c: &mut Criterion) {
    let principal = researcher();
    let sets = [
        (
            "empty (baseline)",
            Authorizer::new(&empty_config()).unwrap(),
        ),
        ("example", Authorizer::new(&example_config()).unwrap()),
        ("~500 policies", Authorizer::new(&large_config()).unwrap()),
    ];
    let (base_p50, base_p99) = percentiles(&sets[0].1, &principal);
    for (name, authorizer) in &sets {
        let (p50, p99) = percentiles(authorizer, &principal);
        println!(
            "decision, {name} ({} policies): p50 {p50:.1} µs, p99 {p99:.1} µs; ratio to empty sets: p50 {:.2}, p99 {:.2}",
            authorizer.policy_count(),
            p50 / base_p50,
            p99 / base_p99,
        );
        c.bench_function(&format!("decision/{name}"), |b| {
            b.iter(|| black_box(authorizer.decide(&principal, "lung-cancer", "north", NOW)))
        });
    }

    let deid = Deidentifier::new(
        MasterKey::new(&[9; 32]).unwrap().project_key("lung-cancer"),
        Profile::with(DeidOption::ALL),
        "north",
    );
    let study = study();
    let timed = |f: &dyn Fn()| {
        let started = Instant::now();
        for _ in 0..20_000 {
            f();
        }
        started.elapsed().as_nanos() as f64 / 20_000.0 / 1000.0
    };
    let clone = timed(&|| {
        black_box(study.clone());
    });
    let deidentify = timed(&|| {
        black_box(deid.study(&study));
    });
    println!(
        "de-identify one study (4 series x 3 instances): {deidentify:.1} µs; clone (baseline) {clone:.2} µs; ratio {:.1}",
        deidentify / clone
    );
    c.bench_function("deidentify/study", |b| {
        b.iter(|| black_box(deid.study(&study)))
    });
    c.bench_function("deidentify/clone (baseline)", |b| {
        b.iter(|| black_box(study.clone()))
    });
}

criterion_group!(decisions, benches);
criterion_main!(decisions);
