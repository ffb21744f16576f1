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

/// `meshgate config check FILE`: exit code and stderr.
fn config_check(file: &std::path::Path) -> (Option<i32>, String) {
    let output = meshgate()
        .args(["config", "check"])
        .arg(file)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
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
    let (code, stderr) = config_check(&file);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains(&format!("{}:6:1", file.display())),
        "{stderr}"
    );
    assert!(stderr.contains("deadlin_ms"), "{stderr}");
}

/// A complete configuration: one files partner, no policies (deny all).
fn valid_config(dir: &std::path::Path) -> std::path::PathBuf {
    let key = dir.join("pseudonym.key");
    std::fs::write(&key, "x".repeat(32)).unwrap();
    let checkpoint_key = dir.join("checkpoint.pem");
    let made = meshgate()
        .args(["audit", "keygen", "--out"])
        .arg(&checkpoint_key)
        .output()
        .unwrap();
    assert!(made.status.success());
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&checkpoint_key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the key is readable by its owner only");
    }
    // Never over an existing key.
    let again = meshgate()
        .args(["audit", "keygen", "--out"])
        .arg(&checkpoint_key)
        .output()
        .unwrap();
    assert!(!again.status.success());
    let file = dir.join("meshgate.toml");
    std::fs::write(
        &file,
        format!(
            "[auth]\n[[auth.issuers]]\nissuer = \"https://login.example.org\"\naudiences = [\"meshgate\"]\njwks_url = \"https://login.example.org/jwks\"\ntrusted_for = {{ institutions = [\"*\"], roles = [\"*\"], projects = [\"*\"], permissions = [\"*\"] }}\n\n[policies]\nconsortium = []\n\n[deidentification]\nkey = \"${{file:{}}}\"\n\n[audit]\nstore = \"sqlite:audit.db\"\ncheckpoint_key = \"${{file:{}}}\"\n\n[[partners]]\nid = \"north\"\nname = \"North\"\ninstitution = \"north\"\ndata_use = {{ permission = \"DUO:0000042\" }}\nconnector = {{ kind = \"files\", path = \"/data\" }}\n",
            key.display(),
            checkpoint_key.display()
        ),
    )
    .unwrap();
    file
}

#[test]
fn config_check_accepts_a_valid_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = valid_config(dir.path());
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
fn config_check_reports_a_policy_that_does_not_validate_with_its_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = valid_config(dir.path());
    let policy = dir.path().join("consortium.cedar");
    std::fs::write(
        &policy,
        "// researchers\npermit (principal, action, resource)\nwhen { principal.clearence == \"high\" };\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("consortium = []", "consortium = [\"consortium.cedar\"]");
    std::fs::write(&file, text).unwrap();
    let (code, stderr) = config_check(&file);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains(&format!("{}:3:", policy.display())),
        "{stderr}"
    );
    assert!(stderr.contains("clearence"), "{stderr}");
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
                "demo-data",
            ])
            // As a new user runs it: a data folder relative to where they are.
            .current_dir(dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdout = BufReader::new(demo.0.stdout.take().unwrap());
    let mut line = String::new();
    let mut token = None;
    while !line.contains("listening on") {
        let previous = std::mem::take(&mut line);
        assert!(stdout.read_line(&mut line).unwrap() > 0, "demo ended early");
        if previous.contains("researcher (") {
            token = Some(line.trim().to_owned());
        }
    }
    let token = token.expect("the demo prints a researcher token");
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
        assert!(
            dir.path()
                .join("demo-data")
                .join(partner)
                .join("manifest.jsonl")
                .exists()
        );
    }

    // The sample query the demo prints, over plain HTTP/1.1.
    let body = serde_json::json!({"query": meshgate_gateway::demo::SAMPLE_QUERY}).to_string();
    let mut stream = std::net::TcpStream::connect(&address).unwrap();
    write!(
        stream,
        "POST /graphql HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
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
    let outcome = |i: usize| {
        (
            statuses[i]["partner"].as_str(),
            statuses[i]["disclosure"].as_str(),
        )
    };
    assert_eq!(
        [outcome(0), outcome(1), outcome(2)],
        [
            (Some("north"), Some("DEIDENTIFIED")),
            (Some("south"), Some("COUNTS_ONLY")),
            (Some("east"), Some("DENIED")),
        ],
        "{json}"
    );
    assert!(
        statuses[2]["reasons"][0]
            .as_str()
            .unwrap()
            .contains("project demo is not approved for east's dataset"),
        "{json}"
    );
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

    // Its configuration means the same from any working directory.
    let data = dir.path().join("demo-data");
    let output = meshgate()
        .args(["audit", "verify", "--config"])
        .arg(data.join("meshgate.toml"))
        .current_dir("/")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // Its keys are its owner's alone.
    use std::os::unix::fs::PermissionsExt as _;
    for key in ["pseudonym.key", "audit-checkpoint-key.pem"] {
        let mode = std::fs::metadata(data.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }

    // The example policy cases pass against the demo's configuration.
    let cases = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/examples/cases");
    let output = meshgate()
        .args(["policy", "test", "--config"])
        .arg(data.join("meshgate.toml"))
        .arg(&cases)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains(" 0 failed"), "{stdout}");

    // A case that expects the wrong decision fails the run with code 1.
    let wrong = dir.path().join("wrong.toml");
    std::fs::write(
        &wrong,
        "[[case]]\nname = \"south releases records\"\nroles = [\"researcher\"]\nprojects = [\"demo\"]\npartner = \"south\"\nproject = \"demo\"\nexpect = \"DEIDENTIFIED\"\n",
    )
    .unwrap();
    let output = meshgate()
        .args(["policy", "test", "--config"])
        .arg(data.join("meshgate.toml"))
        .arg(&wrong)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("FAILED  south releases records"),
        "{}",
        String::from_utf8_lossy(&output.stdout)
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

#[test]
fn partners_check_prints_a_row_per_partner_and_exits_1_when_one_fails() {
    let dir = tempfile::tempdir().unwrap();
    let file = valid_config(dir.path());
    let folder = dir.path().join("archive");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("README"), "not DICOM").unwrap();
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = std::fs::read_to_string(&file).unwrap().replace(
        "path = \"/data\"",
        &format!("path = {:?}", folder.display().to_string()),
    );
    std::fs::write(&file, &text).unwrap();
    let check = |file: &std::path::Path| {
        let output = meshgate()
            .args(["partners", "check", "--timeout-seconds", "5", "--config"])
            .arg(file)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    let (code, table) = check(&file);
    assert_eq!(code, Some(0), "{table}");
    let north = table.lines().find(|l| l.starts_with("north")).unwrap();
    assert!(
        north.contains("files") && north.contains("yes") && north.contains("OK"),
        "{table}"
    );
    assert!(north.contains("declared"), "{table}");

    std::fs::write(
        &file,
        format!(
            "{text}\n[[partners]]\nid = \"gone\"\nname = \"Gone\"\ninstitution = \"gone\"\ndata_use = {{ permission = \"DUO:0000042\" }}\nconnector = {{ kind = \"dicomweb\", url = \"http://127.0.0.1:{dead_port}/dicom-web/\" }}\n"
        ),
    )
    .unwrap();
    let (code, table) = check(&file);
    assert_eq!(code, Some(1), "{table}");
    assert!(table.starts_with("PARTNER"), "{table}");
    let gone = table.lines().find(|l| l.starts_with("gone")).unwrap();
    let cells: Vec<&str> = gone.split_whitespace().collect();
    assert_eq!(
        &cells[..6],
        ["gone", "dicomweb", "no", "?", "-", "PARTNER_UNREACHABLE"],
        "{table}"
    );
}

/// Waits (at most 20 s) for a line of `lines` containing `text`.
fn wait_for(lines: &std::sync::mpsc::Receiver<String>, text: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(text) => return line,
            Ok(_) => {}
            Err(_) => panic!("no line containing {text:?}"),
        }
    }
}

#[test]
fn serve_reloads_on_sighup_and_when_meshgate_reload_asks_and_keeps_serving_a_refused_change() {
    use std::io::BufRead as _;

    let dir = tempfile::tempdir().unwrap();
    let file = valid_config(dir.path());
    let archive = dir.path().join("archive");
    std::fs::create_dir(&archive).unwrap();
    let text = format!(
        "listen = \"127.0.0.1:0\"\n{}\n[reload]\nwatch = false\ncontrol_socket = \"meshgate.sock\"\n",
        std::fs::read_to_string(&file)
            .unwrap()
            .replace("\"/data\"", &format!("{:?}", archive.display().to_string()))
    );
    std::fs::write(&file, &text).unwrap();
    let mut serve = KillOnDrop(
        meshgate()
            .args(["serve", "--config"])
            .arg(&file)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (send, lines) = std::sync::mpsc::channel();
    let stderr = std::io::BufReader::new(serve.0.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                break;
            }
        }
    });
    wait_for(&lines, "policies loaded");
    let reload = || {
        let output = meshgate()
            .args(["reload", "--config"])
            .arg(&file)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };

    // A second partner joins; SIGHUP puts it in force.
    let south = format!(
        "\n[[partners]]\nid = \"south\"\nname = \"South\"\ninstitution = \"south\"\ndata_use = {{ permission = \"DUO:0000042\" }}\nconnector = {{ kind = \"files\", path = {:?} }}\n",
        archive.display().to_string()
    );
    std::fs::write(&file, format!("{text}{south}")).unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&serve.0),
        rustix::process::Signal::HUP,
    )
    .unwrap();
    let line = wait_for(&lines, "configuration reloaded");
    assert!(line.contains("added=1"), "{line}");

    // `meshgate reload`: nothing changed since, so both partners are kept.
    let (code, stdout, stderr) = reload();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("kept: north, south"), "{stdout}");

    // A change the gateway refuses: exit 1, and the running one stays.
    std::fs::write(
        &file,
        format!("{text}{south}").replace("[reload]", "[cache]\nttl_seconds = 5\n\n[reload]"),
    )
    .unwrap();
    let (code, _, stderr) = reload();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("RESTART_REQUIRED"), "{stderr}");
    assert!(stderr.contains("[cache]"), "{stderr}");

    // An invalid file is refused before the gateway is asked: exit 2.
    std::fs::write(
        &file,
        format!("{text}{south}").replace("[[partners]]", "[[partners]"),
    )
    .unwrap();
    let (code, _, stderr) = reload();
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(&format!("{}:", file.display())), "{stderr}");

    // And the gateway still serves.
    std::fs::write(&file, format!("{text}{south}")).unwrap();
    let (code, stdout, stderr) = reload();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("kept: north, south"), "{stdout}");
}
