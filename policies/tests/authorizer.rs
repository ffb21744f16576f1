//! The authorizer over small policy sets: loading errors name file and line,
//! partners only narrow, and anything that cannot be evaluated denies.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::path::PathBuf;

use meshgate_policies::{
    AdminAction, Authorizer, Disclosure, PartnerFacts, PolicyConfig, PolicyFile, Profile,
    ProjectFacts,
};
use meshgate_schema::{Principal, Role};

const NOW: i64 = 1_790_000_000;

const CONSORTIUM: &str = r#"
@id("researchers")
@deidentification("basic retain-patient-characteristics retain-longitudinal-modified-dates")
permit (principal, action in [Meshgate::Action::"CountStudies", Meshgate::Action::"SearchDeidentifiedStudies"], resource)
when { principal.roles.contains("researcher") && principal.projects.contains(context.project) };
"#;

fn file(name: &str, text: &str) -> PolicyFile {
    PolicyFile {
        path: PathBuf::from(name),
        text: text.to_owned(),
    }
}

fn config(consortium: &str, partner: &str) -> PolicyConfig {
    PolicyConfig {
        consortium: vec![file("consortium.cedar", consortium)],
        partners: vec![(
            PartnerFacts {
                id: "north".into(),
                institution: "northfield".into(),
                data_use: "DUO:0000042".into(),
                data_use_modifiers: vec![],
            },
            vec![file("north.cedar", partner)],
        )],
        projects: vec![ProjectFacts {
            id: "p1".into(),
            purposes: vec!["DUO:0000006".into()],
            commercial: false,
            ethics_approved: true,
        }],
    }
}

fn researcher() -> Principal {
    Principal {
        issuer: "test".into(),
        subject: "alice".into(),
        institution: Some("westfield".into()),
        roles: vec![Role::Researcher],
        projects: vec!["p1".into()],
        permissions: vec![],
    }
}

fn decide(partner_policy: &str) -> Disclosure {
    Authorizer::new(&config(CONSORTIUM, partner_policy))
        .unwrap()
        .decide(&researcher(), "p1", "north", NOW)
}

const PARTNER_ALLOWS_ALL: &str = r#"permit (principal, action, resource);"#;

#[test]
fn a_partner_that_allows_everything_gets_what_the_consortium_allows_and_no_more() {
    assert_eq!(
        decide(PARTNER_ALLOWS_ALL),
        Disclosure::Deidentified(
            Profile::parse(
                "basic retain-patient-characteristics retain-longitudinal-modified-dates"
            )
            .unwrap()
        ),
        "identified access needs the consortium's permit too"
    );
}

#[test]
fn a_partner_narrows_to_counts_only_by_permitting_only_counting() {
    // The counts are computed over the view the permitting policies name:
    // the partner's own annotation, else the consortium's.
    assert_eq!(
        decide(r#"permit (principal, action == Meshgate::Action::"CountStudies", resource);"#),
        Disclosure::CountsOnly(
            Profile::parse(
                "basic retain-patient-characteristics retain-longitudinal-modified-dates"
            )
            .unwrap()
        )
    );
    assert_eq!(
        decide(
            r#"@deidentification("basic")
            permit (principal, action == Meshgate::Action::"CountStudies", resource);"#
        ),
        Disclosure::CountsOnly(Profile::basic())
    );
}

#[test]
fn a_partner_with_no_policy_denies_with_a_reason() {
    let Disclosure::Denied { reasons } = decide("") else {
        panic!("expected a denial");
    };
    assert_eq!(
        reasons,
        ["no policy of partner north permits queries for project p1 by you"]
    );
}

#[test]
fn a_partners_profile_is_stricter_than_the_consortiums_when_it_names_one() {
    let decision = decide(
        r#"@deidentification("basic")
        permit (principal, action, resource);"#,
    );
    assert_eq!(decision, Disclosure::Deidentified(Profile::basic()));
}

#[test]
fn a_forbid_reason_names_the_project_and_partner() {
    let decision = decide(
        r#"permit (principal, action, resource);
        @reason("project {project} is not approved for {partner}'s dataset")
        forbid (principal, action in Meshgate::Action::"QueryStudies", resource)
        when { context.project == Meshgate::Project::"p1" };"#,
    );
    assert_eq!(
        decision,
        Disclosure::Denied {
            reasons: vec!["project p1 is not approved for north's dataset".into()]
        }
    );
}

#[test]
fn a_policy_that_errors_at_evaluation_denies() {
    // The forbid overflows. Cedar skips a policy that errors, so without the
    // gateway's rule the permit would allow.
    let decision = decide(
        r#"permit (principal, action, resource);
        forbid (principal, action, resource) when { context.now * 100000000000 > 0 };"#,
    );
    assert!(
        matches!(decision, Disclosure::Denied { .. }),
        "{decision:?}"
    );
}

#[test]
fn a_policy_with_a_syntax_error_stops_loading_with_file_and_line() {
    let error = Authorizer::new(&config(
        CONSORTIUM,
        "permit (principal, action, resource);\n\npermit (principal, action resource);\n",
    ))
    .unwrap_err();
    assert_eq!(error.file, PathBuf::from("north.cedar"));
    assert_eq!(error.line, Some(3), "{error}");
}

#[test]
fn a_policy_that_does_not_fit_the_schema_stops_loading_with_file_line_and_reason() {
    let error = Authorizer::new(&config(
        CONSORTIUM,
        "permit (principal, action, resource);\npermit (principal, action, resource)\nwhen { principal.clearance > 3 };\n",
    ))
    .unwrap_err();
    assert_eq!(
        (error.file.to_str(), error.line),
        (Some("north.cedar"), Some(3)),
        "{error}"
    );
    assert!(error.message.contains("clearance"), "{error}");
}

#[test]
fn an_unknown_deidentification_option_stops_loading() {
    let error = Authorizer::new(&config(
        CONSORTIUM,
        "\n@deidentification(\"basic retain-faces\")\npermit (principal, action, resource);\n",
    ))
    .unwrap_err();
    assert_eq!(error.line, Some(2), "{error}");
    assert!(error.message.contains("retain-faces"), "{error}");
}

#[test]
fn administration_is_decided_by_the_consortium_alone_and_denied_by_default() {
    let authorizer = Authorizer::new(&config(
        r#"permit (principal, action == Meshgate::Action::"ViewAudit", resource)
        when { principal.roles.contains("governance") };"#,
        "",
    ))
    .unwrap();
    let mut governance = researcher();
    governance.roles = vec![Role::Governance];
    assert!(authorizer.allows(&governance, AdminAction::ViewAudit, "north", NOW));
    assert!(!authorizer.allows(&researcher(), AdminAction::ViewAudit, "north", NOW));
    assert!(!authorizer.allows(&governance, AdminAction::ApproveConnector, "north", NOW));
}

#[test]
fn a_partner_releases_records_for_one_project_counts_for_others_and_nothing_for_commercial_ones() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/project-specific.cedar"),
    )
    .unwrap();
    let mut config = config(CONSORTIUM, &text);
    config.projects = ["lung-cancer", "cohort-b", "pharma"]
        .into_iter()
        .map(|id| ProjectFacts {
            id: id.into(),
            purposes: vec!["DUO:0000006".into()],
            commercial: id == "pharma",
            ethics_approved: true,
        })
        .collect();
    let authorizer = Authorizer::new(&config).unwrap();
    let mut researcher = researcher();
    researcher.projects = vec!["lung-cancer".into(), "cohort-b".into(), "pharma".into()];
    let decide = |project: &str| authorizer.decide(&researcher, project, "north", NOW);
    let dates = Profile::parse("basic retain-longitudinal-modified-dates").unwrap();
    assert_eq!(
        decide("lung-cancer"),
        Disclosure::Deidentified(dates.clone())
    );
    assert_eq!(decide("cohort-b"), Disclosure::CountsOnly(dates));
    let Disclosure::Denied { reasons } = decide("pharma") else {
        panic!("commercial projects are refused");
    };
    assert_eq!(
        reasons,
        ["north does not take part in commercial projects such as pharma"]
    );
}

#[test]
fn the_same_subject_from_another_issuer_is_another_user() {
    let partner = r#"
        permit (principal, action in Meshgate::Action::"QueryStudies", resource)
        when { principal.issuer == "test" && principal.subject == "alice" };
        permit (principal == Meshgate::User::"alice", action in Meshgate::Action::"QueryStudies", resource);
    "#;
    let authorizer = Authorizer::new(&config(CONSORTIUM, partner)).unwrap();
    let alice = researcher();
    assert!(matches!(
        authorizer.decide(&alice, "p1", "north", NOW),
        Disclosure::Deidentified(_)
    ));
    let impostor = Principal {
        issuer: "another-issuer".into(),
        ..researcher()
    };
    assert!(
        matches!(
            authorizer.decide(&impostor, "p1", "north", NOW),
            Disclosure::Denied { .. }
        ),
        "a bare user id or a subject alone must not let another issuer's alice in"
    );
}

#[test]
fn a_decision_travels_as_json_and_comes_back_equal_and_an_unknown_profile_is_refused() {
    use meshgate_policies::{Disclosure, Profile};
    let decisions = [
        Disclosure::Denied {
            reasons: vec!["not approved".into()],
        },
        Disclosure::CountsOnly(Profile::basic()),
        Disclosure::Deidentified(Profile::parse("basic+retain-device-identity").unwrap()),
        Disclosure::Identified,
    ];
    for decision in decisions {
        let wire = serde_json::to_string(&decision).unwrap();
        assert_eq!(
            serde_json::from_str::<Disclosure>(&wire).unwrap(),
            decision,
            "{wire}"
        );
    }
    assert!(
        serde_json::from_str::<Disclosure>(r#"{"level":"DEIDENTIFIED","with":"basic+keep-names"}"#)
            .is_err()
    );
}
