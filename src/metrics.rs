//! Prometheus metrics. Each subsystem owns a metrics struct registered into one registry.

use std::sync::{Arc, OnceLock};

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
    /// Handles into `requests` and `latency` for the fetch methods' successful calls.
    hot: Arc<HotCalls>,
}

/// Methods whose successful calls are counted through kept handles.
const HOT_METHODS: [&str; 2] = ["FetchX509SVID", "FetchJWTSVID"];

/// The OK counter and latency histogram of each of [`HOT_METHODS`], looked up in their
/// families on first use (so the series appear when they did before) and kept: a lookup
/// takes the family's lock and hashes the labels, on every call.
#[derive(Default)]
struct HotCalls([OnceLock<(Counter, Histogram)>; HOT_METHODS.len()]);

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
            hot: Arc::default(),
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

    /// Counts one finished Workload API call under `code` and records how long it took.
    pub fn record_call(&self, method: &'static str, code: &'static str, seconds: f64) {
        let hot = (code == "OK")
            .then(|| HOT_METHODS.iter().position(|m| *m == method))
            .flatten();
        if let Some(i) = hot {
            let (calls, latency) = self.hot.0[i].get_or_init(|| {
                (
                    self.requests
                        .get_or_create(&RpcLabels { method, code })
                        .clone(),
                    self.latency.get_or_create(&MethodLabels { method }).clone(),
                )
            });
            calls.inc();
            latency.observe(seconds);
            return;
        }
        self.requests
            .get_or_create(&RpcLabels { method, code })
            .inc();
        self.latency
            .get_or_create(&MethodLabels { method })
            .observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_alike_through_kept_handles_and_lookups() {
        let mut registry = Registry::default();
        let m = NodeMetrics::register(&mut registry);
        let text = |registry: &Registry| {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
            out
        };
        let ok = r#"agentid_node_workload_api_requests_total{method="FetchJWTSVID",code="OK"}"#;
        assert!(
            !text(&registry).contains(ok),
            "no series before the first call"
        );
        m.record_call("FetchJWTSVID", "OK", 0.001);
        m.clone().record_call("FetchJWTSVID", "OK", 0.001);
        m.record_call("FetchJWTSVID", "UNAVAILABLE", 0.001);
        m.record_call("ValidateJWTSVID", "OK", 0.001);
        let out = text(&registry);
        for line in [
            format!("{ok} 2"),
            r#"agentid_node_workload_api_requests_total{method="FetchJWTSVID",code="UNAVAILABLE"} 1"#.into(),
            r#"agentid_node_workload_api_requests_total{method="ValidateJWTSVID",code="OK"} 1"#.into(),
            r#"agentid_node_workload_api_latency_seconds_count{method="FetchJWTSVID"} 3"#.into(),
        ] {
            assert!(out.lines().any(|l| l == line), "{line} in\n{out}");
        }
    }
}
