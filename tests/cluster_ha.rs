//! Two `agentid server` replicas on one `--store kubernetes` (the stand-in API server), as real
//! processes: the Lease holder alone rotates keys; killed mid-rotation, the other takes over
//! and finishes the rotation, each step performed exactly once; a node daemon given both
//! replicas fails over and its workloads keep getting updates.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::{self, KubeApi};
use common::k8s::StandIn;
use common::{Daemon, my_uid};
use serde_json::Value;

const TD: &str = "agentid.local";
const NS: &str = "agentid";

/// CA and JWT key of 20 s (each signs about 10 s), announced 6 s ahead; a 3 s Lease.
fn flags(policy: &Path) -> Vec<String> {
    [
        "--ca-ttl=20s",
        "--jwt-key-ttl=20s",
        "--rotation-prepare-ahead=6s",
        "--bundle-refresh-hint=2s",
        "--lease-duration=3s",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(["--policy".to_owned(), policy.display().to_string()])
    .collect()
}

fn policy(path: &str) -> String {
    common::policy_doc("agent", path, my_uid(), "")
}

fn holder(standin: &StandIn) -> Option<String> {
    standin.get_object("leases", NS, "agentid-server")?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

async fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Key events in an audit log: (reason, fingerprint).
fn key_events(dir: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(dir.join("audit.log")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.to_string().contains("bundle_updated"))
        .map(|v| {
            (
                find(&v, "reason").unwrap_or_default(),
                find(&v, "fingerprint").unwrap_or_default(),
            )
        })
        .collect()
}

/// The first string value under `key` anywhere in `v`.
fn find(v: &Value, key: &str) -> Option<String> {
    match v {
        Value::Object(m) => m
            .get(key)
            .and_then(|x| x.as_str().map(str::to_owned))
            .or_else(|| m.values().find_map(|x| find(x, key))),
        Value::Array(a) => a.iter().find_map(|x| find(x, key)),
        _ => None,
    }
}

async fn standin(dir: &Path) -> (StandIn, KubeApi) {
    cluster::kube_standin(dir, "ha-token").await
}

/// A server's Prometheus metrics.
fn metrics_of(d: &Daemon) -> String {
    let addr = cluster::banner_field(d, "http");
    let addr = addr.trim_start_matches("http://").trim_end_matches('/');
    common::http_get(addr, "/metrics").1
}

fn start(dir: &Path, api: &KubeApi, replica: &str, policy: &Path) -> Daemon {
    cluster::launch_kube_server(dir, api, replica, "127.0.0.1:0", &flags(policy))
        .unwrap_or_else(|e| panic!("{replica}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_holder_rotates_and_a_survivor_takes_over_mid_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let (standin, api) = standin(tmp.path()).await;
    let policy_path = tmp.path().join("agents.yaml");
    std::fs::write(&policy_path, policy("/agent/before")).unwrap();

    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    let mut a = start(&dir_a, &api, "replica-a", &policy_path);
    wait_for(Duration::from_secs(10), "replica-a leads", || {
        holder(&standin).as_deref() == Some("replica-a")
    })
    .await;
    let b = start(&dir_b, &api, "replica-b", &policy_path);
    let url_a = format!("https://{}", cluster::banner_field(&a, "node API"));
    let url_b = format!("https://{}", cluster::banner_field(&b, "node API"));

    // A node daemon that knows both replicas, joined through a token made on b.
    let bundle = cluster::export_bundle(&b.socket, &tmp.path().join("bundle.json"));
    let node = cluster::launch_node(
        &tmp.path().join("node"),
        &format!("{url_a},{url_b}"),
        &bundle,
        "host-1",
        &[
            "--join-token".to_owned(),
            cluster::join_token(&b.socket, &[]),
        ],
    )
    .unwrap_or_else(|e| panic!("node: {e}"));
    let client = spiffe::WorkloadApiClient::connect_to(node.endpoint())
        .await
        .unwrap();
    let mut stream = client.stream_x509_svids().await.unwrap();
    assert_eq!(
        cluster::next_id(&mut stream, Duration::from_secs(5))
            .await
            .as_deref(),
        Some(format!("spiffe://{TD}/agent/before").as_str())
    );

    // Mid-rotation: the holder has announced the next CA, which has not started signing.
    wait_for(
        Duration::from_secs(15),
        "replica-a prepares the next CA",
        || {
            key_events(&dir_a)
                .iter()
                .any(|(r, _)| r.starts_with("prepared next CA"))
        },
    )
    .await;
    assert!(
        key_events(&dir_b).is_empty(),
        "only the Lease holder rotates: {:?}",
        key_events(&dir_b)
    );
    let prepared = key_events(&dir_a)
        .into_iter()
        .find(|(r, _)| r.starts_with("prepared next CA"))
        .unwrap()
        .1;
    a.signal(libc::SIGKILL);
    let killed = Instant::now();
    a.stop();

    // b takes the Lease once a's record has been still for the lease duration.
    wait_for(Duration::from_secs(10), "replica-b takes over", || {
        holder(&standin).as_deref() == Some("replica-b")
    })
    .await;
    let takeover = killed.elapsed();
    eprintln!("lease taken over {takeover:?} after the holder was killed (lease 3 s)");
    assert!(
        takeover >= Duration::from_secs(2),
        "not before a's record was still for the lease duration: {takeover:?}"
    );
    // ... and activates the CA a announced: the rotation finishes once.
    wait_for(
        Duration::from_secs(15),
        "replica-b activates the CA",
        || {
            key_events(&dir_b)
                .iter()
                .any(|(r, f)| r.starts_with("activated CA") && *f == prepared)
        },
    )
    .await;
    let mut activations: BTreeMap<String, usize> = BTreeMap::new();
    let mut preparations: BTreeMap<String, usize> = BTreeMap::new();
    for (reason, fp) in key_events(&dir_a).into_iter().chain(key_events(&dir_b)) {
        if reason.starts_with("activated") {
            *activations.entry(fp.clone()).or_default() += 1;
        }
        if reason.starts_with("prepared") {
            *preparations.entry(fp).or_default() += 1;
        }
    }
    assert!(
        activations.values().all(|n| *n == 1) && preparations.values().all(|n| *n == 1),
        "each step once: activations {activations:?}, preparations {preparations:?}"
    );

    // The node failed over to b: a policy change (b reloads the file) reaches the stream.
    std::fs::write(policy_path.with_extension("tmp"), policy("/agent/after")).unwrap();
    std::fs::rename(policy_path.with_extension("tmp"), &policy_path).unwrap();
    cluster::wait_for_id(
        &mut stream,
        &format!("spiffe://{TD}/agent/after"),
        Duration::from_secs(30),
        "the node reached replica-b and the change reached the stream",
    )
    .await;
    let (_, metrics) = common::http_get(&node.admin, "/metrics");
    assert!(metrics.contains("agentid_node_server_up 1"), "{metrics}");
    assert!(metrics_of(&b).contains("agentid_server_leader 1"));
}

/// When no replica can write the Lease, the holder steps down within the lease duration and
/// nobody rotates, though steps fall due; when writes come back, one replica leads and the
/// schedule resumes, each step once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_cannot_renew_stops_rotating() {
    let tmp = tempfile::tempdir().unwrap();
    let (standin, api) = standin(tmp.path()).await;
    let policy_path = tmp.path().join("agents.yaml");
    std::fs::write(&policy_path, policy("/agent/x")).unwrap();
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    let a = start(&dir_a, &api, "replica-a", &policy_path);
    wait_for(Duration::from_secs(10), "replica-a leads", || {
        holder(&standin).is_some()
    })
    .await;
    let b = start(&dir_b, &api, "replica-b", &policy_path);

    standin.fail_writes("leases", "agentid-server", Some(500));
    let cut = Instant::now();
    // 2/3 of the 3 s lease after its last confirmed renewal, a steps down.
    wait_for(Duration::from_secs(5), "replica-a steps down", || {
        metrics_of(&a).contains("agentid_server_leader 0")
    })
    .await;
    let stepped_down = cut.elapsed();
    let events_then = key_events(&dir_a).len() + key_events(&dir_b).len();
    // The CA's next key falls due about 4 s after start, activation about 10 s: wait past
    // the first without a leader.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(metrics_of(&b).contains("agentid_server_leader 0"));
    assert_eq!(
        key_events(&dir_a).len() + key_events(&dir_b).len(),
        events_then,
        "nobody rotates without the Lease"
    );

    standin.fail_writes("leases", "agentid-server", None);
    wait_for(Duration::from_secs(10), "someone leads again", || {
        metrics_of(&a).contains("agentid_server_leader 1")
            || metrics_of(&b).contains("agentid_server_leader 1")
    })
    .await;
    wait_for(Duration::from_secs(15), "the schedule resumes", || {
        key_events(&dir_a)
            .iter()
            .chain(key_events(&dir_b).iter())
            .any(|(r, _)| r.starts_with("prepared next CA"))
    })
    .await;
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (reason, fp) in key_events(&dir_a).into_iter().chain(key_events(&dir_b)) {
        let step = reason.split_whitespace().next().unwrap_or("").to_owned();
        *seen.entry((step, fp)).or_default() += 1;
    }
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    eprintln!("holder stepped down {stepped_down:?} after renewals began to fail");
}
