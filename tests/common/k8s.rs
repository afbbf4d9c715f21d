//! A stand-in Kubernetes API server and kubelet: real HTTPS (rustls with a throwaway CA) and the
//! real wire formats (k8s-openapi JSON lists, newline-delimited `WatchEvent`s, a kubelet
//! `PodList`), served from a shared, mutable set of pods and namespaces.
//!
//! Paths: `GET /api/v1/pods` and `GET /api/v1/namespaces`, each as a list (with
//! `metadata.resourceVersion`, `limit`/`continue`) or, with `watch=true`, as a watch from
//! `resourceVersion` (ADDED/MODIFIED/DELETED, BOOKMARK when `allowWatchBookmarks=true`);
//! `fieldSelector=spec.nodeName=<node>` is honoured, and without it every pod of the cluster is
//! served. `GET /api/v1/namespaces/<ns>/pods/<name>` reads one pod. `POST
//! /apis/authentication.k8s.io/v1/tokenreviews` answers a `TokenReview` with the status the
//! test configured for its token (`set_token_review`; an unknown token is not authenticated).
//! `GET /pods` is the kubelet's list of the pods on `kubelet_node`. Every request needs
//! `Authorization: Bearer <token>` (401 otherwise).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
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

/// Query parameters this stand-in understands (what kube's list and watch send).
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
}

#[derive(Default)]
struct Store {
    rv: u64,
    pods: BTreeMap<String, Pod>,
    namespaces: BTreeMap<String, Namespace>,
    events: Vec<Event>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pods,
    Namespaces,
}

struct Event {
    rv: u64,
    kind: Kind,
    /// `spec.nodeName` of a pod, for the field selector.
    node: Option<String>,
    /// The whole `{"type": …, "object": …}` line.
    line: String,
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
            st.rv += 1;
            let rv = st.rv;
            pod.metadata.resource_version = Some(rv.to_string());
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            st.events.push(Event {
                rv,
                kind: Kind::Pods,
                node,
                line: event_line("DELETED", &pod),
            });
        }
        self.shared.bump();
    }

    /// Adds or replaces a namespace.
    pub fn put_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        {
            let mut st = self.shared.store.lock().unwrap();
            st.rv += 1;
            let rv = st.rv;
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
            st.events.push(Event {
                rv,
                kind: Kind::Namespaces,
                node: None,
                line: event_line(ty, &ns),
            });
            st.namespaces.insert(name.to_owned(), ns);
        }
        self.shared.bump();
    }

    /// Down: new connections are closed at once, requests on open ones get 503, and open
    /// watches end.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        self.shared.bump();
    }

    /// Answers lists with malformed JSON and ends watches with a malformed line.
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
            st.rv += 1;
            let rv = st.rv;
            pod.metadata.resource_version = Some(rv.to_string());
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            st.events.push(Event {
                rv,
                kind: Kind::Pods,
                node,
                line: event_line(ty, &pod),
            });
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
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    (
        StatusCode::from_u16(code).unwrap(),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
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
    let mut body = serde_json::to_value(&review).unwrap();
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
            let mut body = serde_json::to_value(pod).unwrap();
            body["apiVersion"] = json!("v1");
            body["kind"] = json!("Pod");
            json_response(&body.to_string())
        }
        None => status_json(404, "NotFound", &format!("pods \"{name}\" not found")),
    }
}

async fn handle(State(s): State<Arc<Shared>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    s.requests
        .lock()
        .unwrap()
        .push(format!("{} {}", req.method(), req.uri()));
    let kubelet = path == "/pods";
    if s.down.load(Ordering::SeqCst) {
        return status_json(503, "ServiceUnavailable", "the stand-in is down");
    }
    let want = format!("Bearer {}", s.token.lock().unwrap());
    let authorized = req
        .headers()
        .get(header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == want.as_bytes());
    if !authorized {
        // The kubelet answers in plain text, the API server with a Status.
        return if kubelet {
            (StatusCode::UNAUTHORIZED, "Unauthorized\n").into_response()
        } else {
            status_json(401, "Unauthorized", "Unauthorized")
        };
    }
    if req.method() == axum::http::Method::POST
        && path == "/apis/authentication.k8s.io/v1/tokenreviews"
    {
        return token_review(&s, req).await;
    }
    if req.method() != axum::http::Method::GET {
        return status_json(405, "MethodNotAllowed", "only GET is served");
    }
    if let Some(rest) = path.strip_prefix("/api/v1/namespaces/")
        && let Some((namespace, name)) = rest.split_once("/pods/")
    {
        return get_pod(&s, namespace, name);
    }
    let params = parse_query(&query);
    for (k, _) in &params {
        if !KNOWN_PARAMS.contains(&k.as_str()) {
            eprintln!("k8s stand-in: unknown query parameter {k:?} in {path}?{query}");
            s.unknown_params.lock().unwrap().insert(k.clone());
        }
    }
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if param("labelSelector").is_some_and(|l| !l.is_empty()) {
        return status_json(400, "BadRequest", "labelSelector is not supported here");
    }
    let node = match param("fieldSelector").filter(|f| !f.is_empty()) {
        None => None,
        Some(f) => match f.strip_prefix("spec.nodeName=") {
            Some(node) if !node.contains(',') => Some(node.to_owned()),
            _ => {
                return status_json(
                    400,
                    "BadRequest",
                    &format!("unsupported fieldSelector {f:?}"),
                );
            }
        },
    };
    let node = node.filter(|_| !s.ignore_node_filter.load(Ordering::SeqCst));
    let kind = match path.as_str() {
        "/api/v1/pods" => Kind::Pods,
        "/api/v1/namespaces" => {
            if node.is_some() {
                return status_json(400, "BadRequest", "namespaces have no spec.nodeName");
            }
            Kind::Namespaces
        }
        "/pods" => return kubelet_pods(&s),
        _ => return status_json(404, "NotFound", &format!("{path} is not served here")),
    };
    if param("watch") == Some("true") {
        watch_response(&s, kind, node, &param)
    } else {
        list_response(&s, kind, node.as_deref(), &param)
    }
}

fn list_response<'a>(
    s: &Shared,
    kind: Kind,
    node: Option<&str>,
    param: &impl Fn(&str) -> Option<&'a str>,
) -> Response {
    if s.garbage.load(Ordering::SeqCst) {
        return json_response("{\"kind\":\"PodList\",\"items\":[{\"metadata\":");
    }
    let limit: usize = param("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let after = param("continue").unwrap_or_default().to_owned();
    let st = s.store.lock().unwrap();
    let objects: Vec<(String, Value)> = match kind {
        Kind::Pods => st
            .pods
            .iter()
            .filter(|(_, p)| node.is_none() || pod_node(p) == node)
            .map(|(k, p)| (k.clone(), serde_json::to_value(p).unwrap()))
            .collect(),
        Kind::Namespaces => st
            .namespaces
            .iter()
            .map(|(k, n)| (k.clone(), serde_json::to_value(n).unwrap()))
            .collect(),
    };
    let mut rest = objects
        .into_iter()
        .filter(|(k, _)| after.is_empty() || *k > after)
        .peekable();
    let mut items = Vec::new();
    let mut last = String::new();
    while items.len() < limit {
        let Some((k, v)) = rest.next() else { break };
        last = k;
        items.push(v);
    }
    let continue_token = if rest.peek().is_some() {
        last
    } else {
        String::new()
    };
    let list_kind = match kind {
        Kind::Pods => "PodList",
        Kind::Namespaces => "NamespaceList",
    };
    let body = json!({
        "kind": list_kind,
        "apiVersion": "v1",
        "metadata": {"resourceVersion": st.rv.to_string(), "continue": continue_token},
        "items": items,
    });
    json_response(&body.to_string())
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

struct WatchState {
    s: Arc<Shared>,
    kind: Kind,
    node: Option<String>,
    cursor: u64,
    pending: VecDeque<String>,
    changes: watch::Receiver<u64>,
    deadline: tokio::time::Instant,
    bookmarks: bool,
    done: bool,
}

fn watch_response<'a>(
    s: &Arc<Shared>,
    kind: Kind,
    node: Option<String>,
    param: &impl Fn(&str) -> Option<&'a str>,
) -> Response {
    let timeout = param("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .unwrap_or(1800u64);
    let bookmarks = param("allowWatchBookmarks") == Some("true");
    let initial_events = param("sendInitialEvents") == Some("true");
    let mut pending = VecDeque::new();
    let st = s.store.lock().unwrap();
    // "0" or none: start now, with the current objects as ADDED (as the API server does).
    let cursor = match param("resourceVersion").filter(|rv| !rv.is_empty() && *rv != "0") {
        Some(rv) => match rv.parse::<u64>() {
            Ok(rv) => rv,
            Err(_) => {
                return status_json(400, "BadRequest", &format!("bad resourceVersion {rv:?}"));
            }
        },
        None => {
            match kind {
                Kind::Pods => pending.extend(
                    st.pods
                        .values()
                        .filter(|p| node.is_none() || pod_node(p) == node.as_deref())
                        .map(|p| event_line("ADDED", p)),
                ),
                Kind::Namespaces => {
                    pending.extend(st.namespaces.values().map(|n| event_line("ADDED", n)));
                }
            }
            if initial_events {
                pending.push_back(bookmark_line(
                    kind,
                    st.rv,
                    &[("k8s.io/initial-events-end", "true")],
                ));
            }
            st.rv
        }
    };
    drop(st);
    let state = WatchState {
        s: s.clone(),
        kind,
        node,
        cursor,
        pending,
        changes: s.changed.subscribe(),
        deadline: tokio::time::Instant::now() + Duration::from_secs(timeout),
        bookmarks,
        done: false,
    };
    let stream = futures::stream::unfold(state, |mut w| async move {
        loop {
            if let Some(line) = w.pending.pop_front() {
                return Some((Ok::<Bytes, Infallible>(Bytes::from(line)), w));
            }
            if w.done || w.s.down.load(Ordering::SeqCst) {
                return None;
            }
            if w.s.garbage.load(Ordering::SeqCst) {
                w.pending
                    .push_back("{\"type\":\"ADDED\",\"object\":[1,2\n".to_owned());
                w.done = true;
                continue;
            }
            w.changes.borrow_and_update();
            {
                let st = w.s.store.lock().unwrap();
                let seen = w.cursor;
                for ev in st.events.iter().filter(|e| e.rv > seen) {
                    w.cursor = ev.rv;
                    if ev.kind == w.kind
                        && (w.node.is_none() || ev.node.as_deref() == w.node.as_deref())
                    {
                        w.pending.push_back(ev.line.clone());
                    }
                }
                // Keep the cursor at the store's version even when no event matched.
                w.cursor = w.cursor.max(st.rv);
            }
            if !w.pending.is_empty() {
                continue;
            }
            tokio::select! {
                _ = w.changes.changed() => {}
                () = tokio::time::sleep(BOOKMARK_EVERY), if w.bookmarks => {
                    w.pending.push_back(bookmark_line(w.kind, w.cursor, &[]));
                }
                () = tokio::time::sleep_until(w.deadline) => return None,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn bookmark_line(kind: Kind, rv: u64, annotations: &[(&str, &str)]) -> String {
    let kind = match kind {
        Kind::Pods => "Pod",
        Kind::Namespaces => "Namespace",
    };
    let annotations: BTreeMap<&str, &str> = annotations.iter().copied().collect();
    let mut line = json!({
        "type": "BOOKMARK",
        "object": {
            "kind": kind,
            "apiVersion": "v1",
            "metadata": {"resourceVersion": rv.to_string(), "annotations": annotations},
        },
    })
    .to_string();
    line.push('\n');
    line
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
