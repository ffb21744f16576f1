//! The `meshgate` command as an operator uses it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

use std::process::Command;

fn meshgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshgate"))
}

#[test]
fn config_check_names_file_line_and_field_and_exits_with_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("meshgate.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:0\"\n\n[[partners]]\nid = \"north\"\nname = \"North\"\ndeadlin_ms = 5\nconnector = { kind = \"files\", path = \"/data\" }\n",
    )
    .unwrap();
    let output = meshgate()
        .args(["config", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{}:6:1", file.display())),
        "{stderr}"
    );
    assert!(stderr.contains("deadlin_ms"), "{stderr}");
}

#[test]
fn config_check_accepts_a_valid_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("meshgate.toml");
    std::fs::write(&file, "[[partners]]\nid = \"north\"\nname = \"North\"\nconnector = { kind = \"files\", path = \"/data\" }\n").unwrap();
    let output = meshgate()
        .args(["config", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("ok (1 partners)"));
}

#[test]
fn serve_refuses_a_bad_config_with_code_2_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("meshgate.toml");
    std::fs::write(&file, "listen = \"nowhere\"\n").unwrap();
    let output = meshgate()
        .args(["serve", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(":1:"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn synth_writes_dicom_files_and_a_manifest_row_per_study() {
    let dir = tempfile::tempdir().unwrap();
    let output = meshgate()
        .args([
            "synth",
            "--partner",
            "north",
            "--studies",
            "4",
            "--seed",
            "3",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success());
    let manifest = std::fs::read_to_string(dir.path().join("manifest.jsonl")).unwrap();
    assert_eq!(manifest.lines().count(), 4);
    assert!(dir.path().join("dicom").is_dir());
}

#[test]
fn demo_synthesises_three_partners_answers_the_sample_query_and_stops_cleanly_on_sigterm() {
    use std::io::{BufRead, BufReader, Read, Write};

    let dir = tempfile::tempdir().unwrap();
    let mut demo = KillOnDrop(
        meshgate()
            .args([
                "demo",
                "--listen",
                "127.0.0.1:0",
                "--studies",
                "40",
                "--data",
            ])
            .arg(dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdout = BufReader::new(demo.0.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.contains("listening on http://127.0.0.1:"), "{line}");
    let address = line
        .split("http://")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    for partner in ["north", "south", "east"] {
        assert!(dir.path().join(partner).join("manifest.jsonl").exists());
    }

    // The sample query the demo prints, over plain HTTP/1.1.
    let body = serde_json::json!({"query": meshgate_gateway::demo::SAMPLE_QUERY}).to_string();
    let mut stream = std::net::TcpStream::connect(&address).unwrap();
    write!(
        stream,
        "POST /graphql HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let statuses = json["data"]["imagingStudies"]["partners"]
        .as_array()
        .unwrap();
    assert_eq!(statuses.len(), 3, "{json}");
    assert!(statuses.iter().all(|s| s["status"] == "OK"), "{json}");
    assert!(
        json["data"]["cohortCount"]["total"].as_u64().is_some(),
        "{json}"
    );

    rustix::process::kill_process(
        rustix::process::Pid::from_child(&demo.0),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    assert!(
        demo.0.wait().unwrap().success(),
        "SIGTERM drains and exits 0"
    );
}

/// A child process that cannot outlive a failed test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
