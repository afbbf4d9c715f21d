//! The pod index: pod and container facts keyed by what the kernel reports (the pod UID and
//! container ID in a process's cgroup path), fed by a source in the background, so that
//! resolving a caller is a few hash lookups whatever the number of pods.
//!
//! A node daemon's index (`Scope::Node`) keeps only its node's pods: one whose `spec.nodeName`
//! names another node is refused even if a source delivers it. The server's index
//! (`Scope::Cluster`) keeps every pod, and a lookup names the node the pod must run on. Each
//! pod keeps only what `K8sFacts` needs (`pod.rs`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Notify, watch};

use super::PodSource;
use super::pod::{PodEntry, PodRejected, strip_runtime_prefix};
use super::status::{K8sStatus, Stream, StreamStatus};
use crate::metrics::NodeMetrics;
use crate::policy::K8sFacts;

/// Which pods an index holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// One node's pods (a node daemon's index).
    Node(String),
    /// Every pod of the cluster (the server's index).
    Cluster,
}

/// Pods refused for naming another node are remembered (for a precise error) up to this many.
const MAX_FOREIGN: usize = 1024;

/// Why a caller's pod or container could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("the pod index has not completed its first {0} list yet")]
    NotSynced(&'static str),
    #[error("pod {pod_uid} is not known on this node")]
    PodUnknown { pod_uid: String },
    #[error("pod {pod_uid} is scheduled on node {node:?}, not on this node")]
    OtherNode { pod_uid: String, node: String },
    #[error("pod {pod_uid} is scheduled on node {node:?}, not on node {expected:?}")]
    NotOnNode {
        pod_uid: String,
        node: String,
        expected: String,
    },
    #[error("container {container_id} is not (yet) in pod {namespace}/{pod_name} ({pod_uid})")]
    ContainerUnknown {
        pod_uid: String,
        namespace: String,
        pod_name: String,
        container_id: String,
    },
    #[error("container {container_id} belongs to pod {owner_uid}, not to pod {pod_uid}")]
    ContainerInOtherPod {
        pod_uid: String,
        container_id: String,
        owner_uid: String,
    },
    #[error("pod {namespace}/{pod_name} ({pod_uid}): {what}")]
    Terminated {
        pod_uid: String,
        namespace: String,
        pod_name: String,
        what: String,
    },
    #[error("{count} pods claim UID {pod_uid}; refusing to choose one")]
    Ambiguous { pod_uid: String, count: usize },
    #[error(
        "namespace {namespace:?} of pod {pod_uid} is not known (its labels are needed for \
         namespaceSelector policies)"
    )]
    NamespaceUnknown { pod_uid: String, namespace: String },
}

impl LookupError {
    /// Whether a later index update may resolve the caller (worth waiting for).
    pub fn may_resolve_later(&self) -> bool {
        matches!(
            self,
            LookupError::NotSynced(_)
                | LookupError::PodUnknown { .. }
                | LookupError::ContainerUnknown { .. }
                | LookupError::NamespaceUnknown { .. }
        )
    }
}

/// How a full list went into the index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replaced {
    /// Pods now in the index.
    pub indexed: usize,
    /// Pods refused (another node, no UID).
    pub rejected: usize,
}

/// The pod index. Cheap to clone; all clones share one index.
#[derive(Clone)]
pub struct PodIndex {
    inner: Arc<Inner>,
}

struct Inner {
    cluster: String,
    scope: Scope,
    source: PodSource,
    state: RwLock<State>,
    status: Mutex<Vec<StreamStatus>>,
    /// Bumped on every change, waking `wait_for` callers.
    generation: watch::Sender<u64>,
    /// Asks a polling source for an early poll (a `wait_for` missed).
    refresh: Notify,
    gauges: OnceLock<Gauges>,
}

struct Gauges {
    pods: Gauge,
    source_up: Gauge,
}

#[derive(Default)]
struct State {
    /// By the UID the kernel knows. More than one entry means several pods claim that UID.
    pods: HashMap<Box<str>, Vec<PodEntry>>,
    /// `metadata.uid` → key in `pods` (they differ for mirror pods).
    by_object: HashMap<Box<str>, Box<str>>,
    /// Container ID → key in `pods`, to tell "wrong pod" from "unknown container".
    containers: HashMap<Box<str>, Box<str>>,
    /// Pods refused for naming another node: UID → node.
    foreign: HashMap<Box<str>, Box<str>>,
    namespaces: HashMap<Box<str>, Arc<BTreeMap<String, String>>>,
    pods_synced: bool,
    namespaces_synced: bool,
    /// Sum of `PodEntry::bytes`.
    bytes: usize,
}

impl PodIndex {
    /// An empty index for `node` of `cluster`, to be fed by `source`.
    pub fn new(cluster: impl Into<String>, node: impl Into<String>, source: PodSource) -> Self {
        Self::with_scope(cluster, Scope::Node(node.into()), source)
    }

    /// An empty index of every pod of `cluster`, fed by the API server.
    pub fn cluster_wide(cluster: impl Into<String>) -> Self {
        Self::with_scope(cluster, Scope::Cluster, PodSource::Api)
    }

    fn with_scope(cluster: impl Into<String>, scope: Scope, source: PodSource) -> Self {
        let streams = match source {
            PodSource::Api => vec![
                StreamStatus::new(Stream::Pods),
                StreamStatus::new(Stream::Namespaces),
            ],
            PodSource::Kubelet => vec![StreamStatus::new(Stream::Pods)],
        };
        Self {
            inner: Arc::new(Inner {
                cluster: cluster.into(),
                scope,
                source,
                state: RwLock::new(State::default()),
                status: Mutex::new(streams),
                generation: watch::Sender::new(0),
                refresh: Notify::new(),
                gauges: OnceLock::new(),
            }),
        }
    }

    /// Which pods this index holds.
    pub fn scope(&self) -> &Scope {
        &self.inner.scope
    }

    /// The node whose pods alone this index holds, if it holds one node's.
    fn only_node(&self) -> Option<&str> {
        match &self.inner.scope {
            Scope::Node(node) => Some(node),
            Scope::Cluster => None,
        }
    }

    /// Adds or replaces one pod (a watch `ADDED`/`MODIFIED`).
    pub fn apply_pod(&self, pod: &Pod) -> Result<(), PodRejected> {
        let entry = PodEntry::from_pod(pod, self.only_node());
        {
            let mut st = self.write();
            match entry {
                Ok(entry) => st.insert(entry),
                Err(rejected) => {
                    if let Some(uid) = pod.metadata.uid.as_deref() {
                        st.remove(uid);
                    }
                    st.note_foreign(&rejected);
                    drop(st);
                    self.changed();
                    return Err(rejected);
                }
            }
        }
        self.changed();
        Ok(())
    }

    /// Removes one pod (a watch `DELETED`).
    pub fn delete_pod(&self, pod: &Pod) {
        if let Some(uid) = pod.metadata.uid.as_deref() {
            let mut st = self.write();
            st.remove(uid);
            st.foreign.remove(uid);
        }
        self.changed();
    }

    /// Replaces every pod with a full list (a relist or a kubelet poll); marks pods synced.
    pub fn replace_pods(&self, pods: impl IntoIterator<Item = Pod>) -> Replaced {
        // Built outside the lock: lookups keep answering from the old set meanwhile.
        let mut next = State::default();
        let mut outcome = Replaced::default();
        for pod in pods {
            match PodEntry::from_pod(&pod, self.only_node()) {
                Ok(entry) => {
                    next.insert(entry);
                    outcome.indexed += 1;
                }
                Err(rejected) => {
                    // Counted in the outcome; the source logs one line per list, not per pod.
                    tracing::debug!(error = %rejected, "pod source delivered a pod the index refuses");
                    next.note_foreign(&rejected);
                    outcome.rejected += 1;
                }
            }
        }
        {
            let mut st = self.write();
            st.pods = next.pods;
            st.by_object = next.by_object;
            st.containers = next.containers;
            st.foreign = next.foreign;
            st.bytes = next.bytes;
            st.pods_synced = true;
        }
        self.set_synced(Stream::Pods);
        self.changed();
        outcome
    }

    /// Adds or replaces one namespace's labels.
    pub fn apply_namespace(&self, ns: &Namespace) {
        if let Some(name) = ns.metadata.name.as_deref() {
            let labels = Arc::new(ns.metadata.labels.clone().unwrap_or_default());
            self.write().namespaces.insert(name.into(), labels);
            self.changed();
        }
    }

    /// Forgets one namespace.
    pub fn delete_namespace(&self, ns: &Namespace) {
        if let Some(name) = ns.metadata.name.as_deref() {
            self.write().namespaces.remove(name);
            self.changed();
        }
    }

    /// Replaces every namespace with a full list; marks namespaces synced.
    pub fn replace_namespaces(&self, namespaces: impl IntoIterator<Item = Namespace>) {
        let next = namespaces
            .into_iter()
            .filter_map(|ns| {
                let name = ns.metadata.name?;
                Some((
                    name.into(),
                    Arc::new(ns.metadata.labels.unwrap_or_default()),
                ))
            })
            .collect();
        {
            let mut st = self.write();
            st.namespaces = next;
            st.namespaces_synced = true;
        }
        self.set_synced(Stream::Namespaces);
        self.changed();
    }

    /// Resolves a caller from its cgroup's pod UID and container ID, now. A node's index
    /// answers for its node; the cluster's for whichever node the pod runs on.
    pub fn lookup(&self, pod_uid: &str, container_id: &str) -> Result<K8sFacts, LookupError> {
        self.resolve(None, pod_uid, container_id)
    }

    /// Like `lookup`, and the pod must be scheduled on `node`.
    pub fn lookup_on(
        &self,
        node: &str,
        pod_uid: &str,
        container_id: &str,
    ) -> Result<K8sFacts, LookupError> {
        self.resolve(Some(node), pod_uid, container_id)
    }

    fn resolve(
        &self,
        on_node: Option<&str>,
        pod_uid: &str,
        container_id: &str,
    ) -> Result<K8sFacts, LookupError> {
        let container_id = strip_runtime_prefix(container_id);
        let st = self.read();
        if !st.pods_synced {
            return Err(LookupError::NotSynced("pod"));
        }
        // The container ID is indexed under another pod (a forged or stale cgroup path).
        let in_other_pod = || {
            let owner = st.containers.get(container_id)?;
            (**owner != *pod_uid).then(|| LookupError::ContainerInOtherPod {
                pod_uid: pod_uid.to_owned(),
                container_id: container_id.to_owned(),
                owner_uid: owner.to_string(),
            })
        };
        let all = match st.pods.get(pod_uid) {
            Some(entries) => entries,
            None => {
                if let Some(node) = st.foreign.get(pod_uid) {
                    return Err(LookupError::OtherNode {
                        pod_uid: pod_uid.to_owned(),
                        node: node.to_string(),
                    });
                }
                if let Some(e) = in_other_pod() {
                    return Err(e);
                }
                return Err(LookupError::PodUnknown {
                    pod_uid: pod_uid.to_owned(),
                });
            }
        };
        // Only pods on the asked-for node count: a pod elsewhere claiming the same kernel UID
        // (a mirror pod's annotation) can neither stand in for this one nor make it ambiguous.
        let entries: Vec<&PodEntry> = all
            .iter()
            .filter(|e| on_node.is_none_or(|n| *e.node == *n))
            .collect();
        let pod = match (entries.as_slice(), on_node) {
            ([pod], _) => *pod,
            ([], Some(expected)) => {
                let node = all.first().map(|e| e.node.to_string()).unwrap_or_default();
                return Err(match self.only_node() {
                    // A node's own index holds nothing of another node's.
                    Some(own) if own == expected => LookupError::OtherNode {
                        pod_uid: pod_uid.to_owned(),
                        node,
                    },
                    _ => LookupError::NotOnNode {
                        pod_uid: pod_uid.to_owned(),
                        node,
                        expected: expected.to_owned(),
                    },
                });
            }
            (more, _) => {
                return Err(LookupError::Ambiguous {
                    pod_uid: pod_uid.to_owned(),
                    count: more.len(),
                });
            }
        };
        let terminated = |what: String| LookupError::Terminated {
            pod_uid: pod_uid.to_owned(),
            namespace: pod.namespace.to_string(),
            pod_name: pod.name.to_string(),
            what,
        };
        if let Some(phase) = &pod.finished_phase {
            return Err(terminated(format!("the pod has finished (phase {phase})")));
        }
        let Some(container) = pod.containers.iter().find(|c| &*c.id == container_id) else {
            if let Some(e) = in_other_pod() {
                return Err(e);
            }
            return Err(LookupError::ContainerUnknown {
                pod_uid: pod_uid.to_owned(),
                namespace: pod.namespace.to_string(),
                pod_name: pod.name.to_string(),
                container_id: container_id.to_owned(),
            });
        };
        if container.terminated {
            return Err(terminated(format!(
                "container {} ({container_id}) has terminated",
                container.name
            )));
        }
        // The kubelet source knows no namespace labels; the API source must have them, or a
        // namespaceSelector would be judged against an empty set.
        let namespace_labels = match self.inner.source {
            PodSource::Kubelet => BTreeMap::new(),
            PodSource::Api => {
                if !st.namespaces_synced {
                    return Err(LookupError::NotSynced("namespace"));
                }
                match st.namespaces.get(&*pod.namespace) {
                    Some(labels) => (**labels).clone(),
                    None => {
                        return Err(LookupError::NamespaceUnknown {
                            pod_uid: pod_uid.to_owned(),
                            namespace: pod.namespace.to_string(),
                        });
                    }
                }
            }
        };
        Ok(K8sFacts {
            cluster: self.inner.cluster.clone(),
            node_name: pod.node.to_string(),
            namespace: pod.namespace.to_string(),
            namespace_labels,
            service_account: pod.service_account.to_string(),
            pod_name: pod.name.to_string(),
            pod_uid: pod.kernel_uid.to_string(),
            pod_labels: pod.labels.clone(),
            pod_annotations: pod.annotations.clone(),
            container_name: container.name.to_string(),
            container_id: container.id.to_string(),
            image: container.image.to_string(),
            image_digest: container.image_digest.as_deref().map(str::to_owned),
        })
    }

    /// Like `lookup`, but waits up to `timeout` for a pod or container not indexed yet (a
    /// container that just started). Woken by index updates; returns the last error on timeout.
    pub async fn wait_for(
        &self,
        pod_uid: &str,
        container_id: &str,
        timeout: Duration,
    ) -> Result<K8sFacts, LookupError> {
        self.wait_for_in(None, pod_uid, container_id, timeout).await
    }

    /// Like `wait_for`, and the pod must be scheduled on `node`.
    pub async fn wait_for_on(
        &self,
        node: &str,
        pod_uid: &str,
        container_id: &str,
        timeout: Duration,
    ) -> Result<K8sFacts, LookupError> {
        self.wait_for_in(Some(node), pod_uid, container_id, timeout)
            .await
    }

    async fn wait_for_in(
        &self,
        on_node: Option<&str>,
        pod_uid: &str,
        container_id: &str,
        timeout: Duration,
    ) -> Result<K8sFacts, LookupError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.inner.generation.subscribe();
        loop {
            // Marked seen before looking, so an update between the two is not missed.
            changes.borrow_and_update();
            let err = match self.resolve(on_node, pod_uid, container_id) {
                Ok(facts) => return Ok(facts),
                Err(e) if !e.may_resolve_later() => return Err(e),
                Err(e) => e,
            };
            self.request_refresh();
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                // Timed out (or, impossibly, the index is gone).
                _ => return Err(err),
            }
        }
    }

    /// Pods in the index.
    pub fn len(&self) -> usize {
        self.read().by_object.len()
    }

    /// Whether the index holds no pod.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Approximate heap and inline bytes per indexed pod (strings, labels, annotations, maps).
    pub fn approx_bytes_per_pod(&self) -> usize {
        let st = self.read();
        let n = st.by_object.len();
        if n == 0 {
            return 0;
        }
        // Three map slots per pod (pods, by_object, one container) on top of the entries.
        st.bytes / n + 3 * 48
    }

    /// The source's health and the index size.
    pub fn status(&self) -> K8sStatus {
        let pods = self.len();
        K8sStatus {
            source: self.inner.source,
            pods,
            streams: self.lock_status().clone(),
        }
    }

    /// Records a successful contact with the source for `stream`.
    pub fn report_ok(&self, stream: Stream) {
        let recovered = self
            .lock_status()
            .iter_mut()
            .find(|s| s.stream == stream)
            .is_some_and(|s| s.ok(SystemTime::now()));
        if recovered {
            tracing::info!(source = %self.inner.source, stream = stream.as_str(), "pod source reachable again");
        }
        self.update_gauges();
    }

    /// Records a failed contact; the index keeps serving what it knows.
    pub fn report_error(&self, stream: Stream, message: impl Into<String>) {
        let message = message.into();
        let news = self
            .lock_status()
            .iter_mut()
            .find(|s| s.stream == stream)
            .is_some_and(|s| s.error(SystemTime::now(), message.clone()));
        let pods = self.len();
        if news {
            tracing::warn!(source = %self.inner.source, stream = stream.as_str(), error = %message, pods, "pod source failing; serving known pods");
        } else {
            tracing::debug!(source = %self.inner.source, stream = stream.as_str(), error = %message, "pod source still failing");
        }
        self.update_gauges();
    }

    /// Exports `agentid_node_pod_index_pods` and `agentid_node_pod_source_up` through `metrics`.
    pub fn attach_metrics(&self, metrics: &NodeMetrics) {
        self.attach_gauges(
            metrics.pod_index_pods.clone(),
            metrics.pod_source_up.clone(),
        );
    }

    /// Keeps `pods` at the number of indexed pods and `source_up` at 1 while every stream of
    /// the source answers (0 otherwise).
    pub fn attach_gauges(&self, pods: Gauge, source_up: Gauge) {
        let _ = self.inner.gauges.set(Gauges { pods, source_up });
        self.update_gauges();
    }

    /// Asks a polling source to poll now (it rate-limits); a watching source ignores it.
    pub fn request_refresh(&self) {
        self.inner.refresh.notify_one();
    }

    /// Resolves when someone asked for an early poll.
    pub(crate) async fn refresh_requested(&self) {
        self.inner.refresh.notified().await;
    }

    fn set_synced(&self, stream: Stream) {
        for s in self.lock_status().iter_mut().filter(|s| s.stream == stream) {
            s.synced = true;
        }
    }

    /// Changes whenever the indexed pods or namespaces change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    fn changed(&self) {
        self.inner
            .generation
            .send_modify(|g| *g = g.wrapping_add(1));
        self.update_gauges();
    }

    fn update_gauges(&self) {
        if let Some(g) = self.inner.gauges.get() {
            g.pods.set(self.len() as i64);
            let up = self.lock_status().iter().all(|s| s.up);
            g.source_up.set(i64::from(up));
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than refusing to serve, so poisoning is ignored.
        self.inner
            .state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.inner
            .state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, Vec<StreamStatus>> {
        self.inner
            .status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    fn insert(&mut self, entry: PodEntry) {
        self.remove(&entry.uid);
        self.foreign.remove(&*entry.uid);
        for c in &entry.containers {
            self.containers
                .insert(c.id.clone(), entry.kernel_uid.clone());
        }
        self.by_object
            .insert(entry.uid.clone(), entry.kernel_uid.clone());
        self.bytes += entry.bytes;
        let slot = self.pods.entry(entry.kernel_uid.clone()).or_default();
        if !slot.is_empty() {
            tracing::warn!(
                uid = %entry.kernel_uid,
                pod = %format_args!("{}/{}", entry.namespace, entry.name),
                "two pods claim one UID; lookups of it are refused"
            );
        }
        slot.push(entry);
    }

    /// Removes the pod whose `metadata.uid` is `uid`, if indexed.
    fn remove(&mut self, uid: &str) {
        let Some(kernel_uid) = self.by_object.remove(uid) else {
            return;
        };
        let Some(slot) = self.pods.get_mut(&kernel_uid) else {
            return;
        };
        let Some(at) = slot.iter().position(|e| &*e.uid == uid) else {
            return;
        };
        let gone = slot.swap_remove(at);
        self.bytes = self.bytes.saturating_sub(gone.bytes);
        for c in &gone.containers {
            let still_claimed = slot
                .iter()
                .any(|e| e.containers.iter().any(|o| o.id == c.id));
            if !still_claimed && self.containers.get(&c.id) == Some(&kernel_uid) {
                self.containers.remove(&c.id);
            }
        }
        if slot.is_empty() {
            self.pods.remove(&kernel_uid);
        }
    }

    fn note_foreign(&mut self, rejected: &PodRejected) {
        if let PodRejected::OtherNode { uid, node, .. } = rejected
            && self.foreign.len() < MAX_FOREIGN
        {
            self.foreign
                .insert(uid.as_str().into(), node.as_str().into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::pod::{LAST_APPLIED_ANNOTATION, MIRROR_ANNOTATION};
    use k8s_openapi::api::core::v1::{
        Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
        ContainerStatus, EphemeralContainer, PodSpec, PodStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    const NODE: &str = "node-a";
    const UID: &str = "0b5c5e2a-6d5e-4c1e-9a7e-2f7b1d2c3e4f";
    const DIGEST_HEX: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn cid(n: u8) -> String {
        format!("{:02x}", n).repeat(32)
    }

    fn running(name: &str, id: &str) -> ContainerStatus {
        ContainerStatus {
            name: name.into(),
            container_id: Some(format!("containerd://{id}")),
            image: format!("docker.io/library/{name}:1.0"),
            image_id: format!("docker.io/library/{name}@sha256:{DIGEST_HEX}"),
            ready: true,
            state: Some(ContainerState {
                running: Some(ContainerStateRunning::default()),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        }
    }

    fn pod(uid: &str, name: &str, node: &str, container_id: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                uid: Some(uid.into()),
                name: Some(name.into()),
                namespace: Some("agents".into()),
                labels: Some([("app".to_owned(), name.to_owned())].into()),
                annotations: Some(
                    [
                        ("agentid.dev/model".to_owned(), "m-1".to_owned()),
                        (LAST_APPLIED_ANNOTATION.to_owned(), "{…}".to_owned()),
                    ]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                service_account_name: Some("agent".into()),
                containers: vec![Container {
                    name: "agent".into(),
                    image: Some("agent:1.0".into()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                container_statuses: Some(vec![running("agent", container_id)]),
                ..PodStatus::default()
            }),
        }
    }

    fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        }
    }

    /// An API-fed index, synced, with namespace `agents` and the given pods.
    fn index_with(pods: Vec<Pod>) -> PodIndex {
        let index = PodIndex::new("prod", NODE, PodSource::Api);
        index.replace_namespaces([namespace("agents", &[("team", "ml")])]);
        index.replace_pods(pods);
        index
    }

    #[test]
    fn lookup_fills_every_fact() {
        let index = index_with(vec![pod(UID, "agent-1", NODE, &cid(1))]);
        let facts = index.lookup(UID, &cid(1)).unwrap();
        assert_eq!(
            facts,
            K8sFacts {
                cluster: "prod".into(),
                node_name: NODE.into(),
                namespace: "agents".into(),
                namespace_labels: [("team".to_owned(), "ml".to_owned())].into(),
                service_account: "agent".into(),
                pod_name: "agent-1".into(),
                pod_uid: UID.into(),
                pod_labels: [("app".to_owned(), "agent-1".to_owned())].into(),
                pod_annotations: [("agentid.dev/model".to_owned(), "m-1".to_owned())].into(),
                container_name: "agent".into(),
                container_id: cid(1),
                image: "agent:1.0".into(),
                image_digest: Some(format!("sha256:{DIGEST_HEX}")),
            }
        );
        assert_eq!(index.len(), 1);
        assert!(index.approx_bytes_per_pod() > 0);
    }

    #[test]
    fn runtime_prefixes_are_stripped() {
        for (prefix, n) in [("containerd://", 1), ("cri-o://", 2), ("docker://", 3)] {
            let mut p = pod(UID, "p", NODE, "x");
            p.status
                .as_mut()
                .unwrap()
                .container_statuses
                .as_mut()
                .unwrap()[0]
                .container_id = Some(format!("{prefix}{}", cid(n)));
            let index = index_with(vec![p]);
            assert_eq!(index.lookup(UID, &cid(n)).unwrap().container_id, cid(n));
            // A caller passing the prefixed form is normalised the same way.
            assert!(index.lookup(UID, &format!("{prefix}{}", cid(n))).is_ok());
        }
    }

    #[test]
    fn other_node_pods_are_refused() {
        let index = index_with(vec![pod(UID, "elsewhere", "node-b", &cid(1))]);
        assert_eq!(
            index.lookup(UID, &cid(1)),
            Err(LookupError::OtherNode {
                pod_uid: UID.into(),
                node: "node-b".into()
            })
        );
        assert_eq!(index.len(), 0);
        // Through a watch event too, including a pod that later claims another node.
        let index = index_with(vec![pod(UID, "here", NODE, &cid(1))]);
        assert!(index.lookup(UID, &cid(1)).is_ok());
        let moved = pod(UID, "here", "node-b", &cid(1));
        assert!(matches!(
            index.apply_pod(&moved),
            Err(PodRejected::OtherNode { .. })
        ));
        assert!(matches!(
            index.lookup(UID, &cid(1)),
            Err(LookupError::OtherNode { .. })
        ));
        // Unscheduled pods are not this node's either.
        let mut unscheduled = pod("u-2", "pending", NODE, &cid(2));
        unscheduled.spec.as_mut().unwrap().node_name = None;
        assert!(matches!(
            index.apply_pod(&unscheduled),
            Err(PodRejected::OtherNode { .. })
        ));
    }

    #[test]
    fn apply_and_delete() {
        let index = index_with(vec![]);
        let p = pod(UID, "agent-1", NODE, &cid(1));
        assert!(matches!(
            index.lookup(UID, &cid(1)),
            Err(LookupError::PodUnknown { .. })
        ));
        index.apply_pod(&p).unwrap();
        assert!(index.lookup(UID, &cid(1)).is_ok());
        // A modification replaces the entry: the restarted container gets a new ID.
        let mut restarted = pod(UID, "agent-1", NODE, &cid(2));
        restarted
            .status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0]
            .last_state = Some(ContainerState {
            terminated: Some(ContainerStateTerminated {
                container_id: Some(format!("containerd://{}", cid(1))),
                exit_code: 1,
                ..ContainerStateTerminated::default()
            }),
            ..ContainerState::default()
        });
        index.apply_pod(&restarted).unwrap();
        assert!(index.lookup(UID, &cid(2)).is_ok());
        assert!(matches!(
            index.lookup(UID, &cid(1)),
            Err(LookupError::Terminated { .. })
        ));
        assert_eq!(index.len(), 1);
        index.delete_pod(&restarted);
        assert!(matches!(
            index.lookup(UID, &cid(2)),
            Err(LookupError::PodUnknown { .. })
        ));
        assert_eq!(index.len(), 0);
        assert!(index.read().containers.is_empty());
        assert_eq!(index.read().bytes, 0);
    }

    #[test]
    fn replace_drops_pods_not_listed() {
        let index = index_with(vec![
            pod(UID, "a", NODE, &cid(1)),
            pod("u-2", "b", NODE, &cid(2)),
        ]);
        assert_eq!(index.len(), 2);
        let outcome = index.replace_pods([
            pod("u-2", "b", NODE, &cid(2)),
            pod("u-3", "c", "node-b", &cid(3)),
        ]);
        assert_eq!(
            outcome,
            Replaced {
                indexed: 1,
                rejected: 1
            }
        );
        assert!(matches!(
            index.lookup(UID, &cid(1)),
            Err(LookupError::PodUnknown { .. })
        ));
        assert!(index.lookup("u-2", &cid(2)).is_ok());
    }

    #[test]
    fn init_and_ephemeral_containers() {
        let mut p = pod(UID, "p", NODE, &cid(1));
        let spec = p.spec.as_mut().unwrap();
        spec.init_containers = Some(vec![Container {
            name: "init".into(),
            image: Some("init:1".into()),
            ..Container::default()
        }]);
        spec.ephemeral_containers = Some(vec![EphemeralContainer {
            name: "debug".into(),
            image: Some("busybox:1".into()),
            ..EphemeralContainer::default()
        }]);
        let status = p.status.as_mut().unwrap();
        status.init_container_statuses = Some(vec![running("init", &cid(2))]);
        status.ephemeral_container_statuses = Some(vec![running("debug", &cid(3))]);
        let index = index_with(vec![p]);
        let init = index.lookup(UID, &cid(2)).unwrap();
        assert_eq!(
            (init.container_name.as_str(), init.image.as_str()),
            ("init", "init:1")
        );
        let debug = index.lookup(UID, &cid(3)).unwrap();
        assert_eq!(
            (debug.container_name.as_str(), debug.image.as_str()),
            ("debug", "busybox:1")
        );
    }

    #[test]
    fn container_errors_are_told_apart() {
        let mut waiting = pod("u-2", "b", NODE, "");
        waiting
            .status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0]
            .container_id = None;
        let index = index_with(vec![pod(UID, "a", NODE, &cid(1)), waiting]);
        assert!(matches!(
            index.lookup(UID, &cid(9)),
            Err(LookupError::ContainerUnknown { .. })
        ));
        assert!(matches!(
            index.lookup("u-2", &cid(1)),
            Err(LookupError::ContainerInOtherPod { owner_uid, .. }) if owner_uid == UID
        ));
        assert!(matches!(
            index.lookup("u-9", &cid(1)),
            Err(LookupError::ContainerInOtherPod { .. })
        ));
        assert!(matches!(
            index.lookup("u-9", &cid(9)),
            Err(LookupError::PodUnknown { .. })
        ));
    }

    #[test]
    fn terminated_containers_and_finished_pods() {
        let mut exited = pod(UID, "a", NODE, &cid(1));
        exited
            .status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0]
            .state = Some(ContainerState {
            terminated: Some(ContainerStateTerminated::default()),
            ..ContainerState::default()
        });
        let mut done = pod("u-2", "b", NODE, &cid(2));
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let index = index_with(vec![exited, done]);
        for (uid, id, want) in [
            (UID, cid(1), "container agent"),
            ("u-2", cid(2), "phase Succeeded"),
        ] {
            let err = index.lookup(uid, &id).unwrap_err();
            assert!(matches!(err, LookupError::Terminated { .. }), "{err}");
            assert!(err.to_string().contains(want), "{err}");
            assert!(!err.may_resolve_later());
        }
    }

    #[test]
    fn sync_and_namespaces() {
        let index = PodIndex::new("prod", NODE, PodSource::Api);
        assert_eq!(
            index.lookup(UID, &cid(1)),
            Err(LookupError::NotSynced("pod"))
        );
        index.replace_pods([pod(UID, "a", NODE, &cid(1))]);
        assert_eq!(
            index.lookup(UID, &cid(1)),
            Err(LookupError::NotSynced("namespace"))
        );
        index.replace_namespaces([namespace("other", &[])]);
        assert!(matches!(
            index.lookup(UID, &cid(1)),
            Err(LookupError::NamespaceUnknown { .. })
        ));
        index.apply_namespace(&namespace("agents", &[("tier", "1")]));
        assert_eq!(
            index.lookup(UID, &cid(1)).unwrap().namespace_labels,
            [("tier".to_owned(), "1".to_owned())].into()
        );
        index.delete_namespace(&namespace("agents", &[]));
        assert!(matches!(
            index.lookup(UID, &cid(1)),
            Err(LookupError::NamespaceUnknown { .. })
        ));

        // The kubelet source has no namespaces: labels are empty, nothing waits for them.
        let index = PodIndex::new("prod", NODE, PodSource::Kubelet);
        index.replace_pods([pod(UID, "a", NODE, &cid(1))]);
        assert!(
            index
                .lookup(UID, &cid(1))
                .unwrap()
                .namespace_labels
                .is_empty()
        );
        assert!(index.status().synced());
    }

    #[test]
    fn mirror_pods_resolve_by_the_static_uid_and_duplicates_are_refused() {
        let static_uid = "6c5d2b1f0e9a8b7c6d5e4f3a2b1c0d9e";
        let mut mirror = pod(UID, "etcd-node-a", NODE, &cid(1));
        mirror
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(MIRROR_ANNOTATION.into(), static_uid.into());
        let index = index_with(vec![mirror.clone()]);
        assert_eq!(
            index.lookup(static_uid, &cid(1)).unwrap().pod_uid,
            static_uid
        );
        // No process runs under the mirror pod's own UID.
        assert!(matches!(
            index.lookup(UID, &cid(1)),
            Err(LookupError::ContainerInOtherPod { .. })
        ));
        // Another pod claiming the same static UID makes it ambiguous, until it goes away.
        let mut impostor = mirror.clone();
        impostor.metadata.uid = Some("u-2".into());
        index.apply_pod(&impostor).unwrap();
        assert_eq!(
            index.lookup(static_uid, &cid(1)),
            Err(LookupError::Ambiguous {
                pod_uid: static_uid.into(),
                count: 2
            })
        );
        index.delete_pod(&impostor);
        assert!(index.lookup(static_uid, &cid(1)).is_ok());
    }

    #[test]
    fn a_cluster_index_holds_every_node_and_checks_the_one_asked_for() {
        let index = PodIndex::cluster_wide("prod");
        index.replace_namespaces([namespace("agents", &[])]);
        let mut unscheduled = pod("u-3", "pending", NODE, "");
        unscheduled.spec.as_mut().unwrap().node_name = None;
        index.replace_pods([
            pod(UID, "a", NODE, &cid(1)),
            pod("u-2", "b", "node-b", &cid(2)),
            unscheduled,
        ]);
        assert_eq!(index.len(), 3);
        let facts = index.lookup_on(NODE, UID, &cid(1)).unwrap();
        assert_eq!(facts.node_name, NODE);
        assert_eq!(index.lookup(UID, &cid(1)).unwrap(), facts);
        assert_eq!(
            index.lookup_on("node-b", "u-2", &cid(2)).unwrap().node_name,
            "node-b"
        );
        assert_eq!(
            index.lookup_on("node-b", UID, &cid(1)),
            Err(LookupError::NotOnNode {
                pod_uid: UID.into(),
                node: NODE.into(),
                expected: "node-b".into()
            })
        );
        assert!(matches!(
            index.lookup_on("node-b", "u-2", &cid(1)),
            Err(LookupError::ContainerInOtherPod { .. })
        ));
        assert!(matches!(
            index.lookup_on(NODE, "u-3", &cid(9)),
            Err(LookupError::NotOnNode { node, .. }) if node.is_empty()
        ));
        // A mirror pod on another node claiming this pod's UID is not a candidate.
        let mut mirror = pod("u-4", "mirror", "node-b", &cid(4));
        mirror
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(MIRROR_ANNOTATION.into(), UID.into());
        index.apply_pod(&mirror).unwrap();
        assert!(index.lookup_on(NODE, UID, &cid(1)).is_ok());
        assert!(matches!(
            index.lookup(UID, &cid(1)),
            Err(LookupError::Ambiguous { count: 2, .. })
        ));
    }

    #[test]
    fn malformed_pods_never_panic() {
        let index = index_with(vec![]);
        assert!(matches!(
            index.apply_pod(&Pod::default()),
            Err(PodRejected::NoUid { .. })
        ));
        let bare = Pod {
            metadata: ObjectMeta {
                uid: Some(UID.into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(NODE.into()),
                ..PodSpec::default()
            }),
            status: None,
        };
        index.apply_pod(&bare).unwrap();
        assert!(matches!(
            index.lookup(UID, &cid(1)),
            Err(LookupError::ContainerUnknown { .. })
        ));
        // A status without a spec, containers without IDs or images.
        let mut odd = pod("u-2", "b", NODE, &cid(2));
        odd.spec.as_mut().unwrap().containers.clear();
        odd.status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0]
            .image_id = "garbage@@".into();
        index.apply_pod(&odd).unwrap();
        let facts = index.lookup("u-2", &cid(2)).unwrap();
        assert_eq!(facts.image, "docker.io/library/agent:1.0");
        assert_eq!(facts.image_digest, None);
        assert_eq!(facts.service_account, "agent");
    }

    #[tokio::test]
    async fn wait_for_is_woken_by_a_later_add() {
        let index = index_with(vec![]);
        let feeder = index.clone();
        let add = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            feeder.apply_pod(&pod(UID, "late", NODE, &cid(1))).unwrap();
        });
        let facts = index
            .wait_for(UID, &cid(1), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(facts.pod_name, "late");
        add.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn wait_for_times_out_with_the_lookup_error() {
        let index = index_with(vec![pod(UID, "a", NODE, &cid(1))]);
        let start = tokio::time::Instant::now();
        assert!(matches!(
            index.wait_for("u-2", &cid(2), Duration::from_secs(3)).await,
            Err(LookupError::PodUnknown { .. })
        ));
        assert!(start.elapsed() >= Duration::from_secs(3));
        assert!(matches!(
            index.wait_for(UID, &cid(2), Duration::from_secs(3)).await,
            Err(LookupError::ContainerUnknown { .. })
        ));
        // Errors that no update can fix return at once.
        let other = index_with(vec![pod("u-3", "c", "node-b", &cid(3))]);
        let start = tokio::time::Instant::now();
        assert!(matches!(
            other.wait_for("u-3", &cid(3), Duration::from_secs(3)).await,
            Err(LookupError::OtherNode { .. })
        ));
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn unrelated_updates_do_not_end_the_wait_early() {
        let index = index_with(vec![]);
        let feeder = index.clone();
        tokio::spawn(async move {
            for n in 0..5u8 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                feeder
                    .apply_pod(&pod(&format!("other-{n}"), "o", NODE, &cid(10 + n)))
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            feeder.apply_pod(&pod(UID, "late", NODE, &cid(1))).unwrap();
        });
        let facts = index.wait_for(UID, &cid(1), Duration::from_secs(2)).await;
        assert_eq!(facts.unwrap().pod_name, "late");
    }

    #[test]
    fn status_and_metrics() {
        let metrics = NodeMetrics::unregistered();
        let index = PodIndex::new("prod", NODE, PodSource::Kubelet);
        index.attach_metrics(&metrics);
        assert_eq!(metrics.pod_source_up.get(), 0);
        index.replace_pods([pod(UID, "a", NODE, &cid(1))]);
        index.report_ok(Stream::Pods);
        assert_eq!(metrics.pod_index_pods.get(), 1);
        assert_eq!(metrics.pod_source_up.get(), 1);
        index.report_error(Stream::Pods, "HTTP 401 Unauthorized");
        assert_eq!(metrics.pod_source_up.get(), 0);
        let status = index.status();
        assert!(status.ready() && !status.up());
        assert!(
            status.summary().contains("HTTP 401"),
            "{}",
            status.summary()
        );
        assert!(status.summary().contains("serving 1 known pods"));
        assert!(index.lookup(UID, &cid(1)).is_ok());
    }
}
