//! Kubernetes facts for attestation: a node-scoped pod index (`index`), fed in the background
//! by a pod source, so resolving a caller's pod UID and container ID never waits on a request
//! per call.
pub mod bench;
pub mod config;
pub mod index;
pub mod pod;
pub mod status;

pub use config::{ApiConfig, K8sConfig, K8sConfigError, KubeletConfig, PodSource};
pub use index::{LookupError, PodIndex, Replaced};
pub use pod::{PodRejected, image_digest, strip_runtime_prefix};
pub use status::{K8sStatus, SourceError, Stream, StreamStatus};
