//! Partners and policies change while the gateway serves: reloads under
//! load, refused reloads, the snapshot hash in answers and audit records,
//! cache entries of unchanged partners, and the on-disk watcher and
//! control socket.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use meshgate_gateway::audit;
use meshgate_gateway::registry::{self, ReloadError};
use meshgate_tests::{Gateway, OrthancPartner};
use serde_json::{Value, json};

const QUERY: &str = r#"{
  me { snapshot }
  partners { id snapshot }
  cohortCount(project: "ground-truth") { total partners { partner status disclosure count } }
}"#;

/// One configuration of the test: which partners are in it, `b`'s page
/// size (a change of its connector) and whether `a`'s own policy denies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Variant {
    with_c: bool,
    b_page_size: i64,
    a_denies: bool,
}

impl Variant {
    fn nth(n: usize) -> Variant {
        Variant {
            with_c: n % 3 != 1,
            b_page_size: if n.is_multiple_of(2) { 50 } else { 25 },
            a_denies: n % 4 == 3,
        }
    }
}

/// What every answer under a variant must say: each partner's decision
/// and count.
type Expected = BTreeMap<String, (&'static str, Option<u64>)>;

struct Setup {
    /// The configuration as the harness wrote it.
    base: toml::Table,
    file: PathBuf,
    allow: PathBuf,
    deny: PathBuf,
    counts: HashMap<String, u64>,
}

impl Setup {
    fn table(&self, variant: Variant) -> toml::Table {
        let mut table = self.base.clone();
        let partners = table["partners"].as_array_mut().unwrap();
        partners.retain(|p| variant.with_c || p["id"].as_str() != Some("c"));
        for partner in partners.iter_mut() {
            let partner = partner.as_table_mut().unwrap();
            match partner["id"].as_str().unwrap() {
                "a" => {
                    let policy = if variant.a_denies {
                        &self.deny
                    } else {
                        &self.allow
                    };
                    partner.insert(
                        "policies".into(),
                        vec![toml::Value::from(policy.display().to_string())].into(),
                    );
                }
                "b" => {
                    partner["connector"]
                        .as_table_mut()
                        .unwrap()
                        .insert("page_size".into(), variant.b_page_size.into());
                }
                _ => {}
            }
        }
        table
    }

    fn write(&self, variant: Variant) {
        write_atomically(&self.file, &toml::to_string(&self.table(variant)).unwrap());
    }

    fn expected(&self, variant: Variant) -> Expected {
        let mut expected = Expected::new();
        for id in ["a", "b", "c"] {
            if id == "c" && !variant.with_c {
                continue;
            }
            let decision = if id == "a" && variant.a_denies {
                ("DENIED", None)
            } else {
                ("IDENTIFIED", Some(self.counts[id]))
            };
            expected.insert(id.to_owned(), decision);
        }
        expected
    }
}

/// Replaces `path` as editors and deployment tools do: a new file renamed
/// over the old, so a reader never sees half of it.
fn write_atomically(path: &Path, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// The snapshot an answer names, checked to be one snapshot throughout,
/// and what it says of each partner.
fn read_answer(body: &Value) -> (String, Expected) {
    assert!(body.get("errors").is_none(), "a query failed: {body}");
    let data = &body["data"];
    let hash = data["me"]["snapshot"].as_str().unwrap().to_owned();
    let listed: Vec<&str> = data["partners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert_eq!(p["snapshot"], hash, "partners of another snapshot: {body}");
            p["id"].as_str().unwrap()
        })
        .collect();
    let mut seen = Expected::new();
    let mut total = 0;
    for partner in data["cohortCount"]["partners"].as_array().unwrap() {
        let (status, disclosure) = (
            partner["status"].as_str().unwrap(),
            partner["disclosure"].as_str().unwrap(),
        );
        assert!(
            matches!(
                (status, disclosure),
                ("OK", "IDENTIFIED") | ("DENIED", "DENIED")
            ),
            "a partner did not answer: {body}"
        );
        let count = partner["count"].as_u64();
        total += count.unwrap_or(0);
        let disclosure = if disclosure == "DENIED" {
            "DENIED"
        } else {
            "IDENTIFIED"
        };
        seen.insert(
            partner["partner"].as_str().unwrap().to_owned(),
            (disclosure, count),
        );
    }
    let counted: Vec<&str> = seen.keys().map(String::as_str).collect();
    let mut listed = listed;
    listed.sort_unstable();
    assert_eq!(listed, counted, "listed and asked partners differ: {body}");
    assert_eq!(data["cohortCount"]["total"].as_u64(), Some(total), "{body}");
    (hash, seen)
}

/// `name{label="value"} N` from a scrape (0 when absent).
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

async fn start() -> (Gateway, Setup, Vec<OrthancPartner>) {
    let partners = futures::future::join_all(
        [("a", 11, 71), ("b", 13, 72), ("c", 17, 73)]
            .map(|(id, studies, seed)| OrthancPartner::start(id, studies, seed)),
    )
    .await;
    let tables: String = partners.iter().map(|p| p.table(20_000, Some(50))).collect();
    let gateway = Gateway::start(&tables).await;
    let file = gateway.config_file.clone();
    let base: toml::Table = toml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let allow = PathBuf::from(base["partners"][0]["policies"][0].as_str().unwrap());
    let deny = file.with_file_name("deny.cedar");
    std::fs::write(
        &deny,
        "@id(\"closed-for-maintenance\")\n@reason(\"closed for maintenance\")\n\
         forbid (principal, action in Meshgate::Action::\"QueryStudies\", resource);\n",
    )
    .unwrap();
    let counts = partners
        .iter()
        .map(|p| (p.data.id.clone(), p.data.manifest.len() as u64))
        .collect();
    let setup = Setup {
        base,
        file,
        allow,
        deny,
        counts,
    };
    (gateway, setup, partners)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_reloads_under_load_fail_no_query_and_every_answer_comes_from_one_snapshot() {
    let (gateway, setup, _partners) = start().await;
    let gateway = Arc::new(gateway);
    setup.write(Variant::nth(0));
    let first = gateway.registry.reload().await.unwrap();
    let mut expected: HashMap<String, Expected> = HashMap::new();
    expected.insert(first.snapshot.clone(), setup.expected(Variant::nth(0)));

    // Four clients query without pause while the configuration changes.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (gateway, stop) = (Arc::clone(&gateway), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut answers = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let (status, body) = gateway.post(QUERY, json!({})).await;
                    assert_eq!(status, 200, "{body}");
                    answers.push(read_answer(&body));
                }
                answers
            })
        })
        .collect();
    let (mut added, mut changed, mut removed) = (0, 0, 0);
    for n in 1..=50 {
        let variant = Variant::nth(n);
        setup.write(variant);
        let reloaded = gateway.registry.reload().await.unwrap();
        added += reloaded.added.len();
        changed += reloaded.changed.len();
        removed += reloaded.removed.len();
        let want = setup.expected(variant);
        if let Some(known) = expected.insert(reloaded.snapshot.clone(), want.clone()) {
            assert_eq!(known, want, "one hash, two configurations");
        }
        // The next query follows the new configuration and policies.
        let (hash, seen) = read_answer(&gateway.post(QUERY, json!({})).await.1);
        assert_eq!(hash, reloaded.snapshot);
        assert_eq!(seen, want, "after reload {n} ({variant:?})");
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut answered = 0;
    for client in clients {
        for (hash, seen) in client.await.unwrap() {
            let want = expected
                .get(&hash)
                .unwrap_or_else(|| panic!("an answer from an unknown snapshot {hash}"));
            assert_eq!(&seen, want, "an answer mixing snapshots");
            answered += 1;
        }
    }
    println!(
        "{answered} answers during 50 reloads ({added} partners added, {changed} changed, {removed} removed)"
    );
    assert!(answered >= 100, "too few answers to mean much: {answered}");
    assert!(added > 0 && changed > 0 && removed > 0);
    // (The counters are the process's: other tests' reloads count too.)
    let scraped = gateway.metrics().await;
    let applied = metric(
        &scraped,
        "meshgate_config_reloads_total{result=\"applied\"}",
    );
    assert!(applied >= 51, "{applied}");

    // Every answered request's audit record names its snapshot, and the
    // chain is intact.
    let loaded =
        meshgate_gateway::Config::load(&gateway.config_file, &meshgate_gateway::ProcessEnvironment)
            .unwrap();
    let store = audit::Store::open(&loaded.audit.store).await.unwrap();
    let rows = store
        .select(&audit::Selection::default(), 100_000)
        .await
        .unwrap();
    assert!(rows.len() >= answered);
    for row in &rows {
        let record: Value = serde_json::from_str(&row.record).unwrap();
        let hash = record["snapshot"].as_str().unwrap_or_default();
        assert!(
            expected.contains_key(hash),
            "record {} names {hash:?}",
            row.seq
        );
    }
    let report = audit::verify(&store, &loaded.audit.signing_key.verifying_key(), &[])
        .await
        .unwrap();
    assert!(report.first_bad.is_none(), "{:?}", report.first_bad);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unchanged_partners_keep_their_cache_and_invalid_configurations_are_refused_with_file_and_line()
 {
    let (gateway, setup, _partners) = start().await;
    let all = Variant::nth(0);
    setup.write(all);
    let before = gateway.registry.reload().await.unwrap();
    // Asked twice: the second answer comes from the cache.
    gateway.query(QUERY, json!({})).await;
    gateway.query(QUERY, json!({})).await;
    let scraped = gateway.metrics().await;
    let entries =
        |text: &str, id: &str| metric(text, &format!("meshgate_cache_entries{{partner=\"{id}\"}}"));
    let held: Vec<u64> = ["a", "b", "c"]
        .iter()
        .map(|id| entries(&scraped, id))
        .collect();
    assert!(held.iter().all(|n| *n > 0), "{scraped}");

    // `a`'s policy changes (the partner itself does not), `b`'s connector
    // changes, `c` goes.
    let next = Variant {
        with_c: false,
        b_page_size: 25,
        a_denies: true,
    };
    setup.write(next);
    let reloaded = gateway.registry.reload().await.unwrap();
    assert_eq!(reloaded.kept, ["a"]);
    assert_eq!(reloaded.changed, ["b"]);
    assert_eq!(reloaded.removed, ["c"]);
    let scraped = gateway.metrics().await;
    assert_eq!(entries(&scraped, "a"), held[0], "{scraped}");
    assert_eq!(entries(&scraped, "b"), 0, "{scraped}");
    assert_eq!(entries(&scraped, "c"), 0, "{scraped}");
    let (hash, seen) = read_answer(&gateway.post(QUERY, json!({})).await.1);
    assert_eq!(hash, reloaded.snapshot);
    assert_eq!(seen, setup.expected(next));
    assert_ne!(hash, before.snapshot);

    // Invalid configurations: refused with file and line, and the answers
    // do not change.
    let good = toml::to_string(&setup.table(next)).unwrap();
    let broken_toml = good.replacen("[[partners]]", "[[partners]", 1);
    let line = broken_toml
        .lines()
        .position(|l| l == "[[partners]")
        .unwrap()
        + 1;
    let mut unreadable_secret = setup.table(next);
    unreadable_secret["partners"][0]["connector"]
        .as_table_mut()
        .unwrap()
        .insert(
            "auth".into(),
            toml::Value::Table(
                toml::from_str(
                    "kind = \"basic\"\nusername = \"meshgate\"\npassword = \"${file:/nonexistent/meshgate-secret}\"",
                )
                .unwrap(),
            ),
        );
    let unreadable_secret = toml::to_string(&unreadable_secret).unwrap();
    let secret_line = unreadable_secret
        .lines()
        .position(|l| l.contains("nonexistent"))
        .unwrap()
        + 1;
    let bad_policy = setup.file.with_file_name("bad.cedar");
    std::fs::write(
        &bad_policy,
        "permit (principal, action, resource);\npermit (principal, action resource);\n",
    )
    .unwrap();
    let mut broken_policy = setup.table(next);
    broken_policy["partners"][0].as_table_mut().unwrap().insert(
        "policies".into(),
        vec![toml::Value::from(bad_policy.display().to_string())].into(),
    );
    let broken_policy = toml::to_string(&broken_policy).unwrap();
    let cases = [
        (broken_toml, setup.file.clone(), line),
        (unreadable_secret, setup.file.clone(), secret_line),
        (broken_policy, bad_policy.clone(), 2),
    ];
    for (text, file, line) in cases {
        write_atomically(&setup.file, &text);
        let error = gateway.registry.reload().await.unwrap_err();
        let ReloadError::Invalid(error) = &error else {
            panic!("{error}");
        };
        assert_eq!((&error.file, error.line), (&file, Some(line)), "{error}");
        let (hash, seen) = read_answer(&gateway.post(QUERY, json!({})).await.1);
        assert_eq!(hash, reloaded.snapshot, "{error}");
        assert_eq!(seen, setup.expected(next));
    }
    let scraped = gateway.metrics().await;
    let refused = metric(
        &scraped,
        "meshgate_config_reloads_total{result=\"refused\"}",
    );
    assert!(refused >= 3, "{refused}");

    // The trusted issuers change with a reload: the partner's own issuer
    // is dropped, and its researchers' tokens are refused from then on.
    let partner_token = gateway.partner_issuer.token(
        &json!({
            "sub": "eastbrook-researcher",
            "institution": meshgate_tests::PARTNER_ISSUER_INSTITUTION,
            "roles": ["researcher"],
            "projects": ["ground-truth"],
        }),
        Duration::from_secs(600),
    );
    let me = "{ me { subject snapshot } }";
    setup.write(all);
    gateway.registry.reload().await.unwrap();
    assert_eq!(
        gateway.post_as(Some(&partner_token), me, json!({})).await.0,
        200
    );
    let mut one_issuer = setup.table(all);
    one_issuer["auth"]["issuers"]
        .as_array_mut()
        .unwrap()
        .truncate(1);
    write_atomically(&setup.file, &toml::to_string(&one_issuer).unwrap());
    let reloaded = gateway.registry.reload().await.unwrap();
    assert!(reloaded.issuers_changed);
    assert_eq!(reloaded.kept, ["a", "b", "c"], "issuers change no partner");
    assert_eq!(
        gateway.post_as(Some(&partner_token), me, json!({})).await.0,
        401
    );
    let (status, body) = gateway.post(me, json!({})).await;
    assert_eq!(
        (status, &body["data"]["me"]["snapshot"]),
        (200, &json!(reloaded.snapshot))
    );
    setup.write(next);
    gateway.registry.reload().await.unwrap();

    // A part read only at start-up is not changed by a reload.
    let mut restart = setup.table(next);
    restart.insert(
        "cache".into(),
        toml::Value::Table(toml::from_str("ttl_seconds = 5").unwrap()),
    );
    write_atomically(&setup.file, &toml::to_string(&restart).unwrap());
    let error = gateway.registry.reload().await.unwrap_err();
    assert!(
        matches!(&error, ReloadError::NeedsRestart(parts) if parts == &["[cache]"]),
        "{error}"
    );

    // The watcher reloads when the files change on disk; the control
    // socket reloads when asked and tells what happened.
    registry::watch(&gateway.registry);
    setup.write(all);
    let mut waited = Duration::ZERO;
    loop {
        let (hash, seen) = read_answer(&gateway.post(QUERY, json!({})).await.1);
        if hash == before.snapshot {
            assert_eq!(seen, setup.expected(all));
            break;
        }
        assert!(
            waited < Duration::from_secs(10),
            "the change on disk was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += Duration::from_millis(100);
    }
    let socket = setup.file.with_file_name("control.sock");
    registry::serve_control_socket(Arc::clone(&gateway.registry), &socket)
        .await
        .unwrap();
    assert_eq!(
        std::fs::metadata(&socket)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .unwrap(),
        0o600
    );
    let (status, answer) = registry::request_reload(&socket).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["reloaded"]["snapshot"], before.snapshot);
    assert_eq!(answer["reloaded"]["kept"], json!(["a", "b", "c"]));
    std::fs::write(&bad_policy, "not cedar").unwrap();
    let mut broken = setup.table(all);
    broken["partners"][1].as_table_mut().unwrap().insert(
        "policies".into(),
        vec![toml::Value::from(bad_policy.display().to_string())].into(),
    );
    // Written elsewhere and renamed, so the watcher and the socket race
    // for one change: both refuse it.
    write_atomically(&setup.file, &toml::to_string(&broken).unwrap());
    let (status, answer) = registry::request_reload(&socket).await.unwrap();
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["code"], "CONFIG_INVALID");
    assert!(
        answer["message"].as_str().unwrap().contains("bad.cedar:1"),
        "{answer}"
    );
}
