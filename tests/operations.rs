//! Operating the daemon: socket edge cases, the audit trail and its verifier, the admin
//! endpoints, and the client commands, all against the real binary.

mod common;
mod lifecycle_support;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::Command;

use common::{Daemon, bin, cli};
use lifecycle_support::*;

const ROOT_ID: &str = "spiffe://agentid.local/user/root";

fn harness_args(dir: &std::path::Path, socket: &std::path::Path) -> Vec<String> {
    vec![
        "--state-dir".into(),
        dir.join("state").display().to_string(),
        "--socket".into(),
        socket.display().to_string(),
        "--admin-addr".into(),
        "127.0.0.1:0".into(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_served_by_a_running_daemon_is_not_taken_over() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(&subdir(tmp.path(), "first"), &[]);
    let second = subdir(tmp.path(), "second");
    let args = harness_args(&second, &d.socket);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stderr) = up_expecting_exit(&args);
    assert_ne!(
        code, 0,
        "second daemon on a live socket must fail: {stderr}"
    );
    assert!(
        stderr.contains("is in use"),
        "message must say the socket is in use: {stderr}"
    );
    assert!(
        stderr.contains(&d.socket.display().to_string()),
        "and name it: {stderr}"
    );
    // The first daemon is undisturbed.
    assert!(
        std::fs::symlink_metadata(&d.socket)
            .unwrap()
            .file_type()
            .is_socket()
    );
    let svid = fetch_x509(&d.socket)
        .await
        .expect("first daemon still serves");
    assert_eq!(ids(&svid), [ROOT_ID]);
}

#[test]
fn a_regular_file_at_the_socket_path_is_refused_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("workload.sock");
    std::fs::write(&path, "precious data\n").unwrap();
    let err = match Daemon::try_start_in(tmp.path(), &[]) {
        Ok(d) => panic!("started over a regular file; banner:\n{}", d.banner),
        Err(e) => e,
    };
    assert!(!err.contains("exit status: 0"), "{err}");
    assert!(err.contains("exists and is not a socket"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "precious data\n",
        "file must be untouched"
    );
}

#[test]
fn an_uncreatable_socket_directory_fails_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    // /proc refuses mkdir even for root.
    let socket = std::path::Path::new("/proc/agentid-test-no-such-dir/sub/workload.sock");
    let args = harness_args(tmp.path(), socket);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stderr) = up_expecting_exit(&args);
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains("cannot create socket directory /proc/agentid-test-no-such-dir"),
        "message must name the directory it could not create: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_left_by_a_killed_daemon_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(tmp.path(), &[]);
    let socket = d.socket.clone();
    d.signal(libc::SIGKILL);
    drop(d); // reaps the child
    let meta = std::fs::symlink_metadata(&socket).expect("SIGKILL leaves the socket file behind");
    assert!(meta.file_type().is_socket());
    assert!(
        std::os::unix::net::UnixStream::connect(&socket).is_err(),
        "nobody listens on it"
    );

    let d = Daemon::start_in(tmp.path(), &[]);
    let svid = fetch_x509(&d.socket)
        .await
        .expect("the restarted daemon serves on the same path");
    assert_eq!(ids(&svid), [ROOT_ID]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_trail_verifies_detects_an_edit_and_admin_reports_activity() {
    require_root("a client must run as uid 65534 to be denied");
    let tmp = tempfile::tempdir().unwrap();
    // uid 65534 must be able to reach the socket.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut d = Daemon::start_in(tmp.path(), &[]);

    let (code, out, err) = cli(&d.socket, &["x509", "fetch"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = cli(&d.socket, &["jwt", "fetch", "--audience", "audit"]);
    assert_eq!(code, 0, "{err}");

    let denied = Command::new(bin())
        .args(["x509", "fetch"])
        .env("SPIFFE_ENDPOINT_SOCKET", d.endpoint())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let denied_err = String::from_utf8_lossy(&denied.stderr);
    assert!(
        !denied.status.success(),
        "uid 65534 must be denied: {denied_err}"
    );
    assert!(denied_err.contains("no identity issued"), "{denied_err}");
    assert!(denied_err.contains("uid 65534"), "{denied_err}");

    // Admin endpoints while serving.
    let (code, _) = http_get(&d.admin, "/healthz");
    assert_eq!(code, 200);
    let (code, _) = http_get(&d.admin, "/readyz");
    assert_eq!(code, 200);
    let (code, metrics) = http_get(&d.admin, "/metrics");
    assert_eq!(code, 200);
    assert!(
        metric(
            &metrics,
            "agentid_node_issuances_total",
            &["kind=\"x509-svid\""]
        ) > 0.0,
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "agentid_node_issuances_total",
            &["kind=\"jwt-svid\""]
        ) > 0.0,
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "agentid_node_denials_total",
            &["method=\"FetchX509SVID\""]
        ) > 0.0,
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "agentid_node_workload_api_requests_total",
            &["code=\"PERMISSION_DENIED\""]
        ) > 0.0,
        "{metrics}"
    );
    let (code, config) = http_get(&d.admin, "/config");
    assert_eq!(code, 200);
    let config: serde_json::Value = serde_json::from_str(&config).expect("/config is JSON");
    assert_eq!(config["trust_domain"], "agentid.local", "{config}");
    assert_eq!(config["socket"], d.socket.display().to_string(), "{config}");

    // The open-streams gauge follows a client that opens a stream and goes away (ST-09).
    let streams = || {
        metric(
            &http_get(&d.admin, "/metrics").1,
            "agentid_node_open_streams",
            &[],
        )
    };
    assert_eq!(streams(), 0.0);
    let (stream, _) = open_x509_stream(&d.socket).await;
    assert!(
        eventually(EVENT, || (streams() == 1.0).then_some(()))
            .await
            .is_some(),
        "gauge at 1"
    );
    drop(stream);
    assert!(
        eventually(EVENT, || (streams() == 0.0).then_some(()))
            .await
            .is_some(),
        "a cancelled stream must be released: open_streams is {}",
        streams()
    );

    assert!(d.stop(), "clean stop; stderr:\n{}", d.stderr());

    let log = d.state.join("audit.log");
    let actions = audit_actions(&d.state);
    for want in ["issued", "denied"] {
        assert!(
            actions.iter().any(|a| a == want),
            "no {want} record in {actions:?}"
        );
    }
    let denial = audit_records(&d.state)
        .into_iter()
        .find(|r| r["data"]["decision"]["action"] == "denied")
        .unwrap();
    assert_eq!(denial["data"]["requester"]["uid"], 65534, "{denial}");

    let verify = |label: &str| {
        let out = Command::new(bin())
            .args(["audit", "verify"])
            .arg(&log)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text, label.to_owned())
    };
    let (ok, text, _) = verify("intact");
    let lines = std::fs::read_to_string(&log).unwrap().lines().count();
    assert!(lines >= 3, "expected at least three records, got {lines}");
    assert!(ok, "intact log must verify: {text}");
    assert!(
        text.contains(&format!("ok: {lines} records")),
        "must report the record count ({lines}): {text}"
    );

    // One changed byte in a middle line: a hex digit of the event id, so the line stays JSON.
    let mut bytes = std::fs::read(&log).unwrap();
    let target = lines / 2 + 1; // 1-based, neither first nor last
    let line_start = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(target - 2)
        .map(|(i, _)| i + 1)
        .unwrap();
    let id_at = line_start
        + std::str::from_utf8(&bytes[line_start..])
            .unwrap()
            .find("\"id\":\"")
            .expect("id field")
        + 6;
    bytes[id_at] = if bytes[id_at] == b'a' { b'b' } else { b'a' };
    std::fs::write(&log, &bytes).unwrap();
    let (ok, text, _) = verify("edited");
    assert!(!ok, "an edited log must fail verification: {text}");
    assert!(
        text.contains(&format!("line {target}:")),
        "must name line {target}: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_write_print_and_validate() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(tmp.path(), &[]);

    // x509 fetch --out
    let out_dir = tmp.path().join("out");
    let (code, out, err) = cli(
        &d.socket,
        &["x509", "fetch", "--out", out_dir.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(ROOT_ID), "{out}");
    let (cert, key, bundle) = (
        out_dir.join("svid.pem"),
        out_dir.join("svid.key"),
        out_dir.join("bundle.pem"),
    );
    for f in [&cert, &key, &bundle] {
        assert!(f.is_file(), "{} not written", f.display());
    }
    assert_eq!(mode(&key), 0o600, "private key mode");
    let (ok, text) = openssl_verify(&bundle, &cert);
    assert!(
        ok,
        "written SVID must verify against the written bundle: {text}"
    );
    let pubkey = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    assert_eq!(
        pubkey(&["x509", "-noout", "-pubkey", "-in", cert.to_str().unwrap()]),
        pubkey(&["pkey", "-pubout", "-in", key.to_str().unwrap()]),
        "svid.key is the key of svid.pem"
    );

    // x509 fetch --json
    let (code, out, err) = cli(&d.socket, &["x509", "fetch", "--json"]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("--json output {out:?}: {e}"));
    assert_eq!(json["svids"][0]["spiffe_id"], ROOT_ID, "{json}");

    // jwt fetch: only the token on stdout.
    let (code, out, err) = cli(&d.socket, &["jwt", "fetch", "--audience", "a"]);
    assert_eq!(code, 0, "{err}");
    let token = out.trim_end_matches('\n');
    assert!(
        !token.contains(char::is_whitespace),
        "stdout must be the token alone: {out:?}"
    );
    assert_eq!(token.split('.').count(), 3, "compact JWS: {token:?}");
    assert!(err.contains(ROOT_ID), "the identity goes to stderr: {err}");

    // jwt validate: accepted for its audience, refused for another.
    let (code, out, err) = cli(&d.socket, &["jwt", "validate", "--audience", "a", token]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("valid: {ROOT_ID}")), "{out}");
    let (code, _, err) = cli(&d.socket, &["jwt", "validate", "--audience", "b", token]);
    assert_ne!(code, 0, "wrong audience must be refused");
    assert!(err.contains("token rejected"), "{err}");

    // bundle show --json
    let (code, out, err) = cli(&d.socket, &["bundle", "show", "--json"]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out:?}: {e}"));
    let own = &json["spiffe://agentid.local"];
    assert!(
        own["x509_authorities_pem"]
            .as_str()
            .unwrap_or("")
            .contains("BEGIN CERTIFICATE"),
        "{json}"
    );
    let keys = own["jwt_authorities"]["keys"]
        .as_array()
        .expect("JWKS keys");
    assert!(
        !keys.is_empty() && keys.iter().all(|k| k["kid"].is_string()),
        "{json}"
    );
    assert_eq!(
        own["x509_authorities_pem"].as_str().unwrap(),
        std::fs::read_to_string(&bundle).unwrap(),
        "bundle show and x509 fetch agree on the CA"
    );
}

#[test]
fn without_a_daemon_the_cli_asks_whether_agentid_up_is_running() {
    let tmp = tempfile::tempdir().unwrap();
    // Nothing at the path.
    let missing = tmp.path().join("missing.sock");
    // A socket file nobody listens on (what a killed daemon leaves).
    let stale = tmp.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    for socket in [&missing, &stale] {
        for args in [
            &["x509", "fetch"][..],
            &["jwt", "fetch", "--audience", "a"],
            &["bundle", "show"],
        ] {
            let (code, out, err) = cli(socket, args);
            assert_ne!(code, 0, "{args:?} at {}: {out}{err}", socket.display());
            assert!(
                err.contains("is `agentid up` running"),
                "{args:?} at {}: message must ask whether `agentid up` is running: {err}",
                socket.display()
            );
        }
    }
}
