//! Kubernetes facts shared by the node daemon and the server: the pod index (pods by UID,
//! containers by ID, namespaces for their labels), the API-server watcher that feeds it, the
//! trimming of a Pod object to the facts policies see, and the API client.
//!
//! The node daemon keeps an index of its own node's pods (`Scope::Node`); the server keeps one
//! of the whole cluster (`Scope::Cluster`) to check what node daemons report. Neither side's
//! code lives here: the node's kubelet polling stays in `node::k8s`, the server's checks in
//! `server`.
pub mod api;
pub mod index;
pub mod pod;
pub mod status;
pub mod token;

pub use api::{ApiConfig, ApiConfigError, ApiError};
pub use index::{LookupError, PodIndex, Replaced, Scope};
pub use pod::{PodRejected, image_digest, strip_runtime_prefix};
pub use status::{K8sStatus, SourceError, Stream, StreamStatus};

use serde::{Deserialize, Serialize};

/// Where an index learns about pods.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum PodSource {
    /// Watch the API server (pods, and namespaces for their labels).
    #[default]
    Api,
    /// Poll the kubelet's `/pods` on this node: no API server load, no namespace labels.
    Kubelet,
}

impl PodSource {
    /// The name used on the command line and in status lines.
    pub fn as_str(self) -> &'static str {
        match self {
            PodSource::Api => "api",
            PodSource::Kubelet => "kubelet",
        }
    }
}

impl std::fmt::Display for PodSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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

/// Parses `url` as an absolute http(s) URL with a host and no query; returns its scheme.
pub(crate) fn check_url(url: &str) -> Result<String, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| e.to_string())?;
    let scheme = match uri.scheme_str() {
        Some(s @ ("http" | "https")) => s.to_owned(),
        Some(_) => return Err("the scheme must be https (or http)".to_owned()),
        None => return Err("not an absolute URL".to_owned()),
    };
    if uri.host().is_none_or(str::is_empty) {
        return Err("no host".to_owned());
    }
    if uri.query().is_some() {
        return Err("a query string is not allowed".to_owned());
    }
    Ok(scheme)
}

/// A Kubernetes node name is a lowercase RFC 1123 subdomain; this also keeps it safe inside a
/// field selector and as a SPIFFE ID path segment.
pub fn is_node_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn pod_source_on_the_command_line() {
        assert_eq!(PodSource::from_str("api", false), Ok(PodSource::Api));
        assert_eq!(
            PodSource::from_str("kubelet", false),
            Ok(PodSource::Kubelet)
        );
        assert!(PodSource::from_str("etcd", false).is_err());
        assert_eq!(PodSource::Kubelet.to_string(), "kubelet");
    }

    #[test]
    fn node_names() {
        for good in ["node-a", "node-a.example", "10.0.0.1", "a"] {
            assert!(is_node_name(good), "{good}");
        }
        for bad in ["", "Node_A", "a,b=c", "-a", "a-", "a..b", "a/b"] {
            assert!(!is_node_name(bad), "{bad}");
        }
    }
}
