//! The node daemon's serving half, shared by `agentid up` (in-process authority) and
//! `agentid node` (remote server): attestation, the SVID cache, composite identities and
//! drift, the Workload and Delegation APIs on the socket.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::attest::k8s::K8sAttestor;
use super::attest::{UnixAttestor, WorkloadAttestor};
use super::cache::SvidCache;
use super::composite::Composer;
use super::delegation::DelegationApi;
use super::drift::DriftWatch;
use super::issuer::SvidIssuer;
use super::k8s::{self as pods, K8sConfig, PodIndex, SourceHandle};
use super::uds::WorkloadSocket;
use super::workload_api::WorkloadApi;
use crate::admin::Readiness;
use crate::audit::AuditLog;
use crate::metrics::NodeMetrics;
use crate::policy::PolicySet;
use crate::spiffe::TrustDomain;

/// What shapes a node daemon, whoever signs for it.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub trust_domain: TrustDomain,
    pub socket: PathBuf,
    /// Period of the re-hash of files behind live composite identities (zero: never).
    pub rehash_interval: Duration,
    /// Kubernetes workload attestation; `None` attests local processes only.
    pub k8s: Option<K8sConfig>,
}

/// A node daemon with its socket bound, ready to serve.
pub struct NodeDaemon {
    socket: WorkloadSocket,
    api: WorkloadApi,
    delegation: DelegationApi,
    /// The pod source feeding Kubernetes attestation, stopped at shutdown.
    pod_source: Option<SourceHandle>,
}

impl NodeDaemon {
    /// Builds the attestor, cache and services over `issuer`, with `policies` in force, and
    /// binds the socket. Components that can hold readiness back register with `ready`.
    pub async fn build(
        options: &NodeOptions,
        issuer: Arc<dyn SvidIssuer>,
        policies: watch::Receiver<Arc<PolicySet>>,
        audit: AuditLog,
        metrics: NodeMetrics,
        ready: &Readiness,
    ) -> anyhow::Result<Self> {
        let bundles = issuer.bundles();
        let cache = SvidCache::new(issuer.clone(), audit.clone(), metrics.clone());
        let composer = Arc::new(Composer::new());
        let drift = DriftWatch::new();
        spawn_rehash(options.rehash_interval, composer.clone(), drift.clone());
        let (attestor, pod_source): (Arc<dyn WorkloadAttestor>, _) = match &options.k8s {
            None => (Arc::new(UnixAttestor::new()), None),
            Some(k8s) => {
                let (index, handle) = start_pod_source(k8s, &metrics, ready, &drift).await?;
                let attestor = K8sAttestor::new(Arc::new(index), k8s.pod_wait);
                (Arc::new(attestor), Some(handle))
            }
        };
        let td = options.trust_domain.clone();
        let api = WorkloadApi::new(td, attestor, policies, bundles, cache, audit, metrics)
            .with_composite(composer, drift);
        let delegation = DelegationApi::new(api.clone(), issuer);
        let socket = WorkloadSocket::bind(&options.socket)?;
        Ok(Self {
            socket,
            api,
            delegation,
            pod_source,
        })
    }

    /// Serves until `shutdown` resolves; the socket file is removed on the way out.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let result = super::serve(self.socket, self.api, self.delegation, shutdown).await;
        if let Some(source) = self.pod_source {
            source.stop().await;
        }
        Ok(result?)
    }
}

/// Starts the pod index and its source; the index's changes reach open streams (a pod that
/// changes is re-checked), and its state is part of readiness and metrics.
async fn start_pod_source(
    config: &K8sConfig,
    metrics: &NodeMetrics,
    ready: &Readiness,
    drift: &DriftWatch,
) -> anyhow::Result<(PodIndex, SourceHandle)> {
    let (index, handle) = pods::start(config).await.map_err(|e| match e {
        pods::StartError::Config(c) => anyhow::Error::new(c),
        other => anyhow::Error::new(other),
    })?;
    index.attach_metrics(metrics);
    let i = index.clone();
    ready.add_check(Arc::new(move || {
        let status = i.status();
        if status.ready() && status.up() {
            Ok(status.summary())
        } else {
            Err(status.summary())
        }
    }));
    let mut changes = index.subscribe();
    let (drift, cancel) = (drift.clone(), handle.cancel_token());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
            }
            drift.poke();
        }
    });
    Ok((index, handle))
}

/// The safety net behind inotify: every `period`, forget all file digests and have open
/// streams recompose, so a change inotify could not see is still found.
fn spawn_rehash(period: std::time::Duration, composer: Arc<Composer>, drift: DriftWatch) {
    if period.is_zero() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            composer.flush();
            drift.poke();
        }
    });
}
