//! What attestation learned about a caller: the input to policy matching and templates.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Facts about one workload, each gathered outside the workload process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct WorkloadFacts {
    pub unix: Option<UnixFacts>,
    /// Present when the caller runs in a Kubernetes pod known to the node's pod index.
    /// Boxed: inline it is three quarters of the facts' size, carried (and moved) by every
    /// call's futures whether or not the caller runs in a pod.
    pub k8s: Option<Box<K8sFacts>>,
}

/// Facts about a caller's pod and container, from the node's pod index (API server watch or
/// kubelet), keyed by what the kernel says: the pod UID and container ID in its cgroup path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct K8sFacts {
    /// The `--cluster-name` of this node daemon.
    pub cluster: String,
    pub node_name: String,
    pub namespace: String,
    /// Labels of the pod's namespace (for `namespaceSelector`); empty if unknown.
    pub namespace_labels: BTreeMap<String, String>,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub pod_labels: BTreeMap<String, String>,
    pub pod_annotations: BTreeMap<String, String>,
    pub container_name: String,
    /// Container ID without the runtime prefix (`containerd://` etc.).
    pub container_id: String,
    /// The container's image as written in the pod spec.
    pub image: String,
    /// `sha256:<hex>` from the container status `imageID`, if it names a digest.
    pub image_digest: Option<String>,
}

/// The pod annotation that declares the agent's name (the `{{ .AgentName }}` placeholder).
pub const AGENT_NAME_ANNOTATION: &str = "agentid.dev/agent-name";

impl K8sFacts {
    /// The agent name the pod declares in [`AGENT_NAME_ANNOTATION`], if any (trimmed, as the
    /// composite identity reads it).
    pub fn agent_name(&self) -> Option<&str> {
        self.pod_annotations
            .get(AGENT_NAME_ANNOTATION)
            .map(|v| v.trim())
    }
}

/// Which of the facts that cost a system call per call the policies in force can use. The
/// attestor gathers only these on the serving path; uid, gid and groups come with the
/// connection and are always there. Audit records take the full facts ([`FactNeeds::ALL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FactNeeds {
    /// The executable's path (`readlink` of `/proc/<pid>/exe`).
    pub exe_path: bool,
    /// The executable's digest (`stat` of `/proc/<pid>/exe`; hashed once per file version).
    pub exe_sha256: bool,
}

impl FactNeeds {
    /// Every fact.
    pub const ALL: Self = Self {
        exe_path: true,
        exe_sha256: true,
    };
    /// Only what comes with the connection.
    pub const NONE: Self = Self {
        exe_path: false,
        exe_sha256: false,
    };

    /// Both sets of needs.
    pub fn union(self, other: Self) -> Self {
        Self {
            exe_path: self.exe_path || other.exe_path,
            exe_sha256: self.exe_sha256 || other.exe_sha256,
        }
    }
}

/// Facts the kernel reports about a local process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct UnixFacts {
    pub uid: u32,
    pub gid: u32,
    /// Shared with the connection's peer credentials, which hold the same list: every call
    /// is attested again, and this way without copying it.
    pub supplementary_gids: Arc<[u32]>,
    pub user_name: Option<String>,
    /// Executable path as the kernel reports it (`/proc/<pid>/exe`).
    pub path: Option<String>,
    /// `sha256:<hex>` of the executable.
    pub sha256: Option<String>,
}

impl WorkloadFacts {
    /// The facts as SPIRE-style selector strings, for logs and audit records.
    pub fn selectors(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(u) = &self.unix {
            out.push(format!("unix:uid:{}", u.uid));
            out.push(format!("unix:gid:{}", u.gid));
            out.extend(
                u.supplementary_gids
                    .iter()
                    .map(|g| format!("unix:supplementary_gid:{g}")),
            );
            if let Some(n) = &u.user_name {
                out.push(format!("unix:user:{n}"));
            }
            if let Some(p) = &u.path {
                out.push(format!("unix:path:{p}"));
            }
            if let Some(h) = &u.sha256 {
                out.push(format!("unix:sha256:{h}"));
            }
        }
        if let Some(k) = &self.k8s {
            out.push(format!("k8s:ns:{}", k.namespace));
            out.push(format!("k8s:sa:{}", k.service_account));
            out.push(format!("k8s:pod-name:{}", k.pod_name));
            out.push(format!("k8s:pod-uid:{}", k.pod_uid));
            out.push(format!("k8s:node-name:{}", k.node_name));
            out.push(format!("k8s:container-name:{}", k.container_name));
            if let Some(d) = &k.image_digest {
                out.push(format!("k8s:image-digest:{d}"));
            }
            out.extend(
                k.pod_labels
                    .iter()
                    .map(|(k, v)| format!("k8s:pod-label:{k}:{v}")),
            );
        }
        out
    }
}
