//! SigV4 signing against AWS's published Signature Version 4 test suite.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

use std::path::Path;

use meshgate_connectors::Secret;
use meshgate_connectors::sigv4::{AwsCredentials, Scope, sign};
use time::PrimitiveDateTime;
use time::macros::format_description;

#[test]
fn signatures_match_aws_published_signature_version_4_test_vectors() {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sigv4");
    let mut checked = 0;
    for entry in std::fs::read_dir(&folder).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "req") {
            continue;
        }
        let request = std::fs::read_to_string(&path).unwrap();
        let expected = std::fs::read_to_string(path.with_extension("authz")).unwrap();
        let (head, body) = request.split_once("\n\n").unwrap_or((&request, ""));
        let mut lines = head.lines();
        let request_line = lines.next().unwrap();
        let mut parts = request_line.splitn(3, ' ');
        let (method, target) = (parts.next().unwrap(), parts.next().unwrap());
        let mut host = String::new();
        let mut date = String::new();
        let mut token = None;
        let mut headers = Vec::new();
        for line in lines {
            let (name, value) = line.split_once(':').unwrap();
            match name.to_ascii_lowercase().as_str() {
                "host" => host = value.to_owned(),
                "x-amz-date" => date = value.to_owned(),
                "x-amz-security-token" => token = Some(Secret::new(value)),
                _ => headers.push((name.to_owned(), value.to_owned())),
            }
        }
        let url = reqwest::Url::parse(&format!("https://{host}{target}")).unwrap();
        let time = PrimitiveDateTime::parse(
            &date,
            format_description!("[year][month][day]T[hour][minute][second]Z"),
        )
        .unwrap()
        .assume_utc();
        let credentials = AwsCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: Secret::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
            session_token: token,
        };
        let borrowed: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let added = sign(
            method,
            &url,
            &borrowed,
            body.as_bytes(),
            &credentials,
            Scope {
                region: "us-east-1",
                service: "service",
                time,
            },
        );
        let authorization = added
            .iter()
            .find(|(name, _)| *name == "authorization")
            .map(|(_, v)| v.clone())
            .unwrap();
        assert_eq!(authorization, expected.trim(), "{}", path.display());
        checked += 1;
    }
    assert!(checked >= 9, "only {checked} vectors");
}
