//! Pod index lookup cost against index size, for `agentid bench`: fills an index with synthetic pods and
//! measures `lookup` latency. Not asserted anywhere; timings belong in a benchmark report.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, ContainerStatus, Namespace, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use super::stats::percentile;
use crate::k8s::{PodIndex, PodSource};

/// Lookup latency over an index of `pods` pods.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LookupBench {
    /// Pods in the index.
    pub pods: usize,
    /// Lookups timed.
    pub lookups: usize,
    /// Median lookup latency, nanoseconds.
    pub p50_ns: u128,
    /// 99th-percentile lookup latency, nanoseconds.
    pub p99_ns: u128,
    /// `PodIndex::approx_bytes_per_pod` of the filled index.
    pub approx_bytes_per_pod: usize,
}

/// Fills an index with `pods` synthetic pods (3 containers each, realistic labels and
/// annotations) and times `lookups` lookups of random indexed containers.
pub fn lookup_latency(pods: usize, lookups: usize) -> LookupBench {
    let index = filled_index(pods);
    let mut rng = fastrand::Rng::with_seed(7);
    let mut samples = Vec::with_capacity(lookups);
    for _ in 0..lookups {
        let n = rng.usize(..pods.max(1));
        let (uid, cid) = (pod_uid(n), container_id(n, rng.usize(..3)));
        let t = Instant::now();
        let found = index.lookup(&uid, &cid);
        samples.push(t.elapsed());
        debug_assert!(found.is_ok() || pods == 0);
    }
    samples.sort_unstable();
    let ns = |d: Duration| d.as_nanos();
    LookupBench {
        pods,
        lookups,
        p50_ns: ns(percentile(&samples, 0.50)),
        p99_ns: ns(percentile(&samples, 0.99)),
        approx_bytes_per_pod: index.approx_bytes_per_pod(),
    }
}

/// The node the synthetic pods run on.
pub const BENCH_NODE: &str = "bench-node";

/// An index holding `pods` synthetic pods (3 containers each) on [`BENCH_NODE`]. Pod `n` has
/// UID [`pod_uid`]`(n)` and containers [`container_id`]`(n, 0..3)`.
pub fn filled_index(pods: usize) -> PodIndex {
    let node = BENCH_NODE;
    let index = PodIndex::new("bench", node, PodSource::Api);
    index.replace_namespaces([Namespace {
        metadata: ObjectMeta {
            name: Some("agents".into()),
            labels: Some([("team".to_owned(), "ml".to_owned())].into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }]);
    index.replace_pods((0..pods).map(|n| synthetic_pod(n, node)));
    index
}

/// The UID of synthetic pod `n`.
pub fn pod_uid(n: usize) -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", n as u32, n as u64)
}

/// The ID of container `c` (0..3) of synthetic pod `n`: 64 hex digits, as in a cgroup path.
pub fn container_id(n: usize, c: usize) -> String {
    format!("{:016x}{:048x}", n as u64, c as u64)
}

/// A pod as a typical agent deployment has it: three containers, a handful of labels.
fn synthetic_pod(n: usize, node: &str) -> Pod {
    let names = ["agent", "sidecar", "proxy"];
    let digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    let labels = [
        ("app.kubernetes.io/name", "agent".to_owned()),
        ("app.kubernetes.io/instance", format!("agent-{n}")),
        ("pod-template-hash", format!("{:010x}", n)),
        ("agentid.dev/model", "model-a".to_owned()),
    ];
    Pod {
        metadata: ObjectMeta {
            uid: Some(pod_uid(n)),
            name: Some(format!("agent-{n}-7d9f8c6b5d-x2x4z")),
            namespace: Some("agents".into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.clone()))
                    .collect(),
            ),
            annotations: Some(
                [(
                    "agentid.dev/config".to_owned(),
                    "sha256:0123456789abcdef".to_owned(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            service_account_name: Some("agent".into()),
            containers: names
                .iter()
                .map(|name| Container {
                    name: (*name).into(),
                    image: Some(format!("registry.example/{name}:1.0")),
                    ..Container::default()
                })
                .collect(),
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            container_statuses: Some(
                names
                    .iter()
                    .enumerate()
                    .map(|(c, name)| ContainerStatus {
                        name: (*name).into(),
                        container_id: Some(format!("containerd://{}", container_id(n, c))),
                        image: format!("registry.example/{name}:1.0"),
                        image_id: format!("registry.example/{name}@sha256:{digest}"),
                        ..ContainerStatus::default()
                    })
                    .collect(),
            ),
            ..PodStatus::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_resolves_every_lookup() {
        let r = lookup_latency(200, 1000);
        assert_eq!((r.pods, r.lookups), (200, 1000));
        assert!(r.approx_bytes_per_pod > 500, "{r:?}");
        let index = PodIndex::new("bench", "bench-node", PodSource::Kubelet);
        index.replace_pods((0..3).map(|n| synthetic_pod(n, "bench-node")));
        assert!(index.lookup(&pod_uid(2), &container_id(2, 1)).is_ok());
    }
}
