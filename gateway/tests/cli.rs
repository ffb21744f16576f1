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
