//! Kubernetes workload attestation: the kernel says which container a caller runs in (its
//! cgroup path names the pod UID and container ID), and the node's pod index says what that
//! container is. Nothing comes from the caller itself.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::cgroup::{self, ContainerRef};
use super::{AttestError, UnixAttestor, WorkloadAttestor};
use crate::node::peer::PeerInfo;
use crate::policy::{FactNeeds, K8sFacts, WorkloadFacts};

/// Where pod facts come from: the node's pod index.
#[async_trait::async_trait]
pub trait PodLookup: Send + Sync + 'static {
    /// The facts of `container` once the index knows it, waiting at most `timeout` for a
    /// container that started a moment ago. The error says why it is not known.
    async fn wait_for(
        &self,
        container: &ContainerRef,
        timeout: Duration,
    ) -> Result<K8sFacts, String>;
}

/// Attests callers as Unix processes and, when they run in a pod, as that pod's container.
#[derive(Clone)]
pub struct K8sAttestor {
    unix: UnixAttestor,
    pods: Arc<dyn PodLookup>,
    proc_root: PathBuf,
    /// How long a container missing from the index is waited for.
    pod_wait: Duration,
}

impl K8sAttestor {
    pub fn new(pods: Arc<dyn PodLookup>, pod_wait: Duration) -> Self {
        Self {
            unix: UnixAttestor::new(),
            pods,
            proc_root: PathBuf::from("/proc"),
            pod_wait,
        }
    }

    /// Reads `/proc/<pid>/cgroup` and finds the container, if any.
    fn container_of(&self, pid: i32) -> Result<Option<ContainerRef>, AttestError> {
        let path = self.proc_root.join(pid.to_string()).join("cgroup");
        let text = std::fs::read_to_string(&path).map_err(|source| AttestError::Proc {
            path: path.display().to_string(),
            source,
        })?;
        cgroup::parse(&text).map_err(|e| AttestError::Malformed {
            path: path.display().to_string(),
            detail: e.to_string(),
        })
    }
}

#[async_trait::async_trait]
impl WorkloadAttestor for K8sAttestor {
    async fn attest(
        &self,
        peer: &PeerInfo,
        needs: FactNeeds,
    ) -> Result<WorkloadFacts, AttestError> {
        let container = self.container_of(peer.pid)?;
        let mut facts = self.unix.attest(peer, needs).await?;
        let Some(container) = container else {
            // Not in a pod: only unix selectors can match it.
            return Ok(facts);
        };
        let k8s = self
            .pods
            .wait_for(&container, self.pod_wait)
            .await
            .map_err(|reason| AttestError::UnknownPod {
                container: container.to_string(),
                reason,
            })?;
        // The cgroup was read before the wait: the answer is about this caller only if the
        // pid still names it.
        if !peer.is_alive() {
            return Err(AttestError::Exited(peer.pid));
        }
        facts.k8s = Some(Box::new(k8s));
        Ok(facts)
    }
}

#[async_trait::async_trait]
impl PodLookup for crate::node::k8s::PodIndex {
    async fn wait_for(
        &self,
        container: &ContainerRef,
        timeout: Duration,
    ) -> Result<K8sFacts, String> {
        crate::node::k8s::PodIndex::wait_for(
            self,
            &container.pod_uid,
            &container.container_id,
            timeout,
        )
        .await
        .map_err(|e| e.to_string())
    }
}
