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

/// Processes whose command line mentions `needle` (our dev cluster's data directory).
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).replace('\0', " ").contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// What this test does: runs `trellis dev --datacenters 2 --clients 1` from the command line,
/// waits for its ready banner, reads each datacenter's catalog through the other (`?dc=`),
/// then sends Ctrl-C (SIGINT) and checks the command exits cleanly, leaving no agent process
/// and no data directory behind.
#[tokio::test(flavor = "multi_thread")]
async fn dev_with_two_datacenters_comes_up_serves_both_ways_and_stops_on_ctrl_c() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let prefix = format!("127.0.{}", crate::harness::subnet());
    let mut child = std::process::Command::new(BIN)
        .args(["dev", "--datacenters", "2", "--servers", "1", "--clients", "1", "--address-prefix", &prefix])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut banner = Vec::new();
    let deadline = std::time::Instant::now() + crate::harness::SOON * 2;
    while !banner.iter().any(|l: &String| l.contains("Press Ctrl-C")) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => banner.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("no ready banner; got: {banner:?}");
            }
        }
    }
    let text = banner.join("\n");
    assert!(text.contains("ready in"), "{text}");
    let data_root = text.lines().find_map(|l| l.trim().strip_prefix("data and logs: ")).expect("data directory printed").to_string();
    let (dc1, dc2) = (format!("http://{prefix}.21:8500"), format!("http://{prefix}.41:8500"));
    assert!(text.contains(&format!("UI {dc1}/ui/")), "{text}");
    let http = reqwest::Client::new();
    for (base, other, node) in [(&dc1, "dc2", "dc2-server-1"), (&dc2, "dc1", "dc1-server-1")] {
        let nodes: serde_json::Value = http.get(format!("{base}/v1/catalog/nodes?dc={other}")).send().await.unwrap().json().await.unwrap();
        assert!(nodes.as_array().unwrap().iter().any(|n| n["Node"] == node), "{nodes}");
    }
    assert!(processes_mentioning(&data_root).len() >= 4, "four agents run");

    let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    let stopped = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(stopped.elapsed() < crate::harness::SOON, "dev did not stop after Ctrl-C");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(processes_mentioning(&data_root).is_empty(), "agent processes left behind");
    assert!(!std::path::Path::new(&data_root).exists(), "temporary data left behind");
}
