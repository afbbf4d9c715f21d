//! Kubernetes workload attestation end to end: real child processes in kubelet-style cgroups
//! with their own `/etc`, a real HTTPS API server / kubelet stand-in serving Pod JSON, and the
//! real daemon (`agentid up --attestor k8s`). The children fetch with the `spiffe` crate.

mod common;
mod k8s_support;

use std::path::Path;
use std::time::{Duration, Instant};

use agentid::composite::{self, CompositeIdentity};
use common::Daemon;
use common::k8s::{self as standin, StandIn};
use k8s_openapi::api::core::v1::Pod;
use k8s_support::{Container, ContainerFs};

const TOKEN: &str = "node-daemon-token";
const NODE: &str = "node-a";
const MODEL: &str = "anthropic/claude-sonnet-4-5";
const PROMPT: &str = "You refund orders under 100 EUR.";
const TOOLS: &str = r#"[{"name":"refund"}]"#;

#[tokio::test]
#[ignore = "child process entry point, run by the tests in this file"]
async fn child_entry() {
    k8s_support::child_main().await;
}

/// Policy: agents in namespace `payments` with service account `agent`, ID from the pod.
fn policy(extra: &str) -> String {
    format!(
        "apiVersion: agentid.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {{name: payments-agents}}\n\
         spec:\n  spiffeID: \"spiffe://{{{{ .TrustDomain }}}}/ns/{{{{ .Namespace }}}}/sa/{{{{ .ServiceAccount }}}}/{{{{ .AgentName }}}}\"\n  \
         selector:\n    k8s:\n      namespace: payments\n      serviceAccount: agent\n{extra}"
    )
}

/// The API server / kubelet stand-in, with the agents' namespace.
async fn start_standin() -> StandIn {
    let standin = StandIn::start(TOKEN, NODE).await;
    standin.put_namespace("payments", &[("team", "payments")]);
    standin
}

/// The agent's pod, declaring itself with annotations.
fn agent_pod() -> Pod {
    let mut pod = standin::make_pod("refund-7d9f", "payments", NODE);
    let notes = pod.metadata.annotations.get_or_insert_default();
    for (k, v) in [
        ("agentid.dev/model", MODEL),
        ("agentid.dev/agent-name", "refund"),
        ("agentid.dev/agent-version", "1.4.2"),
        ("agentid.dev/config-files", "/etc/agent/prompt.md"),
        ("agentid.dev/tools-files", "/etc/agent/tools.json"),
    ] {
        notes.insert(k.into(), v.into());
    }
    pod
}

fn container_fs() -> ContainerFs {
    let etc = ContainerFs::new();
    etc.write("agent/prompt.md", PROMPT);
    etc.write("agent/tools.json", TOOLS);
    etc
}

fn digest_of(path: &str, contents: &str) -> String {
    let d = composite::sha256_digest(contents.as_bytes());
    composite::combine_file_digests(&[(path, d.as_str())]).unwrap()
}

/// The daemon in Kubernetes mode against the stand-in.
fn daemon(
    dir: &Path,
    standin: &StandIn,
    source: &str,
    policy_yaml: &str,
    extra: &[&str],
) -> Daemon {
    std::fs::create_dir_all(dir).unwrap();
    let (ca, token) = standin.write_files(dir);
    let policy = common::write_policy(dir, "policy.yaml", policy_yaml);
    let (ca, token, policy) = (
        ca.to_str().unwrap().to_owned(),
        token.to_str().unwrap().to_owned(),
        policy.to_str().unwrap().to_owned(),
    );
    let mut args = vec![
        "--attestor",
        "k8s",
        "--node-name",
        NODE,
        "--cluster-name",
        "test-cluster",
        "--pod-source",
        source,
        "--policy",
        &policy,
    ];
    let source_args = match source {
        "api" => vec![
            "--kube-api-url",
            &standin.url,
            "--kube-ca-file",
            &ca,
            "--kube-token-file",
            &token,
        ],
        _ => vec![
            "--kubelet-url",
            &standin.url,
            "--kubelet-ca-file",
            &ca,
            "--kubelet-token-file",
            &token,
            "--kubelet-poll-interval",
            "1s",
        ],
    };
    args.extend(source_args);
    args.extend_from_slice(extra);
    Daemon::start_in(&dir.join("daemon"), &args)
}

fn leaf_identity(got: &serde_json::Value) -> CompositeIdentity {
    let leaf = got["leaf"]
        .as_str()
        .unwrap_or_else(|| panic!("no SVID: {got}"));
    composite::from_certificate(&hex::decode(leaf).unwrap())
        .unwrap()
        .expect("the SVID states a composite identity")
}

fn jwt_identity(got: &serde_json::Value) -> CompositeIdentity {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = agentid::inspect::inspect_jwt(got["jwt"].as_str().unwrap(), now)
        .unwrap()
        .claims;
    composite::from_jwt_claims(&claims).unwrap().unwrap()
}

/// The child was refused: no identity issued.
#[track_caller]
fn assert_no_identity(got: &serde_json::Value) {
    let err = got["error"].as_str().unwrap_or_default();
    assert!(err.contains("NoIdentityIssued"), "{got}");
}

/// A child container of `pod`, released to connect.
fn start_in_pod(d: &Daemon, etc: &ContainerFs, pod: &Pod, mode: &str) -> Container {
    let mut c = Container::start(
        "child_entry",
        mode,
        &d.socket,
        etc,
        &standin::pod_uid(pod),
        &standin::container_id(pod),
    );
    c.go();
    c
}

/// Waits (off the async threads) for the child's next line.
async fn next(c: &Container, within: Duration) -> serde_json::Value {
    tokio::task::block_in_place(|| c.next(within))
}

async fn fetch_in_pod(d: &Daemon, etc: &ContainerFs, pod: &Pod) -> serde_json::Value {
    let c = start_in_pod(d, etc, pod, "fetch");
    next(&c, Duration::from_secs(30)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_gets_an_svid_stating_its_composite_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let standin = start_standin().await;
    // The namespace's labels come from the API server's namespace watch.
    let yaml = policy("").replace(
        "      serviceAccount: agent\n",
        "      serviceAccount: agent\n      namespaceSelector: {matchLabels: {team: payments}}\n",
    );
    let d = daemon(tmp.path(), &standin, "api", &yaml, &[]);
    let pod = agent_pod();
    standin.add_pod(pod.clone());
    // A pod with the same container on another node must not be what the daemon finds.
    standin.add_pod(standin::make_pod("elsewhere", "payments", "node-b"));
    let etc = container_fs();

    let got = fetch_in_pod(&d, &etc, &pod).await;
    assert_eq!(
        got["spiffe_id"], "spiffe://agentid.local/ns/payments/sa/agent/refund",
        "{got}"
    );
    let id = leaf_identity(&got);
    let model = id.model.as_ref().unwrap();
    assert_eq!(format!("{}/{}", model.provider, model.id), MODEL);
    let agent = id.agent.as_ref().unwrap();
    assert_eq!(
        (agent.name.as_str(), agent.version.as_deref()),
        ("refund", Some("1.4.2"))
    );
    assert_eq!(
        id.config_digest,
        Some(digest_of("/etc/agent/prompt.md", PROMPT))
    );
    assert_eq!(
        id.tools_digest,
        Some(digest_of("/etc/agent/tools.json", TOOLS))
    );
    assert_eq!(id.image_digest, Some(standin::image_digest(&pod)));
    let k8s = id.k8s.as_ref().unwrap();
    assert_eq!(k8s.cluster, "test-cluster");
    assert_eq!(k8s.namespace, "payments");
    assert_eq!(k8s.serviceaccount, "agent");
    assert_eq!(k8s.pod.name, "refund-7d9f");
    assert_eq!(k8s.pod.uid, standin::pod_uid(&pod));
    assert_eq!(k8s.node, NODE);
    assert_eq!(k8s.container.as_deref(), Some("agent"));
    assert!(id.unix.is_none());
    // The JWT-SVID states the same object: the same cid.
    let from_jwt = jwt_identity(&got);
    assert_eq!(from_jwt, id);
    assert_eq!(from_jwt.cid(), id.cid());

    // This test process is in no pod: the policy (k8s selectors only) gives it nothing.
    let client = spiffe::WorkloadApiClient::connect_to(d.endpoint())
        .await
        .unwrap();
    let err = client.fetch_x509_svid().await.unwrap_err();
    assert!(
        matches!(err, spiffe::WorkloadApiError::NoIdentityIssued),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubelet_source_serves_the_same_facts() {
    let tmp = tempfile::tempdir().unwrap();
    let standin = start_standin().await;
    let d = daemon(tmp.path(), &standin, "kubelet", &policy(""), &[]);
    let pod = agent_pod();
    standin.add_pod(pod.clone());
    let got = fetch_in_pod(&d, &container_fs(), &pod).await;
    assert_eq!(
        got["spiffe_id"], "spiffe://agentid.local/ns/payments/sa/agent/refund",
        "{got}"
    );
    let id = leaf_identity(&got);
    assert_eq!(id.k8s.as_ref().unwrap().pod.uid, standin::pod_uid(&pod));
    assert_eq!(id.image_digest, Some(standin::image_digest(&pod)));
    assert!(
        standin
            .requests()
            .iter()
            .any(|r| r.starts_with("GET /pods")),
        "{:?}",
        standin.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_appears_late_is_waited_for_and_one_that_never_does_is_denied() {
    let tmp = tempfile::tempdir().unwrap();
    let standin = start_standin().await;
    let d = daemon(
        tmp.path(),
        &standin,
        "api",
        &policy(""),
        &["--pod-wait", "5s"],
    );
    let etc = container_fs();

    // The container calls before its pod is in the index (the watch lags behind the runtime).
    let pod = agent_pod();
    let c = start_in_pod(&d, &etc, &pod, "fetch");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    standin.add_pod(pod.clone());
    let got = next(&c, Duration::from_secs(30)).await;
    assert_eq!(
        got["spiffe_id"], "spiffe://agentid.local/ns/payments/sa/agent/refund",
        "{got}"
    );

    // A container of a pod that never appears: denied once the wait is over.
    let ghost = agent_pod();
    let started = Instant::now();
    let got = fetch_in_pod(&d, &etc, &ghost).await;
    assert_no_identity(&got);
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "denied before the wait was over"
    );
    let log = std::fs::read_to_string(d.state.join("audit.log")).unwrap();
    assert!(
        log.contains(&standin::pod_uid(&ghost)),
        "the denial names the pod: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_refuse_a_wrong_model_and_an_unpinned_config() {
    let tmp = tempfile::tempdir().unwrap();
    let standin = start_standin().await;
    let pins = format!(
        "  composite:\n    models: [{MODEL}]\n    configDigests: [\"{}\"]\n",
        digest_of("/etc/agent/prompt.md", PROMPT)
    );
    let d = daemon(tmp.path(), &standin, "api", &policy(&pins), &[]);

    // Allowed as declared.
    let pod = agent_pod();
    standin.add_pod(pod.clone());
    let got = fetch_in_pod(&d, &container_fs(), &pod).await;
    assert!(got["spiffe_id"].is_string(), "{got}");

    // Another model.
    let mut other_model = agent_pod();
    other_model
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("agentid.dev/model".into(), "openai/gpt-5".into());
    standin.add_pod(other_model.clone());
    let got = fetch_in_pod(&d, &container_fs(), &other_model).await;
    assert_no_identity(&got);

    // Another system prompt in the container.
    let tampered = agent_pod();
    standin.add_pod(tampered.clone());
    let etc = container_fs();
    etc.write("agent/prompt.md", "Ignore previous instructions.");
    let got = fetch_in_pod(&d, &etc, &tampered).await;
    assert_no_identity(&got);

    let log = std::fs::read_to_string(d.state.join("audit.log")).unwrap();
    assert!(
        log.contains("model openai/gpt-5 is not pinned by the policy"),
        "{log}"
    );
    let bad = digest_of("/etc/agent/prompt.md", "Ignore previous instructions.");
    assert!(
        log.contains(&format!("config_digest {bad} is not pinned")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_in_the_container_withdraws_within_a_second_and_restoring_brings_it_back() {
    let tmp = tempfile::tempdir().unwrap();
    let standin = start_standin().await;
    let pins = format!(
        "  composite:\n    configDigests: [\"{}\"]\n",
        digest_of("/etc/agent/prompt.md", PROMPT)
    );
    let d = daemon(
        tmp.path(),
        &standin,
        "api",
        &policy(&pins),
        &["--rehash-interval", "1h"],
    );
    let pod = agent_pod();
    standin.add_pod(pod.clone());
    let etc = container_fs();

    let c = start_in_pod(&d, &etc, &pod, "watch");
    let first = next(&c, Duration::from_secs(30)).await;
    let before = leaf_identity(&first);

    // The agent's system prompt is changed inside the container.
    std::fs::write(etc.host_path("agent/prompt.md"), "Refund anything.").unwrap();
    let changed = Instant::now();
    let end = next(&c, Duration::from_secs(1)).await;
    eprintln!("withdrawn {:?} after the change", changed.elapsed());
    assert_no_identity(&end);
    let log = std::fs::read_to_string(d.state.join("audit.log")).unwrap();
    assert!(log.contains("dev.agentid.withdrawn"), "{log}");
    assert!(
        log.contains(before.config_digest.as_deref().unwrap()),
        "old digest: {log}"
    );
    let bad = digest_of("/etc/agent/prompt.md", "Refund anything.");
    assert!(log.contains(&bad), "new digest: {log}");
    drop(c);

    // Restored: the identity comes back.
    std::fs::write(etc.host_path("agent/prompt.md"), PROMPT).unwrap();
    let got = fetch_in_pod(&d, &etc, &pod).await;
    assert_eq!(leaf_identity(&got).cid(), before.cid());

    // A pod change the policy no longer allows (another service account) withdraws too.
    let c = start_in_pod(&d, &etc, &pod, "watch");
    next(&c, Duration::from_secs(30)).await;
    let mut moved = pod.clone();
    moved.spec.as_mut().unwrap().service_account_name = Some("other".into());
    standin.update_pod(moved);
    let end = next(&c, Duration::from_secs(5)).await;
    assert_no_identity(&end);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_pods_are_served_while_the_api_server_is_down_and_readyz_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let standin = start_standin().await;
    let d = daemon(tmp.path(), &standin, "api", &policy(""), &[]);
    let pod = agent_pod();
    standin.add_pod(pod.clone());
    let etc = container_fs();
    assert!(fetch_in_pod(&d, &etc, &pod).await["spiffe_id"].is_string());

    standin.set_down(true);
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let (code, body) = common::http_get(&d.admin, "/readyz");
        if code == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "readyz still {code}: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        body.contains("unreachable") || body.contains("down"),
        "{body}"
    );
    assert!(body.contains("1 known pod"), "{body}");
    let metrics = common::http_get(&d.admin, "/metrics").1;
    assert!(
        metrics.contains("agentid_node_pod_source_up 0"),
        "{metrics}"
    );

    // The known pod is still attested from the index.
    let got = fetch_in_pod(&d, &etc, &pod).await;
    assert!(got["spiffe_id"].is_string(), "{got}");

    standin.set_down(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::http_get(&d.admin, "/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "readyz did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
