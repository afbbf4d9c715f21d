//! Kubernetes facts for attestation: a node-scoped pod index (`crate::k8s::PodIndex`) fed in
//! the background by the API server (`crate::k8s::api`, default) or this node's kubelet
//! (`kubelet`), so resolving a caller's pod UID and container ID never waits on a request per
//! call.
pub mod config;
pub mod kubelet;

pub use crate::k8s::{ApiConfig, LookupError, PodIndex, PodSource};
pub use config::{K8sConfig, K8sConfigError, KubeletConfig};

use crate::k8s::api;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Why the pod source could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] K8sConfigError),
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error(transparent)]
    Kubelet(#[from] kubelet::KubeletError),
}

/// The running pod source; stop it with `stop` (or cancel its token).
pub struct SourceHandle {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl SourceHandle {
    /// The token that stops the source when cancelled.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stops the source and waits for it to finish.
    pub async fn stop(self) {
        self.cancel.cancel();
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "pod source task failed");
        }
    }
}

/// Validates `config`, builds the client for the chosen source and runs it in the background.
/// The index starts empty and unsynced; `PodIndex::status` tells when the first list is in.
pub async fn start(config: &K8sConfig) -> Result<(PodIndex, SourceHandle), StartError> {
    config.validate()?;
    let index = PodIndex::new(&config.cluster_name, &config.node_name, config.pod_source);
    let cancel = CancellationToken::new();
    let task = match config.pod_source {
        PodSource::Api => {
            let client = api::client(&config.api).await?;
            tokio::spawn(api::run(client, index.clone(), cancel.clone()))
        }
        PodSource::Kubelet => {
            let client = kubelet::client(&config.kubelet)?;
            tokio::spawn(kubelet::run(
                client,
                config.kubelet.clone(),
                index.clone(),
                cancel.clone(),
            ))
        }
    };
    tracing::info!(source = %config.pod_source, node = %config.node_name, "pod index source started");
    Ok((index, SourceHandle { cancel, task }))
}
