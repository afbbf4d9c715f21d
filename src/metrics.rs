//! Prometheus metrics. Each subsystem owns a metrics struct registered into one registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels naming a Workload API method and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: &'static str,
    pub code: &'static str,
}

/// Labels naming a method only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: &'static str,
}

/// Labels naming a credential kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// Labels naming an identity.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdLabels {
    pub spiffe_id: String,
}

/// Metrics of the node daemon.
#[derive(Clone)]
pub struct NodeMetrics {
    /// Workload API calls by method and gRPC code.
    pub requests: Family<RpcLabels, Counter>,
    /// Latency of unary calls and of the first message of streams.
    pub latency: Family<MethodLabels, Histogram>,
    /// Credentials signed, by kind (x509-svid, jwt-svid).
    pub issuances: Family<KindLabels, Counter>,
    /// Renewals that failed (the previous credential stays in use while valid).
    pub renewal_failures: Counter,
    /// Callers refused, by method.
    pub denials: Family<MethodLabels, Counter>,
    /// Open Workload API streams.
    pub open_streams: Gauge,
    /// Expiry (Unix seconds) of each cached X509-SVID.
    pub svid_expiry: Family<IdLabels, Gauge>,
    /// Policy reloads that failed (the previous policies stay in force).
    pub policy_reload_failures: Counter,
    /// Open streams whose composite identity changed under them (config drift).
    pub composite_drifts: Counter,
    /// Pods in the node's pod index.
    pub pod_index_pods: Gauge,
    /// 1 while every stream of the pod source answers, else 0 (known pods still resolve).
    pub pod_source_up: Gauge,
}

impl NodeMetrics {
    /// Creates the metrics and registers them under `agentid_node_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
            }),
            issuances: Family::default(),
            renewal_failures: Counter::default(),
            denials: Family::default(),
            open_streams: Gauge::default(),
            svid_expiry: Family::default(),
            policy_reload_failures: Counter::default(),
            composite_drifts: Counter::default(),
            pod_index_pods: Gauge::default(),
            pod_source_up: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("agentid_node");
        r.register(
            "workload_api_requests",
            "Workload API calls by method and gRPC code",
            m.requests.clone(),
        );
        r.register(
            "workload_api_latency_seconds",
            "Unary call latency and time to first stream message",
            m.latency.clone(),
        );
        r.register(
            "issuances",
            "Credentials signed, by kind",
            m.issuances.clone(),
        );
        r.register(
            "renewal_failures",
            "SVID renewals that failed",
            m.renewal_failures.clone(),
        );
        r.register(
            "denials",
            "Callers refused an identity, by method",
            m.denials.clone(),
        );
        r.register(
            "open_streams",
            "Open Workload API streams",
            m.open_streams.clone(),
        );
        r.register(
            "svid_expiry_timestamp_seconds",
            "Expiry of each cached X509-SVID",
            m.svid_expiry.clone(),
        );
        r.register(
            "composite_drifts",
            "Composite identities that changed under an open stream",
            m.composite_drifts.clone(),
        );
        r.register(
            "policy_reload_failures",
            "Policy reloads refused",
            m.policy_reload_failures.clone(),
        );
        r.register(
            "pod_index_pods",
            "Pods in the node's pod index",
            m.pod_index_pods.clone(),
        );
        r.register(
            "pod_source_up",
            "Whether the pod source (API server or kubelet) answers (1) or not (0)",
            m.pod_source_up.clone(),
        );
        m
    }

    /// Metrics registered nowhere, for tests and embedding.
    pub fn unregistered() -> Self {
        Self::register(&mut Registry::default())
    }
}
