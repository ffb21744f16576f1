//! One failing partner never fails the query: a stopped Orthanc is reported
//! UNAVAILABLE and a partner slower than its deadline TIMEOUT, while the
//! other partners' answers stay complete; partners that answer 500s,
//! malformed or endless bodies, never, or with a reset get their codes,
//! trip their circuit breakers and are called again once they recover.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use meshgate_tests::{
    Cohort, Gateway, GroundTruth, Orthanc, SyntheticPartner, TcpProxy, dicomweb_partner,
    files_partner,
};
use serde_json::{Value, json};

const QUERY: &str = r#"
query Page($first: Int!) {
  imagingStudies(project: "ground-truth", first: $first) {
    nodes { partner studyInstanceUid }
    totalCount
    partners { partner status count code message latencyMs }
  }
  cohortCount(project: "ground-truth") { total complete partners { partner status count } }
}"#;

fn status<'a>(data: &'a Value, field: &str, partner: &str) -> &'a Value {
    data[field]["partners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["partner"] == partner)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_orthanc_is_unavailable_and_the_other_partners_answer_completely() {
    let (up, down, archive) = (
        SyntheticPartner::new("up", 20, 5),
        SyntheticPartner::new("down", 20, 6),
        SyntheticPartner::new("files", 15, 7),
    );
    let up_server = Orthanc::start("up").await;
    up_server.load(&up).await;
    let mut down_server = Orthanc::start("down").await;
    down_server.load(&down).await;
    let gateway = Gateway::start(&format!(
        "{}{}{}",
        dicomweb_partner("up", &up_server.dicomweb_url(), 5_000, None),
        dicomweb_partner("down", &down_server.dicomweb_url(), 5_000, None),
        files_partner("files", &archive.dicom_dir()),
    ))
    .await;
    down_server.stop();

    let data = gateway.query(QUERY, json!({"first": 100})).await;
    let down_status = status(&data, "imagingStudies", "down");
    assert_eq!(down_status["status"], "UNAVAILABLE", "{down_status}");
    assert_eq!(down_status["code"], "PARTNER_UNREACHABLE");
    assert!(down_status["count"].is_null());
    assert_eq!(
        status(&data, "cohortCount", "down")["status"],
        "UNAVAILABLE"
    );
    assert_eq!(data["cohortCount"]["complete"], false);

    let mut truth = GroundTruth::default();
    truth.add(&up);
    truth.add(&archive);
    let expected = truth.answer(&Cohort::default());
    let returned: Vec<(String, String)> = data["imagingStudies"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["partner"].as_str().unwrap().to_owned(),
                n["studyInstanceUid"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(returned, expected);
    assert_eq!(data["cohortCount"]["total"], expected.len());
    for partner in ["up", "files"] {
        assert_eq!(status(&data, "imagingStudies", partner)["status"], "OK");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_slower_than_its_deadline_times_out_and_the_answer_still_arrives_in_time() {
    let (slow, archive) = (
        SyntheticPartner::new("slow", 15, 8),
        SyntheticPartner::new("files", 15, 9),
    );
    let server = Orthanc::start("slow").await;
    server.load(&slow).await;
    // Every request to the slow partner is held back for three seconds.
    let proxy = TcpProxy::start(
        format!("127.0.0.1:{}", server.port).parse().unwrap(),
        Duration::from_secs(3),
    )
    .await;
    let deadline = Duration::from_millis(800);
    let gateway = Gateway::start(&format!(
        "{}{}",
        dicomweb_partner("slow", &proxy.url(), deadline.as_millis() as u64, None),
        files_partner("files", &archive.dicom_dir()),
    ))
    .await;

    let started = Instant::now();
    let data = gateway.query(QUERY, json!({"first": 50})).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < deadline + Duration::from_millis(500),
        "the answer took {elapsed:?}"
    );

    let slow_status = status(&data, "imagingStudies", "slow");
    assert_eq!(slow_status["status"], "TIMEOUT", "{slow_status}");
    assert_eq!(slow_status["code"], "PARTNER_TIMEOUT");
    assert!(slow_status["latencyMs"].as_u64().unwrap() >= deadline.as_millis() as u64 - 5);
    let files_status = status(&data, "imagingStudies", "files");
    assert_eq!(files_status["status"], "OK");
    assert_eq!(files_status["count"], 15);
    assert_eq!(
        data["imagingStudies"]["nodes"].as_array().unwrap().len(),
        15
    );
    assert!(proxy.bytes_sent() > 0, "the slow partner was asked");
}

/// How a [`HostilePartner`] treats each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Behaviour {
    /// `200 []`.
    Healthy,
    /// `500`.
    ServerError,
    /// `200` with DICOM JSON cut off half-way.
    Malformed,
    /// `200` with a body that goes on past 32 MiB, without a length.
    Endless,
    /// Reads the request and never answers.
    Silent,
    /// Reads the request and resets the connection.
    Reset,
}

/// A DICOMweb partner at the TCP level, misbehaving as told, counting the
/// connections it accepts.
struct HostilePartner {
    url: String,
    behaviour: Arc<AtomicU8>,
    connections: Arc<AtomicU32>,
}

impl HostilePartner {
    async fn start() -> HostilePartner {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/dicom-web/", listener.local_addr().unwrap());
        let behaviour = Arc::new(AtomicU8::new(Behaviour::Healthy as u8));
        let connections = Arc::new(AtomicU32::new(0));
        let (mode, count) = (Arc::clone(&behaviour), Arc::clone(&connections));
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let mode = mode.load(Ordering::SeqCst);
                tokio::spawn(serve(stream, mode));
            }
        });
        HostilePartner {
            url,
            behaviour,
            connections,
        }
    }

    fn behave(&self, behaviour: Behaviour) {
        self.behaviour.store(behaviour as u8, Ordering::SeqCst);
    }

    fn connections(&self) -> u32 {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn serve(mut stream: tokio::net::TcpStream, mode: u8) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = Vec::new();
    let mut buffer = [0_u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buffer[..n]),
        }
    }
    let answer = |status: &str, body: &str| {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/dicom+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let reply = match mode {
        m if m == Behaviour::Healthy as u8 => answer("200 OK", "[]"),
        m if m == Behaviour::ServerError as u8 => answer("500 Internal Server Error", "down"),
        m if m == Behaviour::Malformed as u8 => {
            answer("200 OK", r#"[{"0020000D": {"vr": "UI", "Value": ["1.2."#)
        }
        m if m == Behaviour::Endless as u8 => {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/dicom+json\r\nconnection: close\r\n\r\n[";
            if stream.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b' '; 1 << 20];
            for _ in 0..40 {
                if stream.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            return;
        }
        m if m == Behaviour::Silent as u8 => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return;
        }
        _ => {
            // A reset, not an orderly close.
            stream.set_zero_linger().unwrap();
            drop(stream);
            return;
        }
    };
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_partners_get_their_codes_trip_their_breakers_and_are_called_again_after_recovery()
 {
    let expected = [
        (Behaviour::ServerError, "ERROR", "PARTNER_HTTP_ERROR"),
        (Behaviour::Malformed, "ERROR", "PARTNER_BAD_RESPONSE"),
        (Behaviour::Endless, "ERROR", "PARTNER_RESPONSE_TOO_LARGE"),
        (Behaviour::Silent, "TIMEOUT", "PARTNER_TIMEOUT"),
        (Behaviour::Reset, "UNAVAILABLE", "PARTNER_UNREACHABLE"),
    ];
    let mut hostile = Vec::new();
    let mut config = String::new();
    for (index, _) in expected.iter().enumerate() {
        let partner = HostilePartner::start().await;
        config.push_str(&format!(
            "[[partners]]\nid = \"p{index}\"\nname = \"partner {index}\"\ndeadline_ms = 1000\n\
             protection = {{ breaker_failures = 2, breaker_cool_down_ms = 1500 }}\n\
             [partners.connector]\nkind = \"dicomweb\"\nurl = \"{}\"\n\n",
            partner.url
        ));
        hostile.push(partner);
    }
    let fine = HostilePartner::start().await;
    config.push_str(&dicomweb_partner("fine", &fine.url, 1000, None));
    // Healthy while the gateway starts and probes them; hostile from now on.
    let gateway = Gateway::start(&config).await;
    for (partner, (behaviour, _, _)) in hostile.iter().zip(&expected) {
        partner.behave(*behaviour);
    }
    let count = |data: &Value| -> Vec<(String, String)> {
        (0..expected.len())
            .map(|i| {
                let s = status(data, "cohortCount", &format!("p{i}"));
                (
                    s["status"].as_str().unwrap().to_owned(),
                    s["code"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    };
    const COUNT: &str = r#"query { cohortCount(project: "ground-truth") { total complete partners { partner status code } } }"#;

    // Each failure is told apart, the healthy partner answers, and the
    // partner that never answers costs no more than its deadline.
    for _ in 0..2 {
        let started = Instant::now();
        let data = gateway.query(COUNT, json!({})).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        let want: Vec<(String, String)> = expected
            .iter()
            .map(|(_, status, code)| ((*status).to_owned(), (*code).to_owned()))
            .collect();
        assert_eq!(count(&data), want);
        assert_eq!(status(&data, "cohortCount", "fine")["status"], "OK");
        assert_eq!(data["cohortCount"]["complete"], false);
    }

    // Two failures in a row opened every breaker: no partner is called.
    let before: Vec<u32> = hostile.iter().map(HostilePartner::connections).collect();
    let data = gateway.query(COUNT, json!({})).await;
    assert!(
        count(&data)
            .iter()
            .all(|(status, code)| status == "CIRCUIT_OPEN" && code == "PARTNER_CIRCUIT_OPEN"),
        "{data}"
    );
    let after: Vec<u32> = hostile.iter().map(HostilePartner::connections).collect();
    assert_eq!(
        before, after,
        "a partner was called while its circuit was open"
    );

    // Recovered, and past the cool-down: the probe succeeds and closes them.
    for partner in &hostile {
        partner.behave(Behaviour::Healthy);
    }
    tokio::time::sleep(Duration::from_millis(1600)).await;
    for _ in 0..2 {
        let data = gateway.query(COUNT, json!({})).await;
        assert!(
            count(&data).iter().all(|(status, _)| status == "OK"),
            "{data}"
        );
        assert_eq!(data["cohortCount"]["complete"], true);
    }
    let recovered: Vec<u32> = hostile.iter().map(HostilePartner::connections).collect();
    assert!(recovered.iter().zip(&after).all(|(now, then)| now > then));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_unreachable_at_start_up_is_probed_again_when_it_comes_back() {
    // The partner's address answers nothing while the gateway starts.
    let nowhere: std::net::SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = TcpProxy::start(nowhere, Duration::ZERO).await;
    let gateway = Gateway::start(&dicomweb_partner("late", &proxy.url(), 5_000, None)).await;
    let measured = async || {
        let data = gateway
            .query("{ partners { id capabilities { measured } } }", json!({}))
            .await;
        data["partners"][0]["capabilities"]["measured"].as_bool()
    };
    assert_eq!(
        measured().await,
        Some(false),
        "declared until it can be probed"
    );

    let mut orthanc = Orthanc::start("late").await;
    orthanc.load(&SyntheticPartner::new("late", 5, 9)).await;
    proxy.set_upstream(format!("127.0.0.1:{}", orthanc.port).parse().unwrap());
    let started = Instant::now();
    while measured().await != Some(true) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the partner was not probed again after it came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    orthanc.stop();
}
