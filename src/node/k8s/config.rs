//! Typed configuration of the pod index and its source, validated once before anything starts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::k8s::{ApiConfig, PodSource};
use crate::k8s::{ApiConfigError, check_url, is_node_name};

/// The node daemon's Kubernetes settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct K8sConfig {
    /// This node's name (`spec.nodeName` of the daemon's own pod, from the downward API).
    pub node_name: String,
    /// The cluster's name as policies see it (`K8sFacts::cluster`).
    pub cluster_name: String,
    /// `--pod-source api|kubelet`.
    pub pod_source: PodSource,
    /// Used when `pod_source` is `api`.
    pub api: ApiConfig,
    /// Used when `pod_source` is `kubelet`.
    pub kubelet: KubeletConfig,
    /// How long attestation waits for a caller's pod or container to reach the index.
    #[serde(with = "humantime_serde")]
    pub pod_wait: Duration,
}

impl Default for K8sConfig {
    fn default() -> Self {
        Self {
            node_name: String::new(),
            cluster_name: String::new(),
            pod_source: PodSource::Api,
            api: ApiConfig::default(),
            kubelet: KubeletConfig::default(),
            pod_wait: Duration::from_secs(3),
        }
    }
}

/// The in-cluster service-account token, which rotates.
pub const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// How to reach this node's kubelet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubeletConfig {
    /// The kubelet's HTTPS endpoint; `/pods` is appended.
    pub url: String,
    /// PEM bundle of the CAs that sign the kubelet's serving certificate.
    pub ca_file: Option<PathBuf>,
    /// Bearer token file, re-read on every poll (tokens rotate).
    pub token_file: PathBuf,
    /// Accept any kubelet certificate. Off by default; logged as a warning when on.
    pub insecure_skip_tls_verify: bool,
    /// Time between polls (a lookup miss polls sooner).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Bound on one `/pods` request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for KubeletConfig {
    fn default() -> Self {
        Self {
            url: "https://127.0.0.1:10250".to_owned(),
            ca_file: None,
            token_file: PathBuf::from(SERVICE_ACCOUNT_TOKEN),
            insecure_skip_tls_verify: false,
            poll_interval: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// What is wrong with a `K8sConfig`; each names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum K8sConfigError {
    #[error("k8s.node_name is empty: set it from the downward API (spec.nodeName)")]
    NoNodeName,
    #[error("k8s.node_name {0:?} is not a Kubernetes node name (lowercase RFC 1123 subdomain)")]
    BadNodeName(String),
    #[error("k8s.cluster_name is empty")]
    NoClusterName,
    #[error("k8s.pod_wait {0:?} is outside 0s..=60s")]
    PodWait(Duration),
    #[error("k8s.{key} {url:?}: {reason}")]
    Url {
        key: &'static str,
        url: String,
        reason: String,
    },
    #[error("k8s.api.{0}")]
    Api(#[from] ApiConfigError),
    #[error("k8s.kubelet.{key} {value:?} is outside {range}")]
    KubeletDuration {
        key: &'static str,
        value: Duration,
        range: &'static str,
    },
    #[error("k8s.kubelet: set ca_file, or insecure_skip_tls_verify to accept any certificate")]
    KubeletNoTrust,
    #[error("k8s.kubelet: ca_file and insecure_skip_tls_verify exclude each other")]
    KubeletTrustConflict,
    #[error("k8s.kubelet.token_file is empty")]
    KubeletNoToken,
}

impl K8sConfig {
    /// Checks every key the chosen source uses.
    pub fn validate(&self) -> Result<(), K8sConfigError> {
        if self.node_name.is_empty() {
            return Err(K8sConfigError::NoNodeName);
        }
        if !is_node_name(&self.node_name) {
            return Err(K8sConfigError::BadNodeName(self.node_name.clone()));
        }
        if self.cluster_name.trim().is_empty() {
            return Err(K8sConfigError::NoClusterName);
        }
        if self.pod_wait > Duration::from_secs(60) {
            return Err(K8sConfigError::PodWait(self.pod_wait));
        }
        match self.pod_source {
            PodSource::Api => Ok(self.api.validate()?),
            PodSource::Kubelet => self.kubelet.validate(),
        }
    }
}

impl KubeletConfig {
    fn validate(&self) -> Result<(), K8sConfigError> {
        let scheme = check_url(&self.url).map_err(|reason| K8sConfigError::Url {
            key: "kubelet.url",
            url: self.url.clone(),
            reason,
        })?;
        if scheme != "https" {
            return Err(K8sConfigError::Url {
                key: "kubelet.url",
                url: self.url.clone(),
                reason: "the kubelet serves /pods over https only".to_owned(),
            });
        }
        match (&self.ca_file, self.insecure_skip_tls_verify) {
            (None, false) => return Err(K8sConfigError::KubeletNoTrust),
            (Some(_), true) => return Err(K8sConfigError::KubeletTrustConflict),
            _ => {}
        }
        if self.token_file == Path::new("") {
            return Err(K8sConfigError::KubeletNoToken);
        }
        let ms = Duration::from_millis;
        if !(ms(100)..=Duration::from_secs(600)).contains(&self.poll_interval) {
            return Err(K8sConfigError::KubeletDuration {
                key: "poll_interval",
                value: self.poll_interval,
                range: "100ms..=10m",
            });
        }
        if !(ms(100)..=Duration::from_secs(300)).contains(&self.request_timeout) {
            return Err(K8sConfigError::KubeletDuration {
                key: "request_timeout",
                value: self.request_timeout,
                range: "100ms..=5m",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> K8sConfig {
        K8sConfig {
            node_name: "node-a.example".into(),
            cluster_name: "prod".into(),
            ..K8sConfig::default()
        }
    }

    #[test]
    fn defaults_validate_for_the_api_source() {
        assert_eq!(valid().validate(), Ok(()));
        assert_eq!(valid().pod_wait, Duration::from_secs(3));
        assert_eq!(valid().kubelet.poll_interval, Duration::from_secs(5));
    }

    #[test]
    fn each_mistake_names_its_key() {
        type Edit = fn(&mut K8sConfig);
        let cases: Vec<(Edit, &str)> = vec![
            (|c| c.node_name.clear(), "k8s.node_name is empty"),
            (
                |c| c.node_name = "Node_A".into(),
                "not a Kubernetes node name",
            ),
            (
                |c| c.node_name = "a,b=c".into(),
                "not a Kubernetes node name",
            ),
            (|c| c.node_name = "-a".into(), "not a Kubernetes node name"),
            (|c| c.cluster_name = " ".into(), "k8s.cluster_name is empty"),
            (|c| c.pod_wait = Duration::from_secs(61), "k8s.pod_wait"),
            (
                |c| c.api.token_file = Some("/t".into()),
                "k8s.api.token_file is only used",
            ),
            (|c| c.api.url = Some("ftp://x".into()), "k8s.api.url"),
            (
                |c| c.api.url = Some("https://x".into()),
                "ca_file is required",
            ),
            (
                |c| c.api.url = Some("/just/a/path".into()),
                "not an absolute URL",
            ),
            (
                |c| {
                    c.pod_source = PodSource::Kubelet;
                },
                "set ca_file, or insecure_skip_tls_verify",
            ),
            (
                |c| {
                    c.pod_source = PodSource::Kubelet;
                    c.kubelet.insecure_skip_tls_verify = true;
                    c.kubelet.ca_file = Some("/ca".into());
                },
                "exclude each other",
            ),
            (
                |c| {
                    c.pod_source = PodSource::Kubelet;
                    c.kubelet.insecure_skip_tls_verify = true;
                    c.kubelet.url = "http://127.0.0.1:10255".into();
                },
                "https only",
            ),
            (
                |c| {
                    c.pod_source = PodSource::Kubelet;
                    c.kubelet.insecure_skip_tls_verify = true;
                    c.kubelet.poll_interval = Duration::from_millis(1);
                },
                "k8s.kubelet.poll_interval",
            ),
        ];
        for (edit, want) in cases {
            let mut c = valid();
            edit(&mut c);
            let err = c.validate().expect_err(want).to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
    }

    #[test]
    fn explicit_sources_validate() {
        let mut c = valid();
        c.api.url = Some("https://10.0.0.1:6443".into());
        c.api.ca_file = Some("/ca.pem".into());
        c.api.token_file = Some("/token".into());
        assert_eq!(c.validate(), Ok(()));
        c.api.url = Some("http://127.0.0.1:8001".into());
        c.api.ca_file = None;
        assert_eq!(c.validate(), Ok(()));

        let mut c = valid();
        c.pod_source = PodSource::Kubelet;
        c.kubelet.ca_file = Some("/ca.pem".into());
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn serde_round_trip_and_unknown_keys() {
        let yaml = "node_name: node-a\ncluster_name: prod\npod_source: kubelet\npod_wait: 500ms\n\
                    kubelet: {insecure_skip_tls_verify: true, poll_interval: 2s}\n";
        let c: K8sConfig = serde_yaml_ng::from_str(yaml).unwrap();
        assert_eq!(c.pod_source, PodSource::Kubelet);
        assert_eq!(c.pod_wait, Duration::from_millis(500));
        assert_eq!(c.kubelet.poll_interval, Duration::from_secs(2));
        assert_eq!(c.validate(), Ok(()));
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<K8sConfig>(&json).unwrap(), c);

        let err = serde_yaml_ng::from_str::<K8sConfig>("node_nmae: x\n").unwrap_err();
        assert!(err.to_string().contains("node_nmae"), "{err}");
    }
}
