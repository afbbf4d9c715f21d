//! Workload attestation: what the kernel (and later the cluster) says about a caller.
pub mod cgroup;
pub mod cgroup_fs;
pub mod digest_cache;
pub mod k8s;
pub mod rootfs;
mod unix;

pub use unix::{resolve_user_name, user_name};

pub use unix::UnixAttestor;

use crate::node::peer::PeerInfo;
use crate::policy::{FactNeeds, WorkloadFacts};

/// Why a caller could not be attested. Mapped to `Unavailable` at the API edge, except
/// [`AttestError::UnknownPod`], which is `PermissionDenied`.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("the calling process (pid {0}) has exited")]
    Exited(i32),
    #[error("reading {path}: {source}")]
    Proc {
        path: String,
        source: std::io::Error,
    },
    #[error("malformed {path}: {detail}")]
    Malformed { path: String, detail: String },
    /// The caller runs in a container the pod index does not know (after the bounded wait):
    /// it has no identity, rather than a passing failure.
    #[error("{container} is not a known pod on this node: {reason}")]
    UnknownPod { container: String, reason: String },
}

impl AttestError {
    /// True when retrying cannot help: the caller is not someone with an identity.
    pub fn is_denial(&self) -> bool {
        matches!(self, AttestError::UnknownPod { .. })
    }
}

/// A source of facts about callers. `up`, Kubernetes and tests plug in their own.
#[async_trait::async_trait]
pub trait WorkloadAttestor: Send + Sync + 'static {
    /// Gathers the facts about the process behind `peer`: always those that come with the
    /// connection and the pod it runs in, and of the rest those in `needs`.
    async fn attest(&self, peer: &PeerInfo, needs: FactNeeds)
    -> Result<WorkloadFacts, AttestError>;
}
