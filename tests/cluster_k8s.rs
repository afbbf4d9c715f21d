//! Kubernetes nodes in cluster mode, with real processes: one `agentid server` watching a
//! stand-in API server (real HTTPS, real Pod, Namespace and TokenReview JSON), two node daemons
//! (`agentid node --attestor k8s`) that attest with projected service-account tokens, and
//! agent processes placed in kubelet-style cgroups of pods. The server checks every pod claim
//! against its own view; the node API is also attacked by hand with a node's own SVID.
//!
//! Needs root, `unshare(1)` and a writable cgroup hierarchy (see `tests/k8s_support`).

mod common;
mod k8s_support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentid::api::node as pb;
use agentid::api::node::node_client::NodeClient;
use agentid::composite::{self, CompositeIdentity};
use agentid::crypto::tls::{self, Accept, Identity, Trust};
use agentid::crypto::{PrivateKey, x509::CertInfo};
use agentid::node::remote::server_channel;
use agentid::spiffe::SpiffeBundle;
use common::k8s::{self as standin, StandIn, bound_token_review, refused_token_review};
use common::{Daemon, cluster};
use k8s_openapi::api::core::v1::Pod;
use k8s_support::{Container, ContainerFs};

const TD: &str = "agentid.local";
const CLUSTER: &str = "test-cluster";
/// The stand-in's bearer token, used by the server and the nodes to read the API.
const API_TOKEN: &str = "api-reader-token";
const AUDIENCE: &str = "agentid-server";
const NODE_NS: &str = "agentid";
const NODE_SA: &str = "agentid-node";
const MODEL: &str = "anthropic/claude-sonnet-4-5";
const PROMPT: &str = "You refund orders under 100 EUR.";
const AGENT_ID: &str = "spiffe://agentid.local/ns/payments/sa/agent/refund";

#[tokio::test]
#[ignore = "child process entry point, run by the tests in this file"]
async fn child_entry() {
    k8s_support::child_main().await;
}

/// Agents in namespace `payments` (labelled team=payments) with service account `agent`.
fn policy() -> String {
    "apiVersion: agentid.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {name: payments-agents}\n\
     spec:\n  spiffeID: \"spiffe://{{ .TrustDomain }}/ns/{{ .Namespace }}/sa/{{ .ServiceAccount }}/{{ .AgentName }}\"\n  \
     selector:\n    k8s:\n      namespace: payments\n      serviceAccount: agent\n      \
     namespaceSelector: {matchLabels: {team: payments}}\n"
        .to_owned()
}

/// The agent's pod on `node`, declaring itself with annotations.
fn agent_pod(node: &str) -> Pod {
    let mut pod = standin::make_pod("refund-7d9f", "payments", node);
    let notes = pod.metadata.annotations.get_or_insert_default();
    for (k, v) in [
        ("agentid.dev/model", MODEL),
        ("agentid.dev/agent-name", "refund"),
        ("agentid.dev/agent-version", "1.4.2"),
        ("agentid.dev/config-files", "/etc/agent/prompt.md"),
    ] {
        notes.insert(k.into(), v.into());
    }
    pod
}

/// The node daemon's own pod on `node` (what its service-account token is bound to).
fn daemon_pod(node: &str) -> Pod {
    let mut pod = standin::make_pod(&format!("agentid-node-{node}"), NODE_NS, node);
    pod.spec.as_mut().unwrap().service_account_name = Some(NODE_SA.into());
    pod
}

fn container_fs() -> ContainerFs {
    let etc = ContainerFs::new();
    etc.write("agent/prompt.md", PROMPT);
    etc
}

/// The stand-in with the two namespaces and both node daemons' pods.
async fn start_standin() -> (StandIn, Pod, Pod) {
    let s = StandIn::start(API_TOKEN, "node-a").await;
    s.put_namespace("payments", &[("team", "payments")]);
    s.put_namespace(NODE_NS, &[]);
    let (a, b) = (daemon_pod("node-a"), daemon_pod("node-b"));
    s.add_pod(a.clone());
    s.add_pod(b.clone());
    (s, a, b)
}

/// A running server watching the stand-in, and what nodes need to join it.
struct Server {
    daemon: Daemon,
    dir: PathBuf,
    url: String,
    listen: String,
    http: String,
    bundle: PathBuf,
}

impl Server {
    fn start(dir: &Path, standin: &StandIn, extra: &[&str]) -> Server {
        Self::start_on(dir, standin, "127.0.0.1:0", extra)
    }

    fn start_on(dir: &Path, standin: &StandIn, listen: &str, extra: &[&str]) -> Server {
        std::fs::create_dir_all(dir).unwrap();
        let (ca, token) = standin.write_files(dir);
        let policy = common::write_policy(dir, "policy.yaml", &policy());
        let admin_socket = dir.join("admin.sock");
        let mut args: Vec<String> = [
            "--cluster-name",
            CLUSTER,
            "--kube-api-url",
            &standin.url,
            "--kube-ca-file",
            ca.to_str().unwrap(),
            "--kube-token-file",
            token.to_str().unwrap(),
            "--pod-wait",
            "1s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let daemon = cluster::launch_server(dir, listen, &policy, &args);
        let listen = cluster::banner_field(&daemon, "node API");
        let http = cluster::banner_field(&daemon, "http");
        let bundle = cluster::export_bundle(&admin_socket, &dir.join("bundle.json"));
        Server {
            url: format!("https://{listen}"),
            listen,
            http,
            daemon,
            dir: dir.to_owned(),
            bundle,
        }
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.dir.join("store/audit.log")).unwrap_or_default()
    }

    /// Audit lines recording the attestation of node `name`.
    fn attestations(&self, name: &str) -> usize {
        let id = format!("spiffe://{TD}/agentid/node/{CLUSTER}/{name}");
        self.audit()
            .lines()
            .filter(|l| l.contains("node attested") && l.contains(&id))
            .count()
    }
}

/// Writes `token` as node `name`'s projected token file; its path.
fn token_file(server: &Server, name: &str, token: &str) -> PathBuf {
    let dir = server.dir.join(format!("node-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sa-token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path
}

/// Starts `agentid node --attestor k8s` for node `name`, attesting with `token`.
fn try_node(server: &Server, standin: &StandIn, name: &str, token: &str) -> Result<Daemon, String> {
    let dir = server.dir.join(format!("node-{name}"));
    let sa_token = token_file(server, name, token);
    let (ca, api_token) = standin.write_files(&dir);
    let extra: Vec<String> = [
        "--k8s-token-file",
        sa_token.to_str().unwrap(),
        "--attestor",
        "k8s",
        "--cluster-name",
        CLUSTER,
        "--kube-api-url",
        &standin.url,
        "--kube-ca-file",
        ca.to_str().unwrap(),
        "--kube-token-file",
        api_token.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    cluster::launch_node(&dir, &server.url, &server.bundle, name, &extra)
}

/// A genuine token for node `name`'s daemon pod, registered with the stand-in.
fn good_token(standin: &StandIn, pod: &Pod, with_node: bool) -> String {
    let token = format!("sa-token-{}", uuid::Uuid::new_v4());
    standin.set_token_review(
        &token,
        bound_token_review(NODE_NS, NODE_SA, &[AUDIENCE], pod, with_node),
    );
    token
}

fn node(server: &Server, standin: &StandIn, name: &str, pod: &Pod, with_node: bool) -> Daemon {
    let token = good_token(standin, pod, with_node);
    try_node(server, standin, name, &token).unwrap_or_else(|e| panic!("agentid node {name}: {e}"))
}

/// The node API as node `d` sees it, with its stored node SVID (what a root attacker on that
/// node holds).
fn node_client(server: &Server, d: &Daemon) -> NodeClient<tonic::transport::Channel> {
    let chain: Vec<Vec<u8>> =
        pem::parse_many(std::fs::read(d.state.join("node-svid.pem")).unwrap())
            .unwrap()
            .into_iter()
            .map(pem::Pem::into_contents)
            .collect();
    let key = pem::parse(std::fs::read(d.state.join("node-svid.key")).unwrap())
        .unwrap()
        .into_contents();
    let bundle = SpiffeBundle::from_json(&std::fs::read(&server.bundle).unwrap()).unwrap();
    let server_id = format!("spiffe://{TD}/agentid/server");
    let config = tls::client_config(
        Some(Identity::new(&chain, &key).unwrap()),
        Trust::new(&bundle).unwrap(),
        Accept::new(move |id| id.to_string() == server_id),
    )
    .unwrap();
    NodeClient::new(server_channel(&server.url, config).unwrap())
}

/// A signing request for `AGENT_ID` naming container `container_id` of pod `pod_uid`.
fn sign_request(pod_uid: &str, container_id: &str, composite: &str) -> pb::SignX509SvidRequest {
    pb::SignX509SvidRequest {
        spiffe_id: AGENT_ID.into(),
        public_key: PrivateKey::generate().unwrap().spki_der(),
        workload: Some(pb::Workload {
            pod_uid: pod_uid.into(),
            container_id: container_id.into(),
            composite: composite.into(),
            ..Default::default()
        }),
    }
}

/// The composite identity the node would report for `pod` on its node (canonical JSON).
fn composite_of(pod: &Pod, node: &str) -> String {
    let config_digest = composite::combine_file_digests(&[(
        "/etc/agent/prompt.md",
        composite::sha256_digest(PROMPT.as_bytes()).as_str(),
    )])
    .unwrap();
    let id = CompositeIdentity {
        agent: Some(composite::Agent {
            name: "refund".into(),
            version: Some("1.4.2".into()),
        }),
        model: composite::Model::parse(MODEL),
        config_digest: Some(config_digest),
        image_digest: Some(standin::image_digest(pod)),
        k8s: Some(composite::K8s {
            cluster: CLUSTER.into(),
            namespace: "payments".into(),
            serviceaccount: "agent".into(),
            pod: composite::Pod {
                name: pod.metadata.name.clone().unwrap(),
                uid: standin::pod_uid(pod),
            },
            node: node.into(),
            container: Some("agent".into()),
        }),
        ..CompositeIdentity::new()
    };
    String::from_utf8(id.canonical_json()).unwrap()
}

/// A child "container" of `pod` fetching from node `d`; its answer.
async fn fetch_in_pod(d: &Daemon, etc: &ContainerFs, pod: &Pod) -> serde_json::Value {
    let mut c = Container::start(
        "child_entry",
        "fetch",
        &d.socket,
        etc,
        &standin::pod_uid(pod),
        &standin::container_id(pod),
    );
    c.go();
    tokio::task::block_in_place(|| c.next(Duration::from_secs(30)))
}

fn leaf_identity(got: &serde_json::Value) -> CompositeIdentity {
    let leaf = got["leaf"]
        .as_str()
        .unwrap_or_else(|| panic!("no SVID: {got}"));
    composite::from_certificate(&hex::decode(leaf).unwrap())
        .unwrap()
        .expect("the SVID states a composite identity")
}

#[track_caller]
fn assert_refused(
    r: Result<tonic::Response<pb::SignX509SvidResponse>, tonic::Status>,
    code: tonic::Code,
    why: &str,
) {
    match r {
        Ok(_) => panic!("signed, but expected a refusal ({why})"),
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            assert!(s.message().contains(why), "{:?} lacks {why:?}", s.message());
        }
    }
}

/// Two Kubernetes nodes attest with their service-account tokens (node a's token names its
/// node, node b's only its pod, so the server reads the pod); a process in a pod on node a
/// gets its SVID through node a with the composite identity the server checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_gets_its_composite_identity_through_its_node_and_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let (standin, pod_a, pod_b) = start_standin().await;
    let server = Server::start(tmp.path(), &standin, &[]);
    let a = node(&server, &standin, "node-a", &pod_a, true);
    let _b = node(&server, &standin, "node-b", &pod_b, false);
    assert_eq!(server.attestations("node-a"), 1, "{}", server.audit());
    assert_eq!(server.attestations("node-b"), 1, "{}", server.audit());
    assert!(
        standin.reviewed().iter().all(|(_, aud)| aud == &[AUDIENCE]),
        "every review asks for the server's audience: {:?}",
        standin.reviewed()
    );
    assert!(
        standin
            .requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/namespaces/agentid/pods/agentid-node-node-b")),
        "node b's pod was read for its node name"
    );

    let pod = agent_pod("node-a");
    standin.add_pod(pod.clone());
    let got = fetch_in_pod(&a, &container_fs(), &pod).await;
    assert_eq!(got["spiffe_id"], AGENT_ID, "{got}");
    let id = leaf_identity(&got);
    let k8s = id.k8s.as_ref().unwrap();
    assert_eq!(
        (
            k8s.cluster.as_str(),
            k8s.node.as_str(),
            k8s.namespace.as_str()
        ),
        (CLUSTER, "node-a", "payments")
    );
    assert_eq!(k8s.pod.uid, standin::pod_uid(&pod));
    assert_eq!(id.image_digest, Some(standin::image_digest(&pod)));
    let model = id.model.as_ref().unwrap();
    assert_eq!(format!("{}/{}", model.provider, model.id), MODEL);
    assert_eq!(
        String::from_utf8(id.canonical_json()).unwrap(),
        composite_of(&pod, "node-a")
    );
    // The JWT-SVID states the same object.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = agentid::inspect::inspect_jwt(got["jwt"].as_str().unwrap(), now)
        .unwrap()
        .claims;
    assert_eq!(composite::from_jwt_claims(&claims).unwrap(), Some(id));

    let audit = server.audit();
    assert!(
        audit.lines().any(|l| l.contains("\"issued\"")
            && l.contains(AGENT_ID)
            && l.contains(&format!("agentid/node/{CLUSTER}/node-a"))
            && l.contains("k8s:node-name:node-a")),
        "issuance audited with the node and the server's facts: {audit}"
    );
    let (code, ready) = common::http_get(&server.http, "/readyz");
    assert_eq!(code, 200, "{ready}");
    assert!(ready.contains("pod view up"), "{ready}");
}

/// Node b gets nothing for a pod on node a: not through its socket (its own index knows the
/// pod is elsewhere), and not by asking the server by hand with its own node SVID. Nor does a
/// node get anything for a container that is not in the pod it names, a pod that does not
/// exist, or a composite identity that is not what the server sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gets_nothing_for_pods_that_are_not_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let (standin, pod_a, pod_b) = start_standin().await;
    let server = Server::start(tmp.path(), &standin, &[]);
    let a = node(&server, &standin, "node-a", &pod_a, true);
    let b = node(&server, &standin, "node-b", &pod_b, true);
    let pod = agent_pod("node-a");
    standin.add_pod(pod.clone());
    let (uid, cid) = (standin::pod_uid(&pod), standin::container_id(&pod));
    let composite = composite_of(&pod, "node-a");

    // The process calls node b's socket.
    let got = fetch_in_pod(&b, &container_fs(), &pod).await;
    assert!(
        got["error"]
            .as_str()
            .unwrap_or_default()
            .contains("NoIdentityIssued"),
        "{got}"
    );

    // The same request signs through node a's channel: it is well formed and entitled.
    let mut via_a = node_client(&server, &a);
    let ok = via_a
        .sign_x509_svid(sign_request(&uid, &cid, &composite))
        .await
        .unwrap_or_else(|s| panic!("node a: {s:?}"))
        .into_inner();
    let leaf = CertInfo::parse(&ok.cert_chain[0]).unwrap();
    assert_eq!(leaf.spiffe_id.unwrap().to_string(), AGENT_ID);

    // Node b, with its own SVID, claims that pod: as node a would, or placed on node b.
    let mut via_b = node_client(&server, &b);
    let not_b = "is scheduled on node \"node-a\", not on node \"node-b\"";
    assert_refused(
        via_b
            .sign_x509_svid(sign_request(&uid, &cid, &composite))
            .await,
        tonic::Code::PermissionDenied,
        not_b,
    );
    assert_refused(
        via_b
            .sign_x509_svid(sign_request(&uid, &cid, &composite_of(&pod, "node-b")))
            .await,
        tonic::Code::PermissionDenied,
        not_b,
    );
    let jwt = via_b
        .sign_jwt_svid(pb::SignJwtSvidRequest {
            spiffe_id: AGENT_ID.into(),
            audience: vec!["ledger".into()],
            workload: sign_request(&uid, &cid, &composite).workload,
        })
        .await
        .unwrap_err();
    assert!(jwt.message().contains(not_b), "{jwt:?}");

    // Node a names a container that is not in the pod, or a pod that does not exist.
    let stranger = format!("{:064x}", 7);
    assert_refused(
        via_a
            .sign_x509_svid(sign_request(&uid, &stranger, &composite))
            .await,
        tonic::Code::PermissionDenied,
        &format!("container {stranger} is not (yet) in pod payments/refund-7d9f"),
    );
    let ghost = uuid::Uuid::new_v4().to_string();
    let started = Instant::now();
    assert_refused(
        via_a
            .sign_x509_svid(sign_request(&ghost, &cid, &composite))
            .await,
        tonic::Code::PermissionDenied,
        &format!("container {cid} belongs to pod {uid}, not to pod {ghost}"),
    );
    let ghost_cid = format!("{:064x}", 8);
    assert_refused(
        via_a
            .sign_x509_svid(sign_request(&ghost, &ghost_cid, &composite))
            .await,
        tonic::Code::PermissionDenied,
        &format!("pod {ghost} does not exist in the cluster"),
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "an unknown pod is waited for (--pod-wait 1s)"
    );

    // Node a reports a composite identity that is not what the server sees.
    let forged = composite.replace(
        &standin::image_digest(&pod),
        &format!("sha256:{}", "0".repeat(64)),
    );
    assert_refused(
        via_a
            .sign_x509_svid(sign_request(&uid, &cid, &forged))
            .await,
        tonic::Code::PermissionDenied,
        "composite identity: the node's report differs from the server's view in image digest",
    );
    let other_model = composite.replace("claude-sonnet-4-5", "claude-opus-4");
    assert_refused(
        via_a
            .sign_x509_svid(sign_request(&uid, &cid, &other_model))
            .await,
        tonic::Code::PermissionDenied,
        "differs from the server's view in model",
    );
    // A pod claim without its container, and a join-token-style host claim, are no better.
    assert_refused(
        via_a
            .sign_x509_svid(sign_request(&uid, "", &composite))
            .await,
        tonic::Code::InvalidArgument,
        "pod_uid and container_id must be given together",
    );

    let audit = server.audit();
    // (The audit log is JSON: quotes in the reasons are escaped.)
    for why in [
        "is scheduled on node \\\"node-a\\\", not on node \\\"node-b\\\"",
        "does not exist in the cluster",
        "differs from the server's view in image digest",
    ] {
        assert!(
            audit
                .lines()
                .any(|l| l.contains("\"denied\"") && l.contains(why)),
            "refusal {why:?} audited: {audit}"
        );
    }
    assert_eq!(
        audit
            .lines()
            .filter(|l| l.contains("\"issued\"") && l.contains(AGENT_ID))
            .count(),
        1,
        "only node a's own request was signed"
    );
}

/// Node tokens are checked with TokenReview: forged, expired, wrong-audience, wrong service
/// account, unbound and stale tokens are refused with the reason and audited; a server
/// without a cluster view says it cannot attest Kubernetes nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_tokens_are_checked_with_token_review_and_refusals_audited() {
    let tmp = tempfile::tempdir().unwrap();
    let (standin, pod_a, _) = start_standin().await;
    let server = Server::start(tmp.path(), &standin, &[]);

    let register = |token: &str, status| {
        standin.set_token_review(token, status);
        token.to_owned()
    };
    let good = || bound_token_review(NODE_NS, NODE_SA, &[AUDIENCE], &pod_a, true);
    let expired = register(
        "expired",
        refused_token_review("[invalid bearer token, service account token has expired]"),
    );
    let wrong_audience = register(
        "wrong-audience",
        bound_token_review(
            NODE_NS,
            NODE_SA,
            &["https://kubernetes.default.svc"],
            &pod_a,
            true,
        ),
    );
    let wrong_account = register(
        "wrong-account",
        bound_token_review("payments", "agent", &[AUDIENCE], &pod_a, true),
    );
    let mut unbound_status = good();
    let extra = unbound_status
        .user
        .as_mut()
        .unwrap()
        .extra
        .as_mut()
        .unwrap();
    extra.retain(|k, _| !k.contains("pod-"));
    let unbound = register("unbound", unbound_status);
    // Bound to a pod that was deleted and recreated under the same name (another UID).
    let mut stale_pod = pod_a.clone();
    stale_pod.metadata.uid = Some(uuid::Uuid::new_v4().to_string());
    let stale = register(
        "stale",
        bound_token_review(NODE_NS, NODE_SA, &[AUDIENCE], &stale_pod, false),
    );
    let elsewhere = register("elsewhere", good());

    let refused = |name: &str, token: &str, why: &str| {
        let err = match try_node(&server, &standin, name, token) {
            Ok(_) => panic!("node {name} joined with a bad token ({why})"),
            Err(e) => e,
        };
        assert!(err.contains(why), "node {name}: expected {why:?}: {err}");
    };
    refused(
        "node-a",
        "forged-token",
        "did not authenticate the token: invalid bearer token",
    );
    refused("node-a", &expired, "service account token has expired");
    refused(
        "node-a",
        &wrong_audience,
        "the token is not for audience \"agentid-server\"",
    );
    refused(
        "node-a",
        &wrong_account,
        "belongs to \"system:serviceaccount:payments:agent\", not to the node daemon's service account agentid/agentid-node",
    );
    refused("node-a", &unbound, "not bound to a pod");
    refused("node-a", &stale, "but the token is bound to UID");
    // A genuine token of node a's daemon, presented by a daemon that calls itself node-b.
    refused(
        "node-b",
        &elsewhere,
        "bound to pod agentid/agentid-node-node-a on node \"node-a\", but the node daemon calls itself \"node-b\"",
    );
    assert_eq!(
        server.attestations("node-a") + server.attestations("node-b"),
        0
    );

    let audit = server.audit();
    for why in [
        "invalid bearer token",
        "has expired",
        "not for audience",
        "not to the node daemon's service account",
        "not bound to a pod",
        "bound to UID",
        "calls itself",
    ] {
        assert!(
            audit
                .lines()
                .any(|l| l.contains("\"denied\"") && l.contains("attest") && l.contains(why)),
            "refusal {why:?} audited"
        );
    }
    // And a good token works after all that.
    let good_token = register("good", good());
    assert!(try_node(&server, &standin, "node-a", &good_token).is_ok());

    // A server without --cluster-name attests hosts only, and says so.
    let hosts_only = tmp.path().join("hosts-only");
    std::fs::create_dir_all(&hosts_only).unwrap();
    let admin_socket = hosts_only.join("admin.sock");
    let plain = Daemon::launch(
        &hosts_only.join("run"),
        &[
            "server".to_owned(),
            "--store".to_owned(),
            format!("file:{}", hosts_only.join("store").display()),
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--admin-socket".to_owned(),
            admin_socket.display().to_string(),
            "--admin-addr".to_owned(),
            "127.0.0.1:0".to_owned(),
        ],
        admin_socket.clone(),
        hosts_only.join("store"),
        "join a host:",
    )
    .unwrap();
    assert!(plain.banner.contains("kubernetes off"), "{}", plain.banner);
    let out = std::process::Command::new(common::bin())
        .args(["bundle", "export", "--admin-socket"])
        .arg(&admin_socket)
        .output()
        .unwrap();
    let listen = plain
        .banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("node API"))
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_owned();
    let hosts_server = Server {
        url: format!("https://{listen}"),
        listen,
        http: String::new(),
        bundle: {
            let p = hosts_only.join("bundle.json");
            std::fs::write(&p, &out.stdout).unwrap();
            p
        },
        dir: hosts_only.clone(),
        daemon: plain,
    };
    let token = register("for-hosts-only", good());
    let err = match try_node(&hosts_server, &standin, "node-a", &token) {
        Ok(_) => panic!("a server without a cluster view attested a Kubernetes node"),
        Err(e) => e,
    };
    assert!(
        err.contains("Kubernetes node attestation is not configured on this server"),
        "{err}"
    );
}

/// With the API server down, the server still signs for pods it knows, and refuses a pod it
/// does not know with the reason: it cannot verify it, not that it does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_api_server_down_known_pods_are_signed_and_unknown_ones_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let (standin, pod_a, _) = start_standin().await;
    let server = Server::start(tmp.path(), &standin, &[]);
    let a = node(&server, &standin, "node-a", &pod_a, true);
    let known = agent_pod("node-a");
    standin.add_pod(known.clone());
    let got = fetch_in_pod(&a, &container_fs(), &known).await;
    assert_eq!(got["spiffe_id"], AGENT_ID, "{got}");

    standin.set_down(true);
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        let (code, body) = common::http_get(&server.http, "/readyz");
        if body.contains("unreachable since") {
            assert_eq!(code, 200, "known pods and hosts are still served: {body}");
            break body;
        }
        assert!(Instant::now() < deadline, "outage not noticed: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(ready.contains("pod view unreachable since"), "{ready}");
    let metrics = common::http_get(&server.http, "/metrics").1;
    assert!(
        metrics.contains("agentid_server_pod_view_up 0"),
        "{metrics}"
    );

    // A pod created during the outage: the server never saw it.
    let unseen = agent_pod("node-a");
    standin.add_pod(unseen.clone());
    let mut via_a = node_client(&server, &a);
    let err = via_a
        .sign_x509_svid(sign_request(
            &standin::pod_uid(&unseen),
            &standin::container_id(&unseen),
            &composite_of(&unseen, "node-a"),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains(&format!(
            "cannot verify pod {}: the API server is unreachable since ",
            standin::pod_uid(&unseen)
        )),
        "{err:?}"
    );
    // The known pod is still signed for (a new key, so the server really signs).
    let ok = via_a
        .sign_x509_svid(sign_request(
            &standin::pod_uid(&known),
            &standin::container_id(&known),
            &composite_of(&known, "node-a"),
        ))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    assert!(
        server
            .audit()
            .contains("the API server is unreachable since")
    );
}

/// A Kubernetes node renews its node SVID by attesting again with the token in its file (a
/// pod-bound token, read afresh): the server refuses a plain renewal, which would outlive the
/// pod. A node whose SVID is lost attests again, and so does one whose SVID expired while the
/// server was away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_k8s_node_attests_again_to_renew_and_when_its_node_svid_is_lost_or_expired() {
    let tmp = tempfile::tempdir().unwrap();
    let (standin, pod_a, _) = start_standin().await;
    let ttl = ["--node-svid-ttl", "8s"];
    let mut server = Server::start(tmp.path(), &standin, &ttl);
    let mut a = node(&server, &standin, "node-a", &pod_a, true);
    assert_eq!(server.attestations("node-a"), 1);

    // Renewal: a plain RenewNodeSvid with the node's own SVID is refused and audited ...
    let err = node_client(&server, &a)
        .renew_node_svid(pb::RenewNodeSvidRequest {
            public_key: PrivateKey::generate().unwrap().spki_der(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        server.audit().contains(
            "renew: Kubernetes nodes renew by attesting with a fresh service-account token"
        ),
        "{}",
        server.audit()
    );
    // ... and the node renews at half-life by attesting again.
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.attestations("node-a") < 2 {
        assert!(Instant::now() < deadline, "no renewal: {}", a.stderr());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Lost: the state directory is wiped; the token file now holds a newer token.
    a.stop();
    for f in ["node-svid.pem", "node-svid.key"] {
        std::fs::remove_file(a.state.join(f)).unwrap();
    }
    let before = server.attestations("node-a");
    let fresh = good_token(&standin, &pod_a, true);
    let a = try_node(&server, &standin, "node-a", &fresh).unwrap();
    assert!(server.attestations("node-a") > before);
    assert!(standin.reviewed().iter().any(|(t, _)| *t == fresh));

    // Expired: the server is away for longer than the node SVID lives.
    let listen = server.listen.clone();
    server.daemon.signal(libc::SIGKILL);
    let before = server.attestations("node-a");
    std::thread::sleep(Duration::from_secs(10));
    drop(server.daemon);
    server = Server::start_on(tmp.path(), &standin, &listen, &ttl);
    let deadline = Instant::now() + Duration::from_secs(45);
    while server.attestations("node-a") <= before {
        assert!(
            Instant::now() < deadline,
            "node a did not attest again: {}",
            a.stderr()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Its new SVID works: a pod it has not served before gets an identity.
    let pod = agent_pod("node-a");
    standin.add_pod(pod.clone());
    let got = fetch_in_pod(&a, &container_fs(), &pod).await;
    assert_eq!(got["spiffe_id"], AGENT_ID, "{got}");
}
