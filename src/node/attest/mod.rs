//! Workload attestation: what the kernel (and later the cluster) says about a caller.
pub mod cgroup;
pub mod cgroup_fs;
pub mod rootfs;
mod unix;

pub use unix::{resolve_user_name, user_name};

pub use unix::UnixAttestor;

use crate::node::peer::PeerInfo;
use crate::policy::WorkloadFacts;

/// Why a caller could not be attested. Mapped to `Unavailable` at the API edge.
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
}

/// A source of facts about callers. `up`, Kubernetes and tests plug in their own.
#[async_trait::async_trait]
pub trait WorkloadAttestor: Send + Sync + 'static {
    /// Gathers the facts about the process behind `peer`.
    async fn attest(&self, peer: &PeerInfo) -> Result<WorkloadFacts, AttestError>;
}
