//! The server's own view of its Kubernetes cluster: every pod and namespace, watched through
//! the API server into a cluster-wide pod index, and node attestation by service-account
//! token. What a Kubernetes node daemon says about a caller's pod is checked against this view,
//! never taken on its word.
//!
//! RBAC: `list` and `watch` on `pods` and `namespaces` (all namespaces), `get` on `pods`,
//! `create` on `tokenreviews`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::node_auth::{AttestedNode, NodeAuthError, NodeAuthenticator, ServiceAccountRef};
use crate::admin::ReadinessCheck;
use crate::k8s::{self, ApiConfig, ApiConfigError, K8sStatus, LookupError, PodIndex};
use crate::policy::K8sFacts;

/// Default audience of node daemons' tokens (the chart's `server.nodeTokenAudience`).
pub const DEFAULT_NODE_TOKEN_AUDIENCE: &str = "agentid-server";
/// Default node daemon service account: the chart's, for a release `agentid` in namespace
/// `agentid`.
pub const DEFAULT_NODE_SERVICE_ACCOUNT: &str = "agentid/agentid-node";

/// The server's Kubernetes settings (`--cluster-name` turns them on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterConfig {
    /// The cluster's name: node SVIDs are `spiffe://<td>/agentid/node/<cluster>/<node>`, and
    /// policies and composite identities state it.
    pub cluster_name: String,
    /// The audience node daemons' tokens must carry.
    pub node_token_audience: String,
    /// The node daemons' service account.
    pub node_service_account: ServiceAccountRef,
    /// How to reach the API server.
    pub api: ApiConfig,
    /// How long a pod the view does not know yet is waited for.
    #[serde(with = "humantime_serde")]
    pub pod_wait: Duration,
}

/// What is wrong with a `ClusterConfig`; each names the flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterConfigError {
    #[error(
        "--cluster-name {0:?} must be one SPIFFE ID path segment (letters, digits, '.', '-', '_')"
    )]
    ClusterName(String),
    #[error("--node-token-audience must not be empty")]
    NoAudience,
    #[error("--pod-wait {0:?} is outside 0s..=60s")]
    PodWait(Duration),
    #[error("{}", api_flags(.0))]
    Api(#[from] ApiConfigError),
}

/// An API settings mistake in the words of the server's flags.
fn api_flags(e: &ApiConfigError) -> String {
    let flag = |key: &str| format!("--kube-{}", key.replace('_', "-"));
    match e {
        ApiConfigError::WithoutUrl(key) => {
            format!("{} is only used together with --kube-api-url", flag(key))
        }
        ApiConfigError::NoCa => "--kube-ca-file is required for an https --kube-api-url".into(),
        ApiConfigError::Url { url, reason } => format!("--kube-api-url {url:?}: {reason}"),
    }
}

impl ClusterConfig {
    /// Defaults for everything but the cluster's name.
    pub fn new(cluster_name: impl Into<String>) -> Self {
        Self {
            cluster_name: cluster_name.into(),
            node_token_audience: DEFAULT_NODE_TOKEN_AUDIENCE.to_owned(),
            node_service_account: DEFAULT_NODE_SERVICE_ACCOUNT
                .parse()
                .expect("literal service account"),
            api: ApiConfig::default(),
            pod_wait: Duration::from_secs(3),
        }
    }

    /// Checks every key.
    pub fn validate(&self) -> Result<(), ClusterConfigError> {
        let c = &self.cluster_name;
        let segment = !c.is_empty()
            && c != "."
            && c != ".."
            && c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if !segment {
            return Err(ClusterConfigError::ClusterName(c.clone()));
        }
        if self.node_token_audience.trim().is_empty() {
            return Err(ClusterConfigError::NoAudience);
        }
        if self.pod_wait > Duration::from_secs(60) {
            return Err(ClusterConfigError::PodWait(self.pod_wait));
        }
        Ok(self.api.validate()?)
    }
}

/// Why the cluster view could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Config(#[from] ClusterConfigError),
    #[error(transparent)]
    Api(#[from] k8s::ApiError),
}

/// Why a pod a node reported was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodCheckError {
    /// The view cannot say: the API server is unreachable (or not listed yet) and the pod is
    /// not known.
    #[error("cannot verify pod {pod_uid}: {why}")]
    Unavailable { pod_uid: String, why: String },
    #[error("pod {0} does not exist in the cluster")]
    Unknown(String),
    #[error(transparent)]
    Refused(LookupError),
}

/// The running view; stops watching when dropped.
pub struct Cluster {
    config: ClusterConfig,
    index: PodIndex,
    nodes: NodeAuthenticator,
    cancel: CancellationToken,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Cluster {
    /// Validates `config`, builds the API client and starts watching pods and namespaces.
    /// The view starts empty; `status` tells when the first lists are in.
    pub async fn start(config: ClusterConfig) -> Result<Self, ClusterError> {
        config.validate()?;
        let client = k8s::api::client(&config.api).await?;
        let index = PodIndex::cluster_wide(&config.cluster_name);
        let cancel = CancellationToken::new();
        tokio::spawn(k8s::api::run(client.clone(), index.clone(), cancel.clone()));
        tracing::info!(cluster = %config.cluster_name, "watching the cluster's pods and namespaces");
        let nodes = NodeAuthenticator::new(
            client,
            config.node_token_audience.clone(),
            config.node_service_account.clone(),
        );
        Ok(Self {
            config,
            index,
            nodes,
            cancel,
        })
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.config.cluster_name
    }

    /// The settings it runs with.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// How the watch is doing.
    pub fn status(&self) -> K8sStatus {
        self.index.status()
    }

    /// `/readyz`: not ready until the first lists are in (no pod can be verified before);
    /// once listed, an unreachable API server is reported but keeps the server ready, since
    /// known pods and hosts are still served.
    pub fn readiness_check(&self) -> ReadinessCheck {
        let index = self.index.clone();
        Arc::new(move || {
            let status = index.status();
            let line = status.summary().replacen("pod source api", "pod view", 1);
            if status.synced() { Ok(line) } else { Err(line) }
        })
    }

    /// Exports the view's size and health through `pods` and `up`.
    pub fn attach_gauges(&self, pods: Gauge, up: Gauge) {
        self.index.attach_gauges(pods, up);
    }

    /// Checks a node daemon's service-account token; the node's name comes from its pod.
    pub async fn attest_node(&self, token: &str) -> Result<AttestedNode, NodeAuthError> {
        self.nodes.attest(token).await
    }

    /// The facts of container `container_id` of pod `pod_uid`, which must run on `node`, from
    /// the server's own view. A pod not known yet is waited for (`pod_wait`), unless the API
    /// server is unreachable: then the answer is that it cannot be verified.
    pub async fn verify_pod(
        &self,
        node: &str,
        pod_uid: &str,
        container_id: &str,
    ) -> Result<K8sFacts, PodCheckError> {
        let refused = |e: LookupError| match e {
            LookupError::PodUnknown { pod_uid } => PodCheckError::Unknown(pod_uid),
            other => PodCheckError::Refused(other),
        };
        let first = match self.index.lookup_on(node, pod_uid, container_id) {
            Ok(facts) => return Ok(facts),
            Err(e) if !e.may_resolve_later() => return Err(refused(e)),
            Err(e) => e,
        };
        // Waiting on a watch that is down would only delay the same answer.
        if let Some(why) = self.unverifiable() {
            tracing::debug!(pod_uid, error = %first, "pod not in the view and the view is down");
            return Err(PodCheckError::Unavailable {
                pod_uid: pod_uid.to_owned(),
                why,
            });
        }
        match self
            .index
            .wait_for_on(node, pod_uid, container_id, self.config.pod_wait)
            .await
        {
            Ok(facts) => Ok(facts),
            Err(e) if e.may_resolve_later() => match self.unverifiable() {
                Some(why) => Err(PodCheckError::Unavailable {
                    pod_uid: pod_uid.to_owned(),
                    why,
                }),
                None => Err(refused(e)),
            },
            Err(e) => Err(refused(e)),
        }
    }

    /// Why the view cannot vouch for a pod's absence: not listed yet, or the API server down.
    fn unverifiable(&self) -> Option<String> {
        let status = self.index.status();
        if status.up() && status.synced() {
            return None;
        }
        let down: Vec<_> = status.streams.iter().filter(|s| !s.up).collect();
        let since = down.iter().filter_map(|s| s.down_since).min();
        let error = down
            .iter()
            .find_map(|s| s.last_error.as_ref())
            .map(|e| format!(" ({})", e.message))
            .unwrap_or_default();
        Some(match since {
            Some(t) => format!("the API server is unreachable since {}{error}", rfc3339(t)),
            None if !status.synced() => {
                "the server's view of the cluster has not completed its first list yet".to_owned()
            }
            None => format!("the API server has not answered yet{error}"),
        })
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_mistakes() {
        let c = ClusterConfig::new("prod");
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.node_service_account.to_string(), "agentid/agentid-node");
        assert_eq!(c.node_token_audience, "agentid-server");
        type Edit = fn(&mut ClusterConfig);
        let cases: Vec<(Edit, &str)> = vec![
            (|c| c.cluster_name = "a/b".into(), "--cluster-name"),
            (|c| c.cluster_name = "..".into(), "--cluster-name"),
            (|c| c.cluster_name.clear(), "--cluster-name"),
            (
                |c| c.node_token_audience = " ".into(),
                "--node-token-audience",
            ),
            (|c| c.pod_wait = Duration::from_secs(61), "--pod-wait"),
            (
                |c| c.api.url = Some("https://10.0.0.1:6443".into()),
                "--kube-ca-file is required",
            ),
            (
                |c| c.api.token_file = Some("/t".into()),
                "--kube-token-file is only used together with --kube-api-url",
            ),
            (
                |c| c.api.url = Some("ftp://x".into()),
                "--kube-api-url \"ftp://x\"",
            ),
        ];
        for (edit, want) in cases {
            let mut c = ClusterConfig::new("prod");
            edit(&mut c);
            let err = c.validate().expect_err(want).to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
    }
}
