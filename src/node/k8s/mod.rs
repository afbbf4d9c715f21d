//! Kubernetes facts for attestation: a node-scoped pod index (`index`) fed in the background by
//! the API server (`api`, default) or the kubelet (`kubelet`), so resolving a caller's pod UID
//! and container ID never waits on a request per call.
pub mod api;
pub mod config;
pub mod index;
pub mod kubelet;
pub mod pod;
pub mod status;
pub mod token;

pub use config::{ApiConfig, K8sConfig, K8sConfigError, KubeletConfig, PodSource};
pub use index::{LookupError, PodIndex, Replaced};
pub use pod::{PodRejected, image_digest, strip_runtime_prefix};
pub use status::{K8sStatus, SourceError, Stream, StreamStatus};

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

/// An error and its sources on one line, skipping a source whose text the line already holds
/// (kube's errors often repeat their cause).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// The DER certificates in a PEM bundle; an error if there are none.
pub(crate) fn pem_certificates(pem_bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let blocks = pem::parse_many(pem_bytes).map_err(|e| format!("not PEM: {e}"))?;
    let certs: Vec<Vec<u8>> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .collect();
    if certs.is_empty() {
        return Err("no CERTIFICATE block in the PEM data".to_owned());
    }
    Ok(certs)
}
