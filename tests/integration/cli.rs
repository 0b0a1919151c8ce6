//! The CLI against a running server: kv, catalog, operator raft, snapshot, tls and version.

use std::process::Command;

use crate::harness::{BIN, Cluster};

fn run(addr: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).env("TRELLIS_HTTP_ADDR", addr).output().expect("run trellis");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// What this test does: drives each CLI command against one server and checks its output and
/// exit status, including the error paths a user meets first.
#[tokio::test(flavor = "multi_thread")]
async fn cli_commands_talk_to_the_http_api() {
    let c = Cluster::start(1).await;
    let addr = c.servers[0].http();
    let ok = |args: &[&str]| {
        let (ok, out, err) = run(&addr, args);
        assert!(ok, "trellis {args:?} failed: {err}");
        out
    };
    assert!(ok(&["kv", "put", "app/config", "hello"]).contains("Success! Data written to: app/config"));
    assert_eq!(ok(&["kv", "get", "app/config"]).trim(), "hello");
    ok(&["kv", "put", "app/other", "x"]);
    assert_eq!(ok(&["kv", "get", "--keys", "app/"]).lines().collect::<Vec<_>>(), vec!["app/config", "app/other"]);
    assert!(ok(&["kv", "get", "--recurse", "app/"]).contains("app/config:hello"));
    ok(&["kv", "delete", "app/config"]);
    let (success, _, err) = run(&addr, &["kv", "get", "app/config"]);
    assert!(!success && err.contains("No key exists"), "{err}");

    assert!(ok(&["catalog", "nodes"]).contains("s1"));
    assert!(ok(&["catalog", "services"]).contains("consul"));
    let peers = ok(&["operator", "raft", "list-peers"]);
    assert!(peers.contains("s1") && peers.contains("leader"), "{peers}");

    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("backup.snap");
    assert!(ok(&["snapshot", "save", snap.to_str().unwrap()]).contains("Saved"));
    ok(&["kv", "delete", "app/other"]);
    assert!(ok(&["snapshot", "restore", snap.to_str().unwrap()]).contains("Restored"));
    assert_eq!(ok(&["kv", "get", "app/other"]).trim(), "x");

    assert!(ok(&["version"]).contains("Trellis v"));
    let (success, _, err) = run("http://127.0.0.1:1", &["kv", "get", "a"]);
    assert!(!success && err.contains("TRELLIS_HTTP_ADDR"), "{err}");

    // `tls` writes Consul-style file names into the current directory, a new number each call.
    let tls_dir = tempfile::tempdir().unwrap();
    let tls = |args: &[&str]| Command::new(BIN).args(args).current_dir(tls_dir.path()).output().unwrap();
    assert!(tls(&["tls", "ca", "create"]).status.success());
    assert!(tls(&["tls", "cert", "create", "--server", "--dc", "dc1"]).status.success());
    assert!(tls(&["tls", "cert", "create", "--server", "--dc", "dc1"]).status.success());
    for f in ["trellis-agent-ca.pem", "trellis-agent-ca-key.pem", "dc1-server-trellis-0.pem", "dc1-server-trellis-1-key.pem"] {
        assert!(tls_dir.path().join(f).exists(), "{f} missing");
    }
    assert!(!tls(&["tls", "ca", "create"]).status.success(), "must not overwrite an existing CA");
}
