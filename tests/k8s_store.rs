//! `agentid server --store kubernetes` as a real process against the stand-in API server: keys
//! and join-token digests in Secrets, the bundle in a ConfigMap, `AgentIdentity` resources as
//! policies (pushed to node daemons as they change), and what happens with bad state.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use agentid::api::node as pb;
use agentid::api::node::node_client::NodeClient;
use agentid::crypto::tls::{self, Accept, Trust};
use agentid::node::remote::server_channel;
use agentid::spiffe::SpiffeBundle;
use base64::Engine;
use common::cluster::{self, KubeApi};
use common::k8s::StandIn;
use futures::StreamExt;
use serde_json::{Value, json};

const TD: &str = "agentid.local";
const API_TOKEN: &str = "server-api-token";
const NS: &str = "agentid";

async fn standin(dir: &Path) -> (StandIn, KubeApi) {
    cluster::kube_standin(dir, API_TOKEN).await
}

/// An `AgentIdentity` resource selecting pods of service account `sa`.
fn agent_identity(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "agentid.dev/v1alpha1",
        "kind": "AgentIdentity",
        "metadata": {"name": name},
        "spec": spec,
    })
}

fn pod_spec(path: &str, sa: &str) -> Value {
    json!({
        "spiffeID": format!("spiffe://{{{{ .TrustDomain }}}}{path}"),
        "selector": {"k8s": {"serviceAccount": sa}},
    })
}

/// The document `key` of Secret `name`, decoded.
fn secret_doc(standin: &StandIn, name: &str, key: &str) -> Option<String> {
    let secret = standin.get_object("secrets", NS, name)?;
    let b64 = secret["data"][key].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("Secret data is base64");
    Some(String::from_utf8(bytes).unwrap())
}

/// Polls `f` until it returns Some, for up to `limit`.
async fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn export(admin_socket: &Path, to: &Path) -> SpiffeBundle {
    cluster::export_bundle(admin_socket, to);
    SpiffeBundle::from_json(&std::fs::read(to).unwrap()).unwrap()
}

/// Keys and join tokens live in Secrets (never a token in the clear), the Lease holder
/// publishes the bundle ConfigMap, and a new process on the same cluster state serves the
/// same bundle and honours a join token created before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_lives_in_the_cluster_and_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (standin, api) = standin(tmp.path()).await;
    standin.put_object(
        "agentidentities",
        "team-a",
        agent_identity("agent", pod_spec("/agent/a", "agent")),
    );
    standin.put_object(
        "agentidentities",
        "team-b",
        agent_identity(
            "broken",
            json!({"spiffeID": "not an id", "selector": {"k8s": {}}}),
        ),
    );

    let dir = tmp.path().join("first");
    let mut first = cluster::launch_kube_server(&dir, &api, "replica-1", "127.0.0.1:0", &[])
        .unwrap_or_else(|e| panic!("server: {e}"));
    assert!(first.banner.contains("agent.team-a"), "{}", first.banner);
    assert!(!first.banner.contains("broken"), "{}", first.banner);
    assert!(
        first
            .banner
            .contains("store      kubernetes namespace agentid"),
        "{}",
        first.banner
    );

    // The key state is one Secret, labelled, holding the whole document.
    let keys = secret_doc(&standin, "agentid-server-keys", "keys.json").expect("key Secret");
    let state: Value = serde_json::from_str(&keys).unwrap();
    assert_eq!(state["trust_domain"], TD);
    assert!(
        state["x509"]["current"]["key"]
            .as_str()
            .unwrap()
            .contains("PRIVATE KEY")
    );
    let secret = standin
        .get_object("secrets", NS, "agentid-server-keys")
        .unwrap();
    assert_eq!(
        secret["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "agentid-server"
    );
    assert_eq!(secret["type"], "Opaque");

    // The Lease holder publishes the bundle ConfigMap; it matches what the server serves.
    let bundle = export(&first.socket, &dir.join("bundle.json"));
    let cm = eventually(Duration::from_secs(20), || {
        standin.get_object("configmaps", NS, "agentid-bundle")
    })
    .await
    .expect("bundle ConfigMap published");
    let published =
        SpiffeBundle::from_json(cm["data"]["bundle.spiffe"].as_str().unwrap().as_bytes()).unwrap();
    assert_eq!(published.x509_authorities, bundle.x509_authorities);
    assert_eq!(published.jwt_authorities, bundle.jwt_authorities);
    assert!(
        cm["data"]["bundle.pem"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    let lease = standin
        .get_object("leases", NS, "agentid-server")
        .expect("Lease");
    assert_eq!(lease["spec"]["holderIdentity"], "replica-1");

    // Join tokens: digests only, in their own Secret.
    let token = cluster::join_token(&first.socket, &[]);
    let digests = secret_doc(&standin, "agentid-join-tokens", "join-tokens.json").unwrap();
    assert!(!digests.contains(&token), "only digests are stored");
    assert_eq!(
        serde_json::from_str::<Value>(&digests)
            .unwrap()
            .as_object()
            .unwrap()
            .len(),
        1
    );

    // The bad resource was left out and audited; the good one is in force.
    let audit = std::fs::read_to_string(dir.join("audit.log")).unwrap();
    assert!(audit.contains("AgentIdentity team-b/broken"), "{audit}");

    // A graceful stop releases the Lease.
    assert!(first.stop());
    let lease = standin.get_object("leases", NS, "agentid-server").unwrap();
    assert!(
        lease["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or("")
            .is_empty(),
        "released: {lease}"
    );

    // A new process (another pod) on the same cluster state: same bundle, and the token
    // created through the first one joins a host.
    let dir2 = tmp.path().join("second");
    let second = cluster::launch_kube_server(&dir2, &api, "replica-2", "127.0.0.1:0", &[])
        .unwrap_or_else(|e| panic!("server: {e}"));
    let again = export(&second.socket, &dir2.join("bundle.json"));
    assert_eq!(again.x509_authorities, bundle.x509_authorities);
    assert_eq!(again.jwt_authorities, bundle.jwt_authorities);
    let url = format!("https://{}", cluster::banner_field(&second, "node API"));
    let credential = ["--join-token".to_owned(), token.clone()];
    let node = cluster::launch_node(
        &tmp.path().join("node"),
        &url,
        &dir2.join("bundle.json"),
        "host-1",
        &credential,
    );
    assert!(
        node.is_ok(),
        "a token stored in the cluster joins: {:?}",
        node.err()
    );
    // Used up, everywhere: a replay through this replica is refused.
    let replay = cluster::launch_node(
        &tmp.path().join("node-replay"),
        &url,
        &dir2.join("bundle.json"),
        "host-2",
        &credential,
    );
    assert!(replay.err().unwrap().contains("already used"));

    // Every write the servers made was accepted: no conflict went unnoticed.
    let writes = standin.writes();
    assert!(
        writes
            .iter()
            .any(|w| w.starts_with("POST secrets agentid/agentid-server-keys 201")),
        "{writes:?}"
    );
    assert!(writes.iter().all(|w| !w.contains("PATCH")), "{writes:?}");
}

/// A key Secret that is not agentid's document, or an API server that is down, stops the
/// server at start with a message naming what is wrong; nothing is overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cluster_state_is_refused_at_start_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let (standin, api) = standin(tmp.path()).await;
    let garbage = base64::engine::general_purpose::STANDARD.encode("{\"version\": 1, half a doc");
    standin.put_object(
        "secrets",
        NS,
        json!({"metadata": {"name": "agentid-server-keys"}, "data": {"keys.json": garbage}}),
    );
    let err = cluster::launch_kube_server(&tmp.path().join("a"), &api, "r", "127.0.0.1:0", &[])
        .err()
        .expect("refused");
    assert!(
        err.contains("Secret agentid/agentid-server-keys (keys.json): not a valid document"),
        "{err}"
    );
    assert_eq!(
        standin
            .get_object("secrets", NS, "agentid-server-keys")
            .unwrap()["data"]["keys.json"],
        garbage,
        "left as it was"
    );

    let other = base64::engine::general_purpose::STANDARD.encode("x");
    standin.put_object(
        "secrets",
        NS,
        json!({"metadata": {"name": "agentid-server-keys"}, "data": {"other": other}}),
    );
    let err = cluster::launch_kube_server(&tmp.path().join("b"), &api, "r", "127.0.0.1:0", &[])
        .err()
        .expect("refused");
    assert!(err.contains("has no key \"keys.json\""), "{err}");

    standin.set_down(true);
    let err = cluster::launch_kube_server(&tmp.path().join("c"), &api, "r", "127.0.0.1:0", &[])
        .err()
        .expect("refused");
    assert!(err.contains("--store kubernetes"), "{err}");
}

/// Node daemons receive `AgentIdentity` changes on their sync stream as they happen: a new
/// resource, a bad one (left out, audited, the rest unchanged), and a deletion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentidentity_changes_reach_node_daemons() {
    let tmp = tempfile::tempdir().unwrap();
    let (standin, api) = standin(tmp.path()).await;
    let dir = tmp.path().join("server");
    let server = cluster::launch_kube_server(&dir, &api, "replica-1", "127.0.0.1:0", &[])
        .unwrap_or_else(|e| panic!("server: {e}"));
    let url = format!("https://{}", cluster::banner_field(&server, "node API"));
    let bundle_path = dir.join("bundle.json");
    let bundle = export(&server.socket, &bundle_path);
    let node = cluster::launch_node(
        &tmp.path().join("node"),
        &url,
        &bundle_path,
        "host-1",
        &[
            "--join-token".to_owned(),
            cluster::join_token(&server.socket, &[]),
        ],
    )
    .unwrap();

    // The node's own SVID, on the node API's sync stream (what the node daemon reads).
    let id = cluster::identity_from(
        &node.state.join("node-svid.pem"),
        &node.state.join("node-svid.key"),
    );
    let server_id = format!("spiffe://{TD}/agentid/server");
    let accept = Accept::new(move |id| id.to_string() == server_id);
    let mtls = tls::client_config(Some(id), Trust::new(&bundle).unwrap(), accept).unwrap();
    let mut client = NodeClient::new(server_channel(&url, mtls).unwrap());
    let mut sync = client.sync(pb::SyncRequest {}).await.unwrap().into_inner();
    let names = |msg: &pb::SyncResponse| -> Vec<String> {
        msg.policies.iter().map(|p| p.origin.clone()).collect()
    };
    let first = sync.next().await.unwrap().unwrap();
    assert!(names(&first).is_empty(), "{:?}", names(&first));

    let started = Instant::now();
    standin.put_object(
        "agentidentities",
        "team-a",
        agent_identity("agent", pod_spec("/agent/a", "agent")),
    );
    let msg = next_change(&mut sync).await;
    assert_eq!(names(&msg), ["AgentIdentity team-a/agent"]);
    let pushed = started.elapsed();
    // The text a node loads: the resource's spec, named NAME.NS, pinned to its namespace.
    let text = &msg.policies[0].text;
    assert!(text.contains("\"agent.team-a\""), "{text}");
    assert!(text.contains("\"namespace\": \"team-a\""), "{text}");

    standin.put_object(
        "agentidentities",
        "team-b",
        agent_identity("reach", json!({"spiffeID": "spiffe://agentid.local/x", "selector": {"k8s": {"namespace": "kube-system"}}})),
    );
    standin.put_object(
        "agentidentities",
        "team-b",
        agent_identity("second", pod_spec("/agent/b", "agent")),
    );
    let msg = next_change(&mut sync).await;
    assert_eq!(
        names(&msg),
        ["AgentIdentity team-a/agent", "AgentIdentity team-b/second"]
    );
    let audit = std::fs::read_to_string(dir.join("audit.log")).unwrap();
    assert!(
        audit.contains("AgentIdentity team-b/reach: spec.selector.k8s.namespace"),
        "{audit}"
    );

    standin.delete_object("agentidentities", "team-a", "agent");
    let msg = next_change(&mut sync).await;
    assert_eq!(names(&msg), ["AgentIdentity team-b/second"]);
    eprintln!("resource change to node sync stream: {pushed:?}");
}

/// The next message on the sync stream, within 10 s.
async fn next_change(sync: &mut tonic::Streaming<pb::SyncResponse>) -> pb::SyncResponse {
    tokio::time::timeout(Duration::from_secs(10), sync.next())
        .await
        .expect("a change within 10 s")
        .unwrap()
        .unwrap()
}
