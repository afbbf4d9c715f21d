//! Cluster mode with real processes: one `agentid server`, node daemons (`agentid node`) that
//! join it with single-use tokens over TLS, SPIFFE clients on each node's socket, and the
//! node API attacked directly with hand-made mTLS requests.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentid::api::node as pb;
use agentid::api::node::node_client::NodeClient;
use agentid::crypto::tls::{self, Accept, Trust};
use agentid::crypto::{PrivateKey, x509::CertInfo};
use agentid::node::remote::server_channel;
use agentid::spiffe::SpiffeBundle;
use common::cluster::{identity_from, next_id};
use common::{Daemon, cluster, my_uid};

const TD: &str = "agentid.local";

fn policy(path: &str) -> String {
    format!(
        "apiVersion: agentid.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {{name: agent}}\nspec:\n  spiffeID: \"spiffe://{{{{ .TrustDomain }}}}{path}\"\n  selector: {{unix: {{uid: {uid}}}}}\n  tokens: {{audiences: [ledger], scopes: [\"ledger:read\"]}}\n",
        uid = my_uid()
    )
}

/// A running server and what nodes need to join it.
struct Server {
    daemon: Daemon,
    dir: PathBuf,
    url: String,
    listen: String,
    admin_socket: PathBuf,
    policy: PathBuf,
}

impl Server {
    fn start(dir: &Path, policy_text: &str) -> Server {
        Self::start_on(dir, policy_text, "127.0.0.1:0")
    }

    fn start_on(dir: &Path, policy_text: &str, listen: &str) -> Server {
        let policy = dir.join("policies/agents.yaml");
        std::fs::create_dir_all(policy.parent().unwrap()).unwrap();
        if !policy.exists() {
            std::fs::write(&policy, policy_text).unwrap();
        }
        let admin_socket = dir.join("admin.sock");
        let daemon = cluster::launch_server(dir, listen, &policy, &[]);
        let listen = cluster::banner_field(&daemon, "node API");
        Server {
            url: format!("https://{listen}"),
            listen,
            daemon,
            dir: dir.to_owned(),
            admin_socket,
            policy,
        }
    }

    /// `agentid server token create`; the token.
    fn token(&self, extra: &[&str]) -> String {
        cluster::join_token(&self.admin_socket, extra)
    }

    /// `agentid bundle export` into a file; its path.
    fn bundle_file(&self) -> PathBuf {
        cluster::export_bundle(&self.admin_socket, &self.dir.join("bundle.json"))
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.dir.join("store/audit.log")).unwrap_or_default()
    }
}

/// Starts `agentid node NAME` joined with `token`.
fn try_node(server: &Server, name: &str, token: &str) -> Result<Daemon, String> {
    let dir = server.dir.join(format!("node-{name}"));
    let bundle = server.bundle_file();
    let credential = ["--join-token".to_owned(), token.to_owned()];
    cluster::launch_node(&dir, &server.url, &bundle, name, &credential)
}

fn node(server: &Server, name: &str) -> Daemon {
    let token = server.token(&[]);
    try_node(server, name, &token).unwrap_or_else(|e| panic!("agentid node {name}: {e}"))
}

async fn client(d: &Daemon) -> spiffe::WorkloadApiClient {
    spiffe::WorkloadApiClient::connect_to(d.endpoint())
        .await
        .unwrap()
}

/// Two nodes joined to one server: each issues SVIDs the server signed (they verify against
/// the exported bundle), tokens and JWT-SVIDs minted through one validate through the other,
/// and a policy change on the server reaches an open stream on a node.
#[tokio::test]
async fn two_nodes_issue_through_the_server_and_policy_changes_reach_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path(), &policy("/agent/me"));
    let (a, b) = (node(&server, "a"), node(&server, "b"));

    for n in [&a, &b] {
        let out = n.dir.join("svid");
        let (code, stdout, err) = common::cli(
            &n.socket,
            &["x509", "fetch", "--out", out.to_str().unwrap()],
        );
        assert_eq!(code, 0, "{err}");
        assert!(
            stdout.contains(&format!("spiffe://{TD}/agent/me")),
            "{stdout}"
        );
        let verify = std::process::Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(out.join("bundle.pem"))
            .arg(out.join("svid.pem"))
            .output()
            .expect("openssl");
        assert!(
            String::from_utf8_lossy(&verify.stdout).contains(": OK"),
            "{}",
            String::from_utf8_lossy(&verify.stderr)
        );
    }
    // A JWT-SVID from node a validates on node b, and a task token minted on a verifies on b.
    let (code, jwt, err) = common::cli(&a.socket, &["jwt", "fetch", "--audience", "ledger"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = common::cli(
        &b.socket,
        &["jwt", "validate", "--audience", "ledger", jwt.trim()],
    );
    assert_eq!(code, 0, "{err}");
    let (code, token, err) = common::cli(
        &a.socket,
        &[
            "token",
            "mint",
            "--audience",
            "ledger",
            "--scope",
            "ledger:read",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (code, claims, err) = common::cli(
        &b.socket,
        &["token", "verify", "--audience", "ledger", token.trim()],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        claims.contains(&format!("spiffe://{TD}/agent/me")),
        "{claims}"
    );
    // The server refuses what its policy does not allow, and the node passes the rule on.
    let (code, _, err) = common::cli(
        &a.socket,
        &[
            "token",
            "mint",
            "--audience",
            "payroll",
            "--scope",
            "ledger:read",
        ],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("refused by rule audience_not_allowed"),
        "{err}"
    );

    // A policy change on the server reaches an open stream on node a.
    let c = client(&a).await;
    let mut stream = c.stream_x509_svids().await.unwrap();
    assert_eq!(
        next_id(&mut stream, Duration::from_secs(5))
            .await
            .as_deref(),
        Some(format!("spiffe://{TD}/agent/me").as_str())
    );
    let tmp_policy = server.policy.with_extension("tmp");
    std::fs::write(&tmp_policy, policy("/agent/renamed")).unwrap();
    let changed = Instant::now();
    std::fs::rename(&tmp_policy, &server.policy).unwrap();
    let want = format!("spiffe://{TD}/agent/renamed");
    loop {
        let id = next_id(&mut stream, Duration::from_secs(10))
            .await
            .expect("the policy change reached the stream");
        if id == want {
            break;
        }
    }
    eprintln!("policy change to stream: {:?}", changed.elapsed());

    let audit = server.audit();
    assert!(
        audit.contains(&format!("spiffe://{TD}/agentid/host/a")),
        "node a attested and audited"
    );
    assert!(
        audit.lines().any(|l| l.contains("\"issued\"")
            && l.contains("/agent/renamed")
            && l.contains("agentid/host/a")),
        "issuance audited with the node"
    );
}

/// Join tokens are single use, expire, may be bound to a node name, and forged ones fail;
/// each refusal stops the node with the reason and is audited by the server.
#[tokio::test]
async fn join_tokens_are_single_use_expiring_and_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path(), &policy("/agent/me"));
    let used = server.token(&[]);
    let _a = try_node(&server, "a", &used).unwrap();

    let refused = |name: &str, token: &str, why: &str| {
        let err = match try_node(&server, name, token) {
            Ok(_) => panic!("node {name} joined with a bad token ({why})"),
            Err(e) => e,
        };
        assert!(err.contains(why), "node {name}: expected {why:?}: {err}");
    };
    refused("replay", &used, "join token already used (replay)");
    let short = server.token(&["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    refused("late", &short, "join token expired");
    let bound = server.token(&["--node-name", "x"]);
    refused("y", &bound, "join token is bound to node \"x\"");
    refused("forged", "not-a-token", "join token unknown");
    refused(
        "bad/name",
        &server.token(&[]),
        "node_name must be one SPIFFE ID path segment",
    );
    assert!(
        try_node(&server, "x", &bound).is_ok(),
        "the bound token works for its node"
    );

    let audit = server.audit();
    for why in ["replay", "expired", "bound to node", "unknown"] {
        assert!(
            audit
                .lines()
                .any(|l| l.contains("\"denied\"") && l.contains(why)),
            "refusal {why} audited"
        );
    }
}

/// The node API seen by an attacker: garbage bytes, calls without a node SVID, and a node
/// that asks for what its workloads are not entitled to. None of it gets a signature, and
/// the server keeps serving.
#[tokio::test]
async fn node_api_refuses_garbage_impersonation_and_overreach() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path(), &policy("/agent/me"));
    let a = node(&server, "a");
    let bundle = SpiffeBundle::from_json(&std::fs::read(server.bundle_file()).unwrap()).unwrap();

    // Garbage on the TLS port.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(&server.listen).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x16\x03\x01garbage");
    }
    // Without a client certificate only Attest may be called.
    let trust = Trust::new(&bundle).unwrap();
    let server_id = format!("spiffe://{TD}/agentid/server");
    let accept = Accept::new(move |id| id.to_string() == server_id);
    let plain = tls::client_config(None, trust.clone(), accept.clone()).unwrap();
    let mut anon = NodeClient::new(server_channel(&server.url, plain).unwrap());
    let err = anon
        .sign_x509_svid(sign_request("/agent/me", my_uid(), ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    // Node a's own SVID (a root attacker on node a has it), used by hand.
    let id = identity_from(
        &a.state.join("node-svid.pem"),
        &a.state.join("node-svid.key"),
    );
    let mtls = tls::client_config(Some(id), trust, accept).unwrap();
    let mut node_a = NodeClient::new(server_channel(&server.url, mtls).unwrap());
    // Entitled: signed.
    let ok = node_a
        .sign_x509_svid(sign_request("/agent/me", my_uid(), ""))
        .await
        .unwrap()
        .into_inner();
    let leaf = CertInfo::parse(&ok.cert_chain[0]).unwrap();
    assert_eq!(
        leaf.spiffe_id.unwrap().to_string(),
        format!("spiffe://{TD}/agent/me")
    );
    // A workload no policy gives that ID.
    let err = node_a
        .sign_x509_svid(sign_request("/agent/me", my_uid() + 4242, ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("no policy gives"), "{err:?}");
    // An ID nobody is given.
    let err = node_a
        .sign_x509_svid(sign_request("/agent/admin", my_uid(), ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    // A host node claiming a pod.
    let mut pod = sign_request("/agent/me", my_uid(), "");
    pod.workload.as_mut().unwrap().pod_uid = "0f5c2d7e-0000-4000-8000-000000000001".into();
    let err = node_a.sign_x509_svid(pod).await.unwrap_err();
    assert!(
        err.message().contains("cannot claim Kubernetes pods"),
        "{err:?}"
    );
    // A composite identity the policy does not declare.
    let forged = r#"{"v":1,"model":{"provider":"acme","id":"gpt"}}"#;
    let err = node_a
        .sign_x509_svid(sign_request("/agent/me", my_uid(), forged))
        .await
        .unwrap_err();
    assert!(err.message().contains("composite identity"), "{err:?}");
    // Not a P-256 key.
    let mut bad_key = sign_request("/agent/me", my_uid(), "");
    bad_key.public_key = b"not a key".to_vec();
    let err = node_a.sign_x509_svid(bad_key).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // An SVID of another trust domain is not a node of this one.
    let other = Daemon::start_in(&tmp.path().join("other"), &["--trust-domain", "other.test"]);
    let out = other.dir.join("svid");
    let (code, _, e) = common::cli(
        &other.socket,
        &["x509", "fetch", "--out", out.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{e}");
    let foreign = tls::client_config(
        Some(identity_from(&out.join("svid.pem"), &out.join("svid.key"))),
        Trust::new(&bundle).unwrap(),
        Accept::new(|_| true),
    )
    .unwrap();
    let mut impostor = NodeClient::new(server_channel(&server.url, foreign).unwrap());
    assert!(
        impostor
            .sign_x509_svid(sign_request("/agent/me", my_uid(), ""))
            .await
            .is_err(),
        "a foreign SVID gets nothing"
    );

    // After all that, the node still serves.
    let (code, _, err) = common::cli(&a.socket, &["x509", "fetch"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        server.audit().contains("cannot claim Kubernetes pods"),
        "overreach audited"
    );
}

/// A TLS identity from PEM files: a certificate chain and its PKCS#8 key.
fn sign_request(path: &str, uid: u32, composite: &str) -> pb::SignX509SvidRequest {
    pb::SignX509SvidRequest {
        spiffe_id: format!("spiffe://{TD}{path}"),
        public_key: PrivateKey::generate().unwrap().spki_der(),
        workload: Some(pb::Workload {
            uid,
            gid: uid,
            composite: composite.into(),
            ..Default::default()
        }),
    }
}

/// Kill the server while a client streams from a node: the client sees no error and still
/// fetches (from the node's cache); once the server is back on the same address, the node
/// reconnects and a policy change reaches the open stream again.
#[tokio::test]
async fn server_restart_is_invisible_to_workloads() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(tmp.path(), &policy("/agent/me"));
    let a = node(&server, "a");
    let c = client(&a).await;
    let mut stream = c.stream_x509_svids().await.unwrap();
    assert!(next_id(&mut stream, Duration::from_secs(5)).await.is_some());

    let listen = server.listen.clone();
    server.daemon.signal(libc::SIGKILL);
    std::thread::sleep(Duration::from_secs(1));
    // Cached: no error while the server is away.
    let again = Arc::new(client(&a).await);
    assert!(again.fetch_x509_svid().await.is_ok(), "served from cache");
    assert!(
        next_id(&mut stream, Duration::from_millis(1500))
            .await
            .is_none(),
        "the stream stays open and quiet"
    );

    drop(server.daemon);
    server = Server::start_on(tmp.path(), "", &listen);
    let tmp_policy = server.policy.with_extension("tmp");
    std::fs::write(&tmp_policy, policy("/agent/after-restart")).unwrap();
    std::fs::rename(&tmp_policy, &server.policy).unwrap();
    cluster::wait_for_id(
        &mut stream,
        &format!("spiffe://{TD}/agent/after-restart"),
        Duration::from_secs(40),
        "the node reconnected and the change reached the stream",
    )
    .await;
    let (_, metrics) = common::http_get(&a.admin, "/metrics");
    assert!(metrics.contains("agentid_node_server_up 1"), "{metrics}");
}

/// A broken policy file stops the server at start with exit 64 and the file, document and
/// field; `--store kubernetes` is refused the same way until it exists.
#[test]
fn server_refuses_a_broken_configuration() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: agentid.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {name: x}\nspec: {spiffeID: nope, selector: {unix: {uid: 1}}}\n").unwrap();
    let out = std::process::Command::new(common::bin())
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .arg(format!(
            "--store=file:{}",
            tmp.path().join("store").display()
        ))
        .arg("--admin-socket")
        .arg(tmp.path().join("admin.sock"))
        .arg("--policy")
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("bad.yaml: document 1: spec.spiffeID"), "{err}");
}

/// `agentid server ca rotate --now` in a cluster: the new CA signs at once, the node has the
/// SVIDs it holds signed again without waiting for their half-life, and hands out an SVID the
/// new CA signed only in a message whose bundle already carries it (the node waits for the
/// sync stream to bring that bundle).
#[tokio::test]
async fn emergency_rotation_reaches_workloads_with_its_bundle() {
    use agentid::crypto::x509::{split_der_chain, to_pem};
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path(), &policy("/agent/me"));
    let a = node(&server, "a");
    let mut c = agentid::client::connect(&a.socket).await.unwrap();
    let mut stream = c
        .fetch_x509svid(agentid::api::workload::X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let old_cas = split_der_chain(&first.svids[0].bundle).unwrap();

    let out = std::process::Command::new(common::bin())
        .args(["server", "ca", "rotate", "--now", "--admin-socket"])
        .arg(&server.admin_socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stdout.is_empty(), "the rotation says what changed");

    // Without waiting for its half-life, the held SVID is signed again (the node learns of
    // the emergency on its sync stream) and pushed to the open stream.
    let old_leaf = first.svids[0].x509_svid.clone();
    let svid = loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the SVID re-signed after the emergency rotation")
            .unwrap()
            .unwrap();
        if let Some(s) = msg.svids.into_iter().find(|s| s.x509_svid != old_leaf) {
            break s;
        }
    };
    assert_eq!(svid.spiffe_id, format!("spiffe://{TD}/agent/me"));
    assert!(
        server.audit().contains("emergency rotation"),
        "{}",
        server.audit()
    );
    let cas = split_der_chain(&svid.bundle).unwrap();
    let new: Vec<Vec<u8>> = cas
        .iter()
        .filter(|c| !old_cas.contains(c))
        .cloned()
        .collect();
    assert!(!new.is_empty(), "the message's bundle carries the new CA");
    let leaf = split_der_chain(&svid.x509_svid).unwrap().remove(0);
    let dir = tmp.path().join("verify");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("leaf.pem"), to_pem(&[leaf])).unwrap();
    std::fs::write(dir.join("new.pem"), to_pem(&new)).unwrap();
    let verify = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dir.join("new.pem"))
        .arg(dir.join("leaf.pem"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&verify.stdout).contains(": OK"),
        "signed by the new CA: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
}
