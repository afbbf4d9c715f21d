//! A stand-in Kubernetes API server and kubelet: real HTTPS (rustls with a throwaway CA) and the
//! real wire formats (k8s-openapi JSON lists, newline-delimited `WatchEvent`s, `Status` errors,
//! a kubelet `PodList`), served from a shared, mutable store.
//!
//! Pods and namespaces: `GET /api/v1/pods` and `GET /api/v1/namespaces`, each as a list (with
//! `metadata.resourceVersion`, `limit`/`continue`) or, with `watch=true`, as a watch from
//! `resourceVersion` (ADDED/MODIFIED/DELETED, BOOKMARK when `allowWatchBookmarks=true`);
//! `fieldSelector=spec.nodeName=<node>` is honoured, and without it every pod of the cluster is
//! served. `GET /api/v1/namespaces/<ns>/pods/<name>` reads one pod. The test changes them
//! (`add_pod`, `put_namespace`, …); the API does not write them.
//!
//! Generic namespaced objects, stored as the JSON the client sent (plus what the server sets),
//! read and written through the API with a real API server's semantics:
//! - `secrets` and `configmaps` (core v1): `/api/v1/namespaces/<ns>/<plural>[/<name>]`, and
//!   `/api/v1/<plural>` to list or watch every namespace;
//! - `leases` (`coordination.k8s.io/v1`):
//!   `/apis/coordination.k8s.io/v1/namespaces/<ns>/leases[/<name>]` (and `…/v1/leases`);
//! - `agentidentities` (`agentid.dev/v1alpha1`, kind `AgentIdentity`, a custom resource):
//!   `/apis/agentid.dev/v1alpha1/namespaces/<ns>/agentidentities[/<name>]`, and
//!   `/apis/agentid.dev/v1alpha1/agentidentities` across namespaces.
//!
//! Their verbs:
//! - `GET` one: the object, or 404 `NotFound` with `details: {name, group, kind: <plural>}`.
//! - `GET` the collection: a `<Kind>List` with the store's `resourceVersion`, `limit`/`continue`
//!   paging; with `watch=true`, a watch as for pods.
//! - `POST` the collection: 201 with the stored object; the server sets `resourceVersion`,
//!   `uid`, `creationTimestamp`, the namespace from the path (and `generation` for the custom
//!   resource); `generateName` works. 409 `AlreadyExists`; 400 `BadRequest` for a body that is
//!   not such an object or names another namespace; 422 `Invalid` without a name or with one
//!   that is not a DNS subdomain; 500 when the body carries a `resourceVersion` (as the real
//!   one does).
//! - `PUT` one: 200 with the stored object under a new `resourceVersion` (MODIFIED); a body
//!   whose `metadata.resourceVersion` is not the stored one gets 409 `Conflict` ("the object has
//!   been modified; …"), one without a `resourceVersion` replaces unconditionally; 404 when
//!   absent (no create-on-update), 400 when the body's name differs from the URL's. A PUT that
//!   changes nothing keeps the `resourceVersion` and emits no event, as etcd does.
//! - `DELETE` one: 200 with a `Status` `Success` (the deleted object for the custom resource),
//!   DELETED; 404 when absent; `DeleteOptions.preconditions` (`resourceVersion`, `uid`) give 409.
//! - `PATCH`: 405 (not implemented here).
//!
//! `dryRun=All` validates and answers without storing; `fieldManager` is accepted and ignored.
//! Secrets: `stringData` is folded into `data`, whose values must be base64 (400 otherwise),
//! and `type` defaults to `Opaque`. Namespaces need not exist. Finalizers, `immutable`, status
//! subresources and server-side apply are not modelled.
//!
//! Selectors, on lists and watches alike: `fieldSelector` terms `metadata.name`,
//! `metadata.namespace` (and `spec.nodeName` for pods) with `=`, `==` or `!=`; `labelSelector`
//! terms `k=v`, `k==v`, `k!=v`, `k`, `!k`; comma-separated terms all have to hold. Anything
//! else is a 400.
//!
//! Every change, pods and namespaces included, takes the next number of one resourceVersion
//! counter and goes into one event log that watches read. After `compact`, a watch from an
//! older resourceVersion gets an `ERROR` event with a 410 `Expired` `Status`, as from a real
//! API server whose watch cache has moved on.
//!
//! `POST /apis/authentication.k8s.io/v1/tokenreviews` answers a `TokenReview` with the status
//! the test configured for its token (`set_token_review`; an unknown token is not
//! authenticated). `GET /pods` is the kubelet's list of the pods on `kubelet_node`.
//!
//! Every request needs `Authorization: Bearer <token>` (401 otherwise). `set_down` refuses
//! connections and ends watches, `set_garbage` makes reads answer malformed JSON (and writes
//! too, without storing anything), and `fail_writes` makes the writes to one object fail with a
//! chosen status. `writes` lists every write request to a generic object with the status it got.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStatus, Namespace, Pod, PodSpec,
    PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

mod list_watch;
mod objects;
mod selector;

use list_watch::{list_response, watch_response};
use objects::{ObjKey, Resource, Route};
use selector::{Field, Meta, Selector};

/// Query parameters this stand-in understands (what kube's get, list, watch and writes send).
const KNOWN_PARAMS: &[&str] = &[
    "fieldSelector",
    "labelSelector",
    "limit",
    "continue",
    "resourceVersion",
    "resourceVersionMatch",
    "watch",
    "timeoutSeconds",
    "allowWatchBookmarks",
    "sendInitialEvents",
    "dryRun",
    "fieldManager",
];

/// How often an idle watch with bookmarks allowed gets one (a real API server: about a minute).
const BOOKMARK_EVERY: Duration = Duration::from_millis(500);

/// The running stand-in; stops when dropped.
pub struct StandIn {
    /// `https://127.0.0.1:<port>`: the API server and the kubelet both.
    pub url: String,
    /// The CA that signed the server certificate (for `127.0.0.1` and `localhost`).
    pub ca_pem: String,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

struct Shared {
    store: Mutex<Store>,
    /// Bumped on every change to the store or the switches, waking open watches.
    changed: watch::Sender<u64>,
    down: AtomicBool,
    garbage: AtomicBool,
    ignore_node_filter: AtomicBool,
    token: Mutex<String>,
    kubelet_node: String,
    requests: Mutex<Vec<String>>,
    unknown_params: Mutex<BTreeSet<String>>,
    /// What a TokenReview of each token answers.
    reviews: Mutex<BTreeMap<String, TokenReviewStatus>>,
    /// Every TokenReview asked for: (token, spec.audiences).
    reviewed: Mutex<Vec<(String, Vec<String>)>>,
    /// Every write to a generic object: `METHOD plural namespace/name status`.
    writes: Mutex<Vec<String>>,
    /// (plural, name) whose writes fail with this status code.
    failing: Mutex<BTreeMap<(String, String), u16>>,
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// The log holds no event at or below this resourceVersion (see `compact`).
    compacted: u64,
    pods: BTreeMap<String, Pod>,
    namespaces: BTreeMap<String, Namespace>,
    objects: BTreeMap<ObjKey, Value>,
    events: Vec<Event>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pods,
    Namespaces,
    Object(&'static Resource),
}

impl Kind {
    fn api_version(self) -> String {
        match self {
            Kind::Pods | Kind::Namespaces => "v1".to_owned(),
            Kind::Object(res) => res.api_version(),
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::Pods => "Pod",
            Kind::Namespaces => "Namespace",
            Kind::Object(res) => res.kind,
        }
    }
}

struct Event {
    rv: u64,
    kind: Kind,
    /// What selectors look at.
    meta: Meta,
    /// The whole `{"type": …, "object": …}` line.
    line: String,
}

impl Store {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn emit(&mut self, rv: u64, kind: Kind, ty: &str, object: &Value) {
        self.events.push(Event {
            rv,
            kind,
            meta: Meta::of(object),
            line: event_line(ty, object),
        });
    }

    /// The objects of `kind` that `selector` picks, in list order, each with its `continue`
    /// key.
    fn snapshot(&self, kind: Kind, selector: &Selector) -> Vec<(String, Value)> {
        let all: Vec<(String, Value)> = match kind {
            Kind::Pods => self
                .pods
                .iter()
                .map(|(k, p)| (k.clone(), serde_json::to_value(p).unwrap_or_default()))
                .collect(),
            Kind::Namespaces => self
                .namespaces
                .iter()
                .map(|(k, n)| (k.clone(), serde_json::to_value(n).unwrap_or_default()))
                .collect(),
            Kind::Object(res) => self
                .objects
                .iter()
                .filter(|(k, _)| k.plural == res.plural)
                .map(|(k, v)| (format!("{}/{}", k.namespace, k.name), v.clone()))
                .collect(),
        };
        all.into_iter()
            .filter(|(_, v)| selector.matches(&Meta::of(v)))
            .collect()
    }
}

/// Continue keys compare as (namespace, name); keys without a `/` (pod UIDs, namespace names)
/// as ("", key).
fn key_order(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or(("", key))
}

impl StandIn {
    /// Starts serving on `127.0.0.1:0`, accepting `token`; the kubelet endpoint lists the pods
    /// of `kubelet_node`.
    pub async fn start(token: &str, kubelet_node: &str) -> StandIn {
        let (ca_pem, server_config) = tls();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changed: watch::Sender::new(0),
            down: AtomicBool::new(false),
            garbage: AtomicBool::new(false),
            ignore_node_filter: AtomicBool::new(false),
            token: Mutex::new(token.to_owned()),
            kubelet_node: kubelet_node.to_owned(),
            requests: Mutex::new(Vec::new()),
            unknown_params: Mutex::new(BTreeSet::new()),
            reviews: Mutex::new(BTreeMap::new()),
            reviewed: Mutex::new(Vec::new()),
            writes: Mutex::new(Vec::new()),
            failing: Mutex::new(BTreeMap::new()),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                if s.down.load(Ordering::SeqCst) {
                    // Unreachable: the connection is closed before the TLS handshake.
                    drop(tcp);
                    continue;
                }
                let acceptor = acceptor.clone();
                let app = app.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                        .await;
                });
            }
        });
        StandIn {
            url,
            ca_pem,
            shared,
            accept,
        }
    }

    /// Writes the CA and a token file into `dir`; returns (CA path, token path).
    pub fn write_files(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let ca = dir.join("ca.pem");
        let token = dir.join("token");
        std::fs::write(&ca, &self.ca_pem).unwrap();
        std::fs::write(&token, format!("{}\n", self.shared.token.lock().unwrap())).unwrap();
        (ca, token)
    }

    /// Adds a pod (a watch sees ADDED).
    pub fn add_pod(&self, pod: Pod) {
        self.put_pod(pod, "ADDED");
    }

    /// Replaces a pod with the same UID (a watch sees MODIFIED).
    pub fn update_pod(&self, pod: Pod) {
        self.put_pod(pod, "MODIFIED");
    }

    /// Deletes the pod with `uid` (a watch sees DELETED).
    pub fn delete_pod(&self, uid: &str) {
        {
            let mut st = self.shared.store.lock().unwrap();
            let mut pod = st.pods.remove(uid).expect("no such pod");
            let rv = st.next_rv();
            pod.metadata.resource_version = Some(rv.to_string());
            st.emit(
                rv,
                Kind::Pods,
                "DELETED",
                &serde_json::to_value(&pod).unwrap(),
            );
        }
        self.shared.bump();
    }

    /// Adds or replaces a namespace.
    pub fn put_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        {
            let mut st = self.shared.store.lock().unwrap();
            let rv = st.next_rv();
            let ns = Namespace {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    uid: Some(uuid::Uuid::new_v4().to_string()),
                    resource_version: Some(rv.to_string()),
                    labels: Some(
                        labels
                            .iter()
                            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                            .collect(),
                    ),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            };
            let ty = if st.namespaces.contains_key(name) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            st.emit(
                rv,
                Kind::Namespaces,
                ty,
                &serde_json::to_value(&ns).unwrap(),
            );
            st.namespaces.insert(name.to_owned(), ns);
        }
        self.shared.bump();
    }

    /// Forgets the event log up to now, as a real API server's watch cache does with time: a
    /// watch from an older resourceVersion (or an open one that has not caught up) gets an
    /// `ERROR` event with a 410 `Expired` `Status` and ends, and must list again.
    pub fn compact(&self) {
        {
            let mut st = self.shared.store.lock().unwrap();
            st.compacted = st.rv;
            st.events.clear();
        }
        self.shared.bump();
    }

    /// The current resourceVersion (of the last change to anything).
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().unwrap().rv
    }

    /// Down: new connections are closed at once, requests on open ones get 503, and open
    /// watches end.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        self.shared.bump();
    }

    /// Answers lists and reads with malformed JSON and ends watches with a malformed line;
    /// writes to generic objects are answered with malformed JSON and not stored.
    pub fn set_garbage(&self, garbage: bool) {
        self.shared.garbage.store(garbage, Ordering::SeqCst);
        self.shared.bump();
    }

    /// Misbehave: serve every pod whatever the field selector (API) or node (kubelet).
    pub fn set_ignore_node_filter(&self, ignore: bool) {
        self.shared
            .ignore_node_filter
            .store(ignore, Ordering::SeqCst);
        self.shared.bump();
    }

    /// Accept `token` from now on (and no other).
    pub fn set_token(&self, token: &str) {
        *self.shared.token.lock().unwrap() = token.to_owned();
    }

    /// A TokenReview of `token` answers `status` from now on.
    pub fn set_token_review(&self, token: &str, status: TokenReviewStatus) {
        self.shared
            .reviews
            .lock()
            .unwrap()
            .insert(token.to_owned(), status);
    }

    /// Every TokenReview so far: (token, the audiences it asked for).
    pub fn reviewed(&self) -> Vec<(String, Vec<String>)> {
        self.shared.reviewed.lock().unwrap().clone()
    }

    /// Every request so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Query parameters seen that this stand-in does not understand.
    pub fn unknown_params(&self) -> BTreeSet<String> {
        self.shared.unknown_params.lock().unwrap().clone()
    }

    fn put_pod(&self, mut pod: Pod, ty: &'static str) {
        let uid = pod.metadata.uid.clone().expect("pod without uid");
        {
            let mut st = self.shared.store.lock().unwrap();
            assert_eq!(
                st.pods.contains_key(&uid),
                ty == "MODIFIED",
                "{ty} of pod {uid}"
            );
            let rv = st.next_rv();
            pod.metadata.resource_version = Some(rv.to_string());
            st.emit(rv, Kind::Pods, ty, &serde_json::to_value(&pod).unwrap());
            st.pods.insert(uid, pod);
        }
        self.shared.bump();
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.accept.abort();
        // Ends open watches too.
        self.set_down(true);
    }
}

impl Shared {
    fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }
}

/// A pod as the API server returns it for a running single-container agent.
pub fn make_pod(name: &str, namespace: &str, node: &str) -> Pod {
    let uid = uuid::Uuid::new_v4().to_string();
    let container_id = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let digest = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    Pod {
        metadata: ObjectMeta {
            uid: Some(uid),
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            generate_name: Some(format!("{name}-")),
            labels: Some(
                [
                    ("app".to_owned(), name.to_owned()),
                    ("agentid.dev/model".to_owned(), "model-a".to_owned()),
                ]
                .into(),
            ),
            annotations: Some(
                [(
                    "agentid.dev/config".to_owned(),
                    "sha256:0123456789abcdef".to_owned(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_owned()),
            service_account_name: Some("agent".to_owned()),
            containers: vec![Container {
                name: "agent".to_owned(),
                image: Some("docker.io/library/agent:1.0".to_owned()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".to_owned()),
            host_ip: Some("10.0.0.7".to_owned()),
            pod_ip: Some("10.244.1.23".to_owned()),
            container_statuses: Some(vec![ContainerStatus {
                name: "agent".to_owned(),
                container_id: Some(format!("containerd://{container_id}")),
                image: "docker.io/library/agent:1.0".to_owned(),
                image_id: format!("docker.io/library/agent@sha256:{digest}"),
                ready: true,
                started: Some(true),
                state: Some(ContainerState {
                    running: Some(ContainerStateRunning::default()),
                    ..ContainerState::default()
                }),
                ..ContainerStatus::default()
            }]),
            ..PodStatus::default()
        }),
    }
}

/// What the API server answers for a genuine projected service-account token of
/// `namespace/account`, bound to `pod`, reviewed for `audiences`: the pod's name and UID as
/// user extras, and its node's name when `with_node` (Kubernetes ≥ 1.30 adds it).
pub fn bound_token_review(
    namespace: &str,
    account: &str,
    audiences: &[&str],
    pod: &Pod,
    with_node: bool,
) -> TokenReviewStatus {
    let mut extra: BTreeMap<String, Vec<String>> = [
        (
            "authentication.kubernetes.io/pod-name",
            pod.metadata.name.clone().unwrap(),
        ),
        ("authentication.kubernetes.io/pod-uid", pod_uid(pod)),
        (
            "authentication.kubernetes.io/credential-id",
            format!("JTI={}", uuid::Uuid::new_v4()),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), vec![v]))
    .collect();
    if with_node {
        let node = pod.spec.as_ref().unwrap().node_name.clone().unwrap();
        extra.insert("authentication.kubernetes.io/node-name".into(), vec![node]);
    }
    TokenReviewStatus {
        authenticated: Some(true),
        audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
        user: Some(UserInfo {
            username: Some(format!("system:serviceaccount:{namespace}:{account}")),
            uid: Some(uuid::Uuid::new_v4().to_string()),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ]),
            extra: Some(extra),
        }),
        error: None,
    }
}

/// What the API server answers for a token it does not accept.
pub fn refused_token_review(error: &str) -> TokenReviewStatus {
    TokenReviewStatus {
        authenticated: Some(false),
        error: Some(error.to_owned()),
        ..TokenReviewStatus::default()
    }
}

/// The pod's UID.
pub fn pod_uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap()
}

/// The first container's ID without its runtime prefix, as the cgroup path names it.
pub fn container_id(pod: &Pod) -> String {
    let status = &pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0];
    let id = status.container_id.as_deref().unwrap();
    id.split_once("://").unwrap().1.to_owned()
}

/// The `sha256:<hex>` in the first container's `imageID`.
pub fn image_digest(pod: &Pod) -> String {
    let status = &pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0];
    status.image_id.rsplit_once('@').unwrap().1.to_owned()
}

fn event_line<T: serde::Serialize>(ty: &str, object: &T) -> String {
    let mut line = json!({"type": ty, "object": object}).to_string();
    line.push('\n');
    line
}

fn status_json(code: u16, reason: &str, message: &str) -> Response {
    status_with_details(code, reason, message, None)
}

/// A failure `Status` as the API server sends it.
fn status_with_details(code: u16, reason: &str, message: &str, details: Option<Value>) -> Response {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(details) = details {
        body["details"] = details;
    }
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn bad_request(message: &str) -> Response {
    status_json(400, "BadRequest", message)
}

/// `POST /apis/authentication.k8s.io/v1/tokenreviews`: the configured answer for the token.
async fn token_review(s: &Shared, req: Request) -> Response {
    let Ok(body) = axum::body::to_bytes(req.into_body(), 1 << 20).await else {
        return status_json(400, "BadRequest", "unreadable body");
    };
    let mut review: TokenReview = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return status_json(400, "BadRequest", &format!("not a TokenReview: {e}")),
    };
    let token = review.spec.token.clone().unwrap_or_default();
    let audiences = review.spec.audiences.clone().unwrap_or_default();
    s.reviewed.lock().unwrap().push((token.clone(), audiences));
    let status = s
        .reviews
        .lock()
        .unwrap()
        .get(&token)
        .cloned()
        .unwrap_or_else(|| refused_token_review("invalid bearer token"));
    // The API server does not echo the token back.
    review.spec.token = None;
    review.status = Some(status);
    let mut body = serde_json::to_value(&review).unwrap_or_default();
    body["apiVersion"] = json!("authentication.k8s.io/v1");
    body["kind"] = json!("TokenReview");
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `GET /api/v1/namespaces/<ns>/pods/<name>`.
fn get_pod(s: &Shared, namespace: &str, name: &str) -> Response {
    let st = s.store.lock().unwrap();
    let found = st.pods.values().find(|p| {
        p.metadata.namespace.as_deref() == Some(namespace)
            && p.metadata.name.as_deref() == Some(name)
    });
    match found {
        Some(pod) => {
            let mut body = serde_json::to_value(pod).unwrap_or_default();
            body["apiVersion"] = json!("v1");
            body["kind"] = json!("Pod");
            json_response(&body.to_string())
        }
        None => status_json(404, "NotFound", &format!("pods \"{name}\" not found")),
    }
}

/// 503 while down, 401 without the token (the kubelet answers in plain text, the API server
/// with a Status).
fn refusal(s: &Shared, req: &Request, kubelet: bool) -> Option<Response> {
    if s.down.load(Ordering::SeqCst) {
        return Some(status_json(
            503,
            "ServiceUnavailable",
            "the stand-in is down",
        ));
    }
    let want = format!("Bearer {}", s.token.lock().unwrap());
    let authorized = req
        .headers()
        .get(header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == want.as_bytes());
    if authorized {
        None
    } else if kubelet {
        Some((StatusCode::UNAUTHORIZED, "Unauthorized\n").into_response())
    } else {
        Some(status_json(401, "Unauthorized", "Unauthorized"))
    }
}

/// Parses the query and notes the parameters this stand-in does not know.
fn query_params(s: &Shared, path: &str, query: &str) -> Vec<(String, String)> {
    let params = parse_query(query);
    for (k, _) in &params {
        if !KNOWN_PARAMS.contains(&k.as_str()) {
            eprintln!("k8s stand-in: unknown query parameter {k:?} in {path}?{query}");
            s.unknown_params.lock().unwrap().insert(k.clone());
        }
    }
    params
}

async fn handle(State(s): State<Arc<Shared>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    s.requests
        .lock()
        .unwrap()
        .push(format!("{} {}", req.method(), req.uri()));
    if let Some(route) = Route::parse(&path) {
        return objects::serve(&s, req, route, &path, &query).await;
    }
    let kubelet = path == "/pods";
    if let Some(refused) = refusal(&s, &req, kubelet) {
        return refused;
    }
    if req.method() == Method::POST && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        return token_review(&s, req).await;
    }
    if req.method() != Method::GET {
        return status_json(405, "MethodNotAllowed", "only GET is served");
    }
    if let Some(rest) = path.strip_prefix("/api/v1/namespaces/")
        && let Some((namespace, name)) = rest.split_once("/pods/")
    {
        return get_pod(&s, namespace, name);
    }
    let params = query_params(&s, &path, &query);
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let kind = match path.as_str() {
        "/api/v1/pods" => Kind::Pods,
        "/api/v1/namespaces" => Kind::Namespaces,
        "/pods" => return kubelet_pods(&s),
        _ => return status_json(404, "NotFound", &format!("{path} is not served here")),
    };
    let mut selector = match Selector::parse(kind, &param) {
        Ok(selector) => selector,
        Err(e) => return bad_request(&e),
    };
    if s.ignore_node_filter.load(Ordering::SeqCst) {
        selector.fields.retain(|t| t.field != Field::Node);
    }
    if is_watch(&param) {
        watch_response(&s, kind, selector, &param)
    } else {
        list_response(&s, kind, &selector, &param)
    }
}

fn is_watch<'a>(param: &impl Fn(&str) -> Option<&'a str>) -> bool {
    matches!(param("watch"), Some("true" | "1"))
}

fn kubelet_pods(s: &Shared) -> Response {
    if s.garbage.load(Ordering::SeqCst) {
        return json_response("<html>not a pod list</html>");
    }
    let all = s.ignore_node_filter.load(Ordering::SeqCst);
    let st = s.store.lock().unwrap();
    let items: Vec<&Pod> = st
        .pods
        .values()
        .filter(|p| all || pod_node(p) == Some(s.kubelet_node.as_str()))
        .collect();
    // The kubelet's list carries no resourceVersion.
    let body = json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items});
    json_response(&body.to_string())
}

fn json_response(body: &str) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_owned(),
    )
        .into_response()
}

fn pod_node(p: &Pod) -> Option<&str> {
    p.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

/// `a=b&c=d%3De` → [(a, b), (c, d=e)], decoding `%XX` and `+` as form encoding does.
fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A CA and a server certificate for 127.0.0.1 and localhost signed by it.
fn tls() -> (String, rustls::ServerConfig) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "k8s stand-in CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    let server_cert = params.signed_by(&server_key, &issuer).unwrap();

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![server_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        )
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (ca_cert.pem(), config)
}
