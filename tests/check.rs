//! `tether check`: every shipped config passes; broken ones print FILE:LINE:COL for each problem.

use std::path::{Path, PathBuf};
use std::process::Command;

fn tether() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tether"))
}

fn shipped_configs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["conf", "conf/examples"] {
        for entry in std::fs::read_dir(root.join(dir)).expect("conf/ exists") {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_shipped_config_passes() {
    let files = shipped_configs();
    assert!(
        files.len() >= 3,
        "expected conf/tether.toml and examples: {files:?}"
    );
    let out = tether()
        .arg("check")
        .args(&files)
        // The environment overrides the file; keep the check about the files.
        .env_remove("TETHER_HASH_KEY")
        .env_remove("TETHER_INSERT_SECRETS")
        .env_remove("TETHER_REDIS_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for f in &files {
        assert!(stdout.contains(&format!("{}: ok", f.display())), "{stdout}");
    }
}

#[test]
fn a_broken_file_gets_every_problem_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(
        &path,
        r#"[server]
listen = ["127.0.0.1:8080", "nope"]

[upstream]
connect_timeout_ms = 0

[affinity]
sources = ["cookie:sid", "magic"]
policy = "fastest"

[redis]
url = "redis://127.0.0.1:6379/"

[[backend]]
id = "a"
address = "127.0.0.1:3001"

[[backend]]
id = "a"
address = "127.0.0.1:3002"
"#,
    )
    .unwrap();
    let out = tether()
        .arg("check")
        .arg(&path)
        .env_remove("TETHER_HASH_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let p = path.display();
    for expected in [
        format!("{p}:2:29: `nope` is not an IP:port address"),
        format!("{p}:5:22: `connect_timeout_ms` is 0"),
        format!("{p}:8:26: unknown key source `magic`"),
        format!("{p}:9:10: unknown policy `fastest`"),
        format!("{p}:7:1: [affinity] needs `hash_key`"),
        format!("{p}:19:6: duplicate backend id `a`"),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn syntax_errors_and_unknown_keys_point_at_the_spot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = [\"127.0.0.1:8080\"]\nthread = 2\n",
    )
    .unwrap();
    let out = tether().arg("check").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:3:1: unknown field `thread`", path.display())),
        "{stderr}"
    );

    std::fs::write(&path, "[server\nlisten = 1\n").unwrap();
    let out = tether().arg("check").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!("{}:1:", path.display())),
        "{stderr}"
    );
}

#[test]
fn run_refuses_a_broken_file_before_binding_anything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[server]\nlisten = [\"127.0.0.1:1\"]\n").unwrap();
    let out = tether().args(["run", "-c"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("missing [affinity] section"), "{stderr}");
    assert!(stderr.contains("no backends"), "{stderr}");
}
