//! What the index keeps of a pod: the few fields `K8sFacts` needs, trimmed from the full object
//! as it arrives, and the parsing of container IDs and image digests.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, ContainerStatus, Pod, PodSpec};

/// A mirror pod (the API server's copy of a static pod) carries the static pod's UID here; the
/// kubelet names the cgroup after that UID, not after the mirror pod's own.
pub(crate) const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
/// kubectl's copy of the whole manifest: often the largest thing in a pod and never a fact.
pub(crate) const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Why a pod delivered by a source was not indexed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodRejected {
    #[error("pod {namespace}/{name} has no metadata.uid")]
    NoUid { namespace: String, name: String },
    #[error("pod {namespace}/{name} ({uid}) is on node {node:?}, not on this node")]
    OtherNode {
        namespace: String,
        name: String,
        uid: String,
        node: String,
    },
}

/// What the index keeps of one pod.
#[derive(Debug)]
pub(crate) struct PodEntry {
    /// `metadata.uid`.
    pub(crate) uid: Box<str>,
    /// The UID in the pod's cgroup path: `uid`, or the static pod's UID for a mirror pod.
    pub(crate) kernel_uid: Box<str>,
    pub(crate) namespace: Box<str>,
    pub(crate) name: Box<str>,
    pub(crate) service_account: Box<str>,
    /// `spec.nodeName`; empty while the pod is not scheduled.
    pub(crate) node: Box<str>,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) annotations: BTreeMap<String, String>,
    /// `Succeeded` or `Failed`: no process of this pod runs any more.
    pub(crate) finished_phase: Option<Box<str>>,
    pub(crate) containers: Vec<ContainerEntry>,
    /// Approximate memory held, for `PodIndex::approx_bytes_per_pod`.
    pub(crate) bytes: usize,
}

/// One container of an indexed pod.
#[derive(Debug)]
pub(crate) struct ContainerEntry {
    /// Without the runtime prefix, as in the cgroup path.
    pub(crate) id: Box<str>,
    pub(crate) name: Box<str>,
    pub(crate) image: Box<str>,
    pub(crate) image_digest: Option<Box<str>>,
    pub(crate) terminated: bool,
}

impl PodEntry {
    /// Trims `pod` to an entry; with `only_node`, refuses it unless it is scheduled there.
    pub(crate) fn from_pod(pod: &Pod, only_node: Option<&str>) -> Result<Self, PodRejected> {
        let meta = &pod.metadata;
        let namespace = meta.namespace.clone().unwrap_or_default();
        let name = meta.name.clone().unwrap_or_default();
        let Some(uid) = meta.uid.as_deref().filter(|u| !u.is_empty()) else {
            return Err(PodRejected::NoUid { namespace, name });
        };
        let empty_spec = PodSpec::default();
        let spec = pod.spec.as_ref().unwrap_or(&empty_spec);
        let node = spec.node_name.as_deref().unwrap_or_default();
        if only_node.is_some_and(|n| n != node) {
            return Err(PodRejected::OtherNode {
                namespace,
                name,
                uid: uid.to_owned(),
                node: node.to_owned(),
            });
        }
        let mut annotations = meta.annotations.clone().unwrap_or_default();
        annotations.remove(LAST_APPLIED_ANNOTATION);
        let kernel_uid = annotations
            .get(MIRROR_ANNOTATION)
            .filter(|u| !u.is_empty())
            .map_or(uid, String::as_str);
        // The ServiceAccount admission plugin fills in "default" when the manifest names none.
        let service_account = spec
            .service_account_name
            .as_deref()
            .or(spec.service_account.as_deref())
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        let status = pod.status.as_ref();
        let finished_phase = status
            .and_then(|s| s.phase.as_deref())
            .filter(|p| matches!(*p, "Succeeded" | "Failed"))
            .map(Box::from);
        let mut containers = Vec::new();
        if let Some(status) = status {
            let main_images = images(&spec.containers);
            let init_images = spec
                .init_containers
                .as_deref()
                .map(images)
                .unwrap_or_default();
            let ephemeral_images: Vec<(&str, &str)> = spec
                .ephemeral_containers
                .iter()
                .flatten()
                .map(|c| (c.name.as_str(), c.image.as_deref().unwrap_or_default()))
                .collect();
            let groups = [
                (&status.container_statuses, main_images),
                (&status.init_container_statuses, init_images),
                (&status.ephemeral_container_statuses, ephemeral_images),
            ];
            for (statuses, spec_images) in groups {
                for cs in statuses.iter().flatten() {
                    add_containers(&mut containers, cs, &spec_images);
                }
            }
        }
        let mut entry = PodEntry {
            uid: uid.into(),
            kernel_uid: kernel_uid.into(),
            namespace: namespace.into(),
            name: name.into(),
            service_account: service_account.into(),
            node: node.into(),
            labels: meta.labels.clone().unwrap_or_default(),
            annotations,
            finished_phase,
            containers,
            bytes: 0,
        };
        entry.bytes = entry.approx_bytes();
        Ok(entry)
    }

    fn approx_bytes(&self) -> usize {
        // A BTreeMap entry costs its two Strings plus roughly its share of a node.
        let map = |m: &BTreeMap<String, String>| {
            m.iter()
                .map(|(k, v)| k.len() + v.len() + 2 * size_of::<String>() + 16)
                .sum::<usize>()
        };
        size_of::<PodEntry>()
            + self.uid.len()
            + self.kernel_uid.len()
            + self.namespace.len()
            + self.name.len()
            + self.service_account.len()
            + self.node.len()
            + map(&self.labels)
            + map(&self.annotations)
            + self
                .containers
                .iter()
                .map(|c| {
                    size_of::<ContainerEntry>()
                        + 2 * c.id.len() // and its copy as a key in `containers`
                        + c.name.len()
                        + c.image.len()
                        + c.image_digest.as_ref().map_or(0, |d| d.len())
                })
                .sum::<usize>()
    }
}

fn images(containers: &[Container]) -> Vec<(&str, &str)> {
    containers
        .iter()
        .map(|c| (c.name.as_str(), c.image.as_deref().unwrap_or_default()))
        .collect()
}

/// Adds the running container of `cs`, and its previous instance (terminated) if the kubelet
/// restarted it, so a leftover caller of the old ID gets "terminated", not "unknown".
fn add_containers(
    out: &mut Vec<ContainerEntry>,
    cs: &ContainerStatus,
    spec_images: &[(&str, &str)],
) {
    // The image as written in the spec; the status may name the resolved image instead.
    let image = spec_images
        .iter()
        .find(|(name, _)| *name == cs.name)
        .map_or(cs.image.as_str(), |(_, image)| image);
    let current = cs
        .container_id
        .as_deref()
        .map(strip_runtime_prefix)
        .filter(|id| !id.is_empty());
    if let Some(id) = current {
        let terminated = cs.state.as_ref().is_some_and(|s| s.terminated.is_some());
        out.push(ContainerEntry {
            id: id.into(),
            name: cs.name.as_str().into(),
            image: image.into(),
            image_digest: image_digest(&cs.image_id).map(Box::from),
            terminated,
        });
    }
    let previous = cs
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .and_then(|t| t.container_id.as_deref())
        .map(strip_runtime_prefix)
        .filter(|id| !id.is_empty() && Some(*id) != current);
    if let Some(id) = previous {
        out.push(ContainerEntry {
            id: id.into(),
            name: cs.name.as_str().into(),
            image: image.into(),
            image_digest: None,
            terminated: true,
        });
    }
}

/// `containerd://<id>`, `cri-o://<id>`, `docker://<id>` (any `<runtime>://`) → `<id>`.
pub fn strip_runtime_prefix(container_id: &str) -> &str {
    container_id
        .split_once("://")
        .map_or(container_id, |(_, id)| id)
}

/// `sha256:<hex>` from a container status `imageID` (`repo@sha256:<hex>`, `sha256:<hex>`,
/// `docker-pullable://repo@sha256:<hex>`); `None` unless it names a well-formed digest.
pub fn image_digest(image_id: &str) -> Option<String> {
    let digest = image_id.rsplit_once('@').map_or(image_id, |(_, d)| d);
    let hex = digest.strip_prefix("sha256:")?;
    let well_formed = hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    well_formed.then(|| format!("sha256:{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST_HEX: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn image_digests() {
        let d = format!("sha256:{DIGEST_HEX}");
        let cases = [
            (
                format!("docker.io/library/x@sha256:{DIGEST_HEX}"),
                Some(d.clone()),
            ),
            (format!("sha256:{DIGEST_HEX}"), Some(d.clone())),
            (
                format!("docker-pullable://r.example:5000/x/y@sha256:{DIGEST_HEX}"),
                Some(d),
            ),
            ("docker.io/library/x:1.0".to_owned(), None),
            (String::new(), None),
            ("sha256:abc".to_owned(), None),
            (format!("x@sha256:{}", DIGEST_HEX.to_uppercase()), None),
            (format!("x@sha512:{DIGEST_HEX}{DIGEST_HEX}"), None),
            (format!("x@sha256:{DIGEST_HEX}0"), None),
        ];
        for (input, want) in cases {
            assert_eq!(image_digest(&input), want, "{input}");
        }
    }
}
