//! The node's pod index fed by each source from a stand-in API server and kubelet over real
//! HTTPS, with the real wire formats (`tests/common/k8s.rs`).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use agentid::metrics::NodeMetrics;
use agentid::node::k8s::{
    self, ApiConfig, K8sConfig, KubeletConfig, LookupError, PodIndex, PodSource, SourceHandle,
    StartError,
};
use common::k8s::{StandIn, container_id, image_digest, make_pod, pod_uid};
use k8s_openapi::api::core::v1::Pod;

const TOKEN: &str = "token-1";
const NODE: &str = "node-a";

fn config(source: PodSource) -> K8sConfig {
    K8sConfig {
        node_name: NODE.into(),
        cluster_name: "test-cluster".into(),
        pod_source: source,
        ..K8sConfig::default()
    }
}

fn api_config(standin: &StandIn, dir: &Path) -> K8sConfig {
    let (ca, token) = standin.write_files(dir);
    let mut c = config(PodSource::Api);
    c.api = ApiConfig {
        url: Some(standin.url.clone()),
        ca_file: Some(ca),
        token_file: Some(token),
    };
    c
}

async fn start_api(standin: &StandIn, dir: &Path) -> (PodIndex, SourceHandle) {
    k8s::start(&api_config(standin, dir))
        .await
        .expect("start the API source")
}

fn kubelet_config(standin: &StandIn, dir: &Path, poll: Duration) -> K8sConfig {
    let (ca, token) = standin.write_files(dir);
    let mut c = config(PodSource::Kubelet);
    c.kubelet = KubeletConfig {
        url: standin.url.clone(),
        ca_file: Some(ca),
        token_file: token,
        poll_interval: poll,
        ..KubeletConfig::default()
    };
    c
}

/// Polls `check` every 20 ms until it holds; panics with `what` and the index status after
/// `limit`.
async fn until(index: &PodIndex, what: &str, limit: Duration, check: impl Fn(&PodIndex) -> bool) {
    let start = Instant::now();
    while !check(index) {
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?}; status: {:?}",
            index.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const SYNC: Duration = Duration::from_secs(20);
/// Outages are noticed after kube's retries; recovery waits out the watcher's backoff.
const RECOVERY: Duration = Duration::from_secs(60);

fn standin_pods(standin: &StandIn) -> (Pod, Pod, Pod) {
    standin.put_namespace("agents", &[("team", "ml")]);
    standin.put_namespace("other", &[]);
    let a1 = make_pod("agent-1", "agents", NODE);
    let a2 = make_pod("agent-2", "agents", NODE);
    let b1 = make_pod("agent-b", "other", "node-b");
    for p in [&a1, &a2, &b1] {
        standin.add_pod(p.clone());
    }
    (a1, a2, b1)
}

#[tokio::test]
async fn api_source_indexes_this_nodes_pods_only() {
    let dir = tempfile::tempdir().unwrap();
    let standin = StandIn::start(TOKEN, NODE).await;
    let (a1, a2, b1) = standin_pods(&standin);
    let (index, source) = start_api(&standin, dir.path()).await;
    until(&index, "synced", SYNC, |i| {
        i.status().ready() && i.status().up()
    })
    .await;

    let facts = index.lookup(&pod_uid(&a1), &container_id(&a1)).unwrap();
    assert_eq!(facts.cluster, "test-cluster");
    assert_eq!(facts.node_name, NODE);
    assert_eq!(facts.namespace, "agents");
    assert_eq!(
        facts.namespace_labels,
        [("team".to_owned(), "ml".to_owned())].into()
    );
    assert_eq!(facts.service_account, "agent");
    assert_eq!(facts.pod_name, "agent-1");
    assert_eq!(facts.pod_uid, pod_uid(&a1));
    assert_eq!(
        facts.pod_labels.get("app").map(String::as_str),
        Some("agent-1")
    );
    assert_eq!(
        facts
            .pod_annotations
            .get("agentid.dev/config")
            .map(String::as_str),
        Some("sha256:0123456789abcdef")
    );
    assert_eq!(facts.container_name, "agent");
    assert_eq!(facts.container_id, container_id(&a1));
    assert_eq!(facts.image, "docker.io/library/agent:1.0");
    assert_eq!(facts.image_digest, Some(image_digest(&a1)));
    assert!(index.lookup(&pod_uid(&a2), &container_id(&a2)).is_ok());
    // The API server never sent node-b's pod.
    assert_eq!(
        index.lookup(&pod_uid(&b1), &container_id(&b1)),
        Err(LookupError::PodUnknown {
            pod_uid: pod_uid(&b1)
        })
    );
    assert_eq!(index.len(), 2);
    assert_eq!(
        index.status().summary(),
        "pod source api up, 2 pods indexed"
    );

    let requests = standin.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.contains("/api/v1/pods?")
                && r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "{requests:#?}"
    );
    // The watch follows the list; on a loaded machine it may not have been sent yet.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !standin.requests().iter().any(|r| r.contains("watch=true")) {
        assert!(Instant::now() < deadline, "{:#?}", standin.requests());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        standin.unknown_params().is_empty(),
        "kube sent parameters the stand-in ignores: {:?}",
        standin.unknown_params()
    );
    source.stop().await;
}

#[tokio::test]
async fn api_source_refuses_other_node_pods_even_when_the_server_sends_them() {
    let dir = tempfile::tempdir().unwrap();
    let standin = StandIn::start(TOKEN, NODE).await;
    let (a1, _, b1) = standin_pods(&standin);
    standin.set_ignore_node_filter(true);
    let (index, source) = start_api(&standin, dir.path()).await;
    until(&index, "synced", SYNC, |i| i.status().ready()).await;
    assert!(index.lookup(&pod_uid(&a1), &container_id(&a1)).is_ok());
    assert_eq!(
        index.lookup(&pod_uid(&b1), &container_id(&b1)),
        Err(LookupError::OtherNode {
            pod_uid: pod_uid(&b1),
            node: "node-b".into()
        })
    );
    // And through the watch.
    let b2 = make_pod("agent-b2", "other", "node-b");
    standin.add_pod(b2.clone());
    let err = index
        .wait_for(&pod_uid(&b2), &container_id(&b2), Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(matches!(err, LookupError::OtherNode { .. }), "{err}");
    assert_eq!(index.len(), 2);
    source.stop().await;
}

#[tokio::test]
async fn api_watch_brings_added_modified_and_deleted_pods() {
    let dir = tempfile::tempdir().unwrap();
    let standin = StandIn::start(TOKEN, NODE).await;
    let (a1, _, _) = standin_pods(&standin);
    let (index, source) = start_api(&standin, dir.path()).await;
    until(&index, "synced", SYNC, |i| i.status().ready()).await;

    // A container that starts after its caller asks: wait_for is woken by the watch.
    let late = make_pod("agent-late", "agents", NODE);
    let (uid, cid) = (pod_uid(&late), container_id(&late));
    let waiter = {
        let index = index.clone();
        let (uid, cid) = (uid.clone(), cid.clone());
        tokio::spawn(async move { index.wait_for(&uid, &cid, Duration::from_secs(15)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    standin.add_pod(late.clone());
    let facts = waiter.await.unwrap().expect("the late pod resolves");
    assert_eq!(facts.pod_name, "agent-late");

    // Modified: new labels reach lookups.
    let mut relabelled = late.clone();
    relabelled
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("stage".into(), "canary".into());
    standin.update_pod(relabelled);
    until(&index, "label update", SYNC, |i| {
        i.lookup(&uid, &cid)
            .is_ok_and(|f| f.pod_labels.get("stage").is_some_and(|v| v == "canary"))
    })
    .await;

    // Namespace labels follow their own watch.
    standin.put_namespace("agents", &[("team", "research")]);
    until(&index, "namespace label update", SYNC, |i| {
        i.lookup(&uid, &cid).is_ok_and(|f| {
            f.namespace_labels
                .get("team")
                .is_some_and(|v| v == "research")
        })
    })
    .await;

    standin.delete_pod(&uid);
    until(&index, "deletion", SYNC, |i| {
        matches!(i.lookup(&uid, &cid), Err(LookupError::PodUnknown { .. }))
    })
    .await;
    assert!(index.lookup(&pod_uid(&a1), &container_id(&a1)).is_ok());
    assert_eq!(index.len(), 2);
    source.stop().await;
}

#[tokio::test]
async fn api_outage_keeps_known_pods_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let standin = StandIn::start(TOKEN, NODE).await;
    let (a1, _, _) = standin_pods(&standin);
    let (index, source) = start_api(&standin, dir.path()).await;
    let metrics = NodeMetrics::unregistered();
    index.attach_metrics(&metrics);
    until(&index, "synced", SYNC, |i| i.status().up()).await;
    assert_eq!(metrics.pod_source_up.get(), 1);
    assert_eq!(metrics.pod_index_pods.get(), 2);

    standin.set_down(true);
    until(&index, "outage noticed", RECOVERY, |i| !i.status().up()).await;
    let status = index.status();
    assert!(status.ready(), "known pods are still served");
    let summary = status.summary();
    eprintln!("{summary}");
    assert!(
        summary.starts_with("pod source api unreachable since ")
            && summary.ends_with(", serving 2 known pods"),
        "{summary}"
    );
    assert_eq!(metrics.pod_source_up.get(), 0);
    assert_eq!(metrics.pod_index_pods.get(), 2);
    assert!(index.lookup(&pod_uid(&a1), &container_id(&a1)).is_ok());

    standin.set_down(false);
    until(&index, "recovery", RECOVERY, |i| i.status().up()).await;
    assert_eq!(metrics.pod_source_up.get(), 1);
    let status = index.status();
    assert!(
        status.streams.iter().all(|s| s.last_error.is_some()),
        "the outage stays on record: {status:?}"
    );
    // Changes made after recovery arrive.
    let next = make_pod("agent-next", "agents", NODE);
    standin.add_pod(next.clone());
    index
        .wait_for(
            &pod_uid(&next),
            &container_id(&next),
            Duration::from_secs(15),
        )
        .await
        .unwrap();
    source.stop().await;
}

#[tokio::test]
async fn api_garbage_is_reported_and_the_index_kept() {
    let dir = tempfile::tempdir().unwrap();
    let standin = StandIn::start(TOKEN, NODE).await;
    let (a1, _, _) = standin_pods(&standin);
    let (index, source) = start_api(&standin, dir.path()).await;
    until(&index, "synced", SYNC, |i| i.status().up()).await;

    standin.set_garbage(true);
    until(&index, "garbage noticed", RECOVERY, |i| !i.status().up()).await;
    let summary = index.status().summary();
    eprintln!("{summary}");
    assert!(summary.contains("serving 2 known pods"), "{summary}");
    assert!(
        summary.to_lowercase().contains("deserializ") || summary.contains("expected"),
        "the status names the decoding failure: {summary}"
    );
    assert!(index.lookup(&pod_uid(&a1), &container_id(&a1)).is_ok());

    standin.set_garbage(false);
    until(&index, "recovery", RECOVERY, |i| i.status().up()).await;
    source.stop().await;
}

#[tokio::test]
async fn api_wrong_token_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let standin = StandIn::start(TOKEN, NODE).await;
    let (a1, _, _) = standin_pods(&standin);
    let c = api_config(&standin, dir.path());
    standin.set_token("another-token");
    let (index, source) = k8s::start(&c).await.unwrap();
    until(&index, "failure reported", SYNC, |i| {
        i.status().streams.iter().all(|s| s.last_error.is_some())
    })
    .await;
    let status = index.status();
    assert!(!status.ready());
    let summary = status.summary();
    eprintln!("{summary}");
    assert!(summary.contains("Unauthorized"), "{summary}");
    assert!(summary.contains("no full list yet"), "{summary}");
    assert_eq!(
        index.lookup(&pod_uid(&a1), &container_id(&a1)),
        Err(LookupError::NotSynced("pod"))
    );
    source.stop().await;
}

#[tokio::test]
async fn api_server_certificate_is_verified() {
    let dir = tempfile::tempdir().unwrap();
    let standin = StandIn::start(TOKEN, NODE).await;
    standin_pods(&standin);
    let stranger = StandIn::start(TOKEN, NODE).await;
    let (_, token) = standin.write_files(dir.path());
    let wrong_ca = dir.path().join("stranger-ca.pem");
    std::fs::write(&wrong_ca, &stranger.ca_pem).unwrap();
    let mut c = config(PodSource::Api);
    c.api = ApiConfig {
        url: Some(standin.url.clone()),
        ca_file: Some(wrong_ca),
        token_file: Some(token),
    };
    let (index, source) = k8s::start(&c).await.unwrap();
    until(&index, "failure reported", SYNC, |i| {
        i.status().streams.iter().all(|s| s.last_error.is_some())
    })
    .await;
    let summary = index.status().summary();
    eprintln!("{summary}");
    assert!(summary.to_lowercase().contains("certificate"), "{summary}");
    assert!(!index.status().ready());
    source.stop().await;
}

#[tokio::test]
async fn kubelet_source_polls_this_nodes_pods() {
    let dir = tempfile::tempdir().unwrap();
    let standin = StandIn::start(TOKEN, NODE).await;
    let (a1, a2, b1) = standin_pods(&standin);
    // A kubelet lists only its own pods; this one lists all, and the source must filter.
    standin.set_ignore_node_filter(true);
    let c = kubelet_config(&standin, dir.path(), Duration::from_millis(200));
    let (index, source) = k8s::start(&c).await.unwrap();
    until(&index, "synced", SYNC, |i| {
        i.status().ready() && i.status().up()
    })
    .await;

    let facts = index.lookup(&pod_uid(&a1), &container_id(&a1)).unwrap();
    assert_eq!(facts.pod_name, "agent-1");
    assert_eq!(facts.image_digest, Some(image_digest(&a1)));
    assert!(
        facts.namespace_labels.is_empty(),
        "the kubelet knows no namespace labels"
    );
    assert!(index.lookup(&pod_uid(&a2), &container_id(&a2)).is_ok());
    assert!(matches!(
        index.lookup(&pod_uid(&b1), &container_id(&b1)),
        Err(LookupError::OtherNode { .. })
    ));
    assert_eq!(index.len(), 2);
    assert_eq!(
        index.status().summary(),
        "pod source kubelet up, 2 pods indexed"
    );

    // Deleted pods disappear at the next poll.
    standin.delete_pod(&pod_uid(&a2));
    until(&index, "deletion", SYNC, |i| {
        matches!(
            i.lookup(&pod_uid(&a2), &container_id(&a2)),
            Err(LookupError::PodUnknown { .. })
        )
    })
    .await;
    assert!(standin.requests().iter().all(|r| r == "GET /pods"));
    source.stop().await;
}

#[tokio::test]
async fn kubelet_miss_triggers_an_early_poll() {
    let dir = tempfile::tempdir().unwrap();
    let standin = StandIn::start(TOKEN, NODE).await;
    standin_pods(&standin);
    // Far longer than the wait: only an early poll can find the new pod in time.
    let c = kubelet_config(&standin, dir.path(), Duration::from_secs(300));
    let (index, source) = k8s::start(&c).await.unwrap();
    until(&index, "synced", SYNC, |i| i.status().ready()).await;
    let polls_before = standin.requests().len();

    let late = make_pod("agent-late", "agents", NODE);
    standin.add_pod(late.clone());
    let facts = index
        .wait_for(
            &pod_uid(&late),
            &container_id(&late),
            Duration::from_secs(10),
        )
        .await
        .expect("an early poll finds the new pod");
    assert_eq!(facts.pod_name, "agent-late");
    let polls = standin.requests().len() - polls_before;
    assert!((1..=3).contains(&polls), "{polls} early polls");

    // A pod that never appears: early polls are rate-limited, and the wait ends with the error.
    let start = Instant::now();
    let err = index
        .wait_for("no-such-pod", &"0".repeat(64), Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(matches!(err, LookupError::PodUnknown { .. }), "{err}");
    assert!(start.elapsed() >= Duration::from_secs(2));
    let polls = standin.requests().len() - polls_before;
    assert!(
        polls <= 2 + 2000 / 500 + 1,
        "{polls} polls: not rate-limited"
    );
    source.stop().await;
}

#[tokio::test]
async fn kubelet_wrong_token_reports_401() {
    let dir = tempfile::tempdir().unwrap();
    let standin = StandIn::start(TOKEN, NODE).await;
    let (a1, _, _) = standin_pods(&standin);
    let c = kubelet_config(&standin, dir.path(), Duration::from_millis(200));
    let (index, source) = k8s::start(&c).await.unwrap();
    until(&index, "synced", SYNC, |i| i.status().up()).await;

    // The server rotates the token; until the file follows, every poll is refused.
    standin.set_token("token-2");
    until(&index, "401 noticed", SYNC, |i| !i.status().up()).await;
    let summary = index.status().summary();
    eprintln!("{summary}");
    assert!(
        summary.contains("HTTP 401 Unauthorized: the kubelet refused the token from")
            && summary.contains(&c.kubelet.token_file.display().to_string())
            && summary.ends_with("serving 2 known pods"),
        "{summary}"
    );
    assert!(index.lookup(&pod_uid(&a1), &container_id(&a1)).is_ok());

    // The token file is read on every poll.
    std::fs::write(&c.kubelet.token_file, "token-2\n").unwrap();
    until(&index, "recovery", SYNC, |i| i.status().up()).await;
    source.stop().await;
}

#[tokio::test]
async fn kubelet_outage_and_garbage_keep_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let standin = StandIn::start(TOKEN, NODE).await;
    let (a1, _, _) = standin_pods(&standin);
    let c = kubelet_config(&standin, dir.path(), Duration::from_millis(200));
    let (index, source) = k8s::start(&c).await.unwrap();
    until(&index, "synced", SYNC, |i| i.status().up()).await;

    standin.set_down(true);
    until(&index, "outage noticed", SYNC, |i| !i.status().up()).await;
    let summary = index.status().summary();
    eprintln!("{summary}");
    assert!(
        summary.starts_with("pod source kubelet unreachable since ")
            && summary.ends_with(", serving 2 known pods"),
        "{summary}"
    );
    assert!(index.lookup(&pod_uid(&a1), &container_id(&a1)).is_ok());
    standin.set_down(false);
    until(&index, "recovery", SYNC, |i| i.status().up()).await;

    standin.set_garbage(true);
    until(&index, "garbage noticed", SYNC, |i| !i.status().up()).await;
    let summary = index.status().summary();
    eprintln!("{summary}");
    assert!(summary.contains("the answer is not a PodList"), "{summary}");
    assert!(index.lookup(&pod_uid(&a1), &container_id(&a1)).is_ok());
    standin.set_garbage(false);
    until(&index, "recovery", SYNC, |i| i.status().up()).await;
    source.stop().await;
}

#[tokio::test]
async fn start_refuses_a_bad_config() {
    let mut c = config(PodSource::Kubelet);
    c.kubelet.ca_file = None;
    let err = k8s::start(&c).await.err().expect("refused");
    assert!(matches!(err, StartError::Config(_)), "{err}");

    let mut c = config(PodSource::Api);
    c.api.url = Some("https://127.0.0.1:1".into());
    c.api.ca_file = Some("/nonexistent/ca.pem".into());
    let err = k8s::start(&c).await.err().expect("refused");
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
}
