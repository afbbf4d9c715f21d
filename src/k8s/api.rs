//! The API server: its client (explicit URL, CA and token file, or inferred), and kube's
//! watcher feeding a pod index. A node's index watches pods with the field selector
//! `spec.nodeName=<node>`, so the API server sends only that node's pods; the server's index
//! watches every pod. Namespaces are watched for their labels.
//!
//! On an error the index keeps what it has (known pods still resolve), the stream is marked
//! down, and after kube's default backoff the watch restarts with a fresh list. Restarting
//! with a list, rather than letting the watcher resume silently, is what tells us the source
//! is back (a resumed watch that carries no event is invisible), and it repairs anything missed
//! meanwhile.
//!
//! kube's own retry of 429/503/504 answers is turned off: it backs off up to 15 times (minutes
//! in all) before a watch error surfaces, during which the status would claim the source is up.
//! The watch loop's backoff is the retry.
//!
//! RBAC: `list` and `watch` on `pods` (all namespaces) and `namespaces`.

use std::fmt::Debug;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::client::ClientBuilder;
use kube::runtime::watcher::{self, DefaultBackoff, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::index::{PodIndex, Scope};
use super::status::Stream;
use super::token::{BearerTokenFile, TokenError};
use super::{check_url, error_chain, pem_certificates};

/// How to reach the API server. All unset: `kube::Config::infer()` (kubeconfig, then in-cluster).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// API server URL; when set, `ca_file` (for https) and `token_file` are used instead of
    /// inference.
    pub url: Option<String>,
    /// PEM bundle of the CAs that sign the API server's certificate.
    pub ca_file: Option<PathBuf>,
    /// Bearer token file, re-read on every request (tokens rotate).
    pub token_file: Option<PathBuf>,
}

/// What is wrong with an `ApiConfig`; each names the key (`url`, `ca_file`, `token_file`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiConfigError {
    #[error("{0} is only used together with url")]
    WithoutUrl(&'static str),
    #[error("ca_file is required for an https url")]
    NoCa,
    #[error("url {url:?}: {reason}")]
    Url { url: String, reason: String },
}

impl ApiConfig {
    /// Checks that the keys make sense together.
    pub fn validate(&self) -> Result<(), ApiConfigError> {
        let Some(url) = &self.url else {
            if self.ca_file.is_some() {
                return Err(ApiConfigError::WithoutUrl("ca_file"));
            }
            if self.token_file.is_some() {
                return Err(ApiConfigError::WithoutUrl("token_file"));
            }
            return Ok(());
        };
        let scheme = check_url(url).map_err(|reason| ApiConfigError::Url {
            url: url.clone(),
            reason,
        })?;
        // Plain http only makes sense for `kubectl proxy` on loopback; allowed, not encouraged.
        if scheme == "https" && self.ca_file.is_none() {
            return Err(ApiConfigError::NoCa);
        }
        Ok(())
    }
}

/// Why the API client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("finding the API server (kubeconfig, then in-cluster service account): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("API server URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("reading API server CA file {path}: {source}")]
    ReadCa {
        path: String,
        source: std::io::Error,
    },
    #[error("API server CA: {0}")]
    Ca(String),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("building the API client: {}", error_chain(.0))]
    Client(#[source] kube::Error),
}

/// The client `config` asks for: explicit URL, CA and token file, or inferred.
pub async fn client(config: &ApiConfig) -> Result<Client, ApiError> {
    let Some(url) = &config.url else {
        let mut inferred = kube::Config::infer().await?;
        inferred.default_retry = false;
        return Client::try_from(inferred).map_err(ApiError::Client);
    };
    let ca_pem = match &config.ca_file {
        Some(path) => Some(std::fs::read(path).map_err(|source| ApiError::ReadCa {
            path: path.display().to_string(),
            source,
        })?),
        None => None,
    };
    client_for(url, ca_pem.as_deref(), config.token_file.as_deref())
}

/// A client for the API server at `url`, trusting the CAs in `ca_pem` (`None`: plain http),
/// authenticating with the bearer token in `token_file` (re-read on every request).
pub fn client_for(
    url: &str,
    ca_pem: Option<&[u8]>,
    token_file: Option<&Path>,
) -> Result<Client, ApiError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| ApiError::Url {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
    let mut config = kube::Config::new(uri);
    config.default_retry = false;
    if let Some(pem) = ca_pem {
        config.root_cert = Some(pem_certificates(pem).map_err(ApiError::Ca)?);
    }
    let token = token_file.map(BearerTokenFile::open).transpose()?;
    let builder = ClientBuilder::try_from(config).map_err(ApiError::Client)?;
    Ok(match token {
        Some(token) => builder.with_layer(&token.layer()).build(),
        None => builder.build(),
    })
}

/// Feeds `index` from the API server until `cancel`: the pods of its scope, and namespaces.
pub async fn run(client: Client, index: PodIndex, cancel: CancellationToken) {
    let pod_config = match index.scope() {
        Scope::Node(node) => watcher::Config::default().fields(&format!("spec.nodeName={node}")),
        Scope::Cluster => watcher::Config::default(),
    };
    let pods = watch::<Pod>(Api::all(client.clone()), pod_config, &index, &cancel);
    let namespaces = watch::<Namespace>(
        Api::all(client),
        watcher::Config::default(),
        &index,
        &cancel,
    );
    tokio::join!(pods, namespaces);
}

/// A kind of object the index is fed with.
trait Fed: Resource + Clone + DeserializeOwned + Debug + Send + 'static {
    const STREAM: Stream;
    fn replace(index: &PodIndex, all: Vec<Self>);
    fn apply(index: &PodIndex, obj: &Self);
    fn delete(index: &PodIndex, obj: &Self);
}

impl Fed for Pod {
    const STREAM: Stream = Stream::Pods;
    fn replace(index: &PodIndex, all: Vec<Self>) {
        let outcome = index.replace_pods(all);
        if outcome.rejected > 0 {
            tracing::warn!(
                rejected = outcome.rejected,
                "API server listed pods the index refuses (another node despite the field \
                 selector, or no UID)"
            );
        }
        tracing::debug!(indexed = outcome.indexed, "pods listed");
    }
    fn apply(index: &PodIndex, pod: &Self) {
        if let Err(e) = index.apply_pod(pod) {
            tracing::warn!(error = %e, "API server sent a pod the index refuses");
        }
    }
    fn delete(index: &PodIndex, pod: &Self) {
        index.delete_pod(pod);
    }
}

impl Fed for Namespace {
    const STREAM: Stream = Stream::Namespaces;
    fn replace(index: &PodIndex, all: Vec<Self>) {
        index.replace_namespaces(all);
    }
    fn apply(index: &PodIndex, ns: &Self) {
        index.apply_namespace(ns);
    }
    fn delete(index: &PodIndex, ns: &Self) {
        index.delete_namespace(ns);
    }
}

async fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    index: &PodIndex,
    cancel: &CancellationToken,
) where
    K: Fed,
    K::DynamicType: Default,
{
    // Not reset after a good list: if lists succeed and watches fail, relisting at the
    // minimum delay would hammer the API server. It resets itself after two quiet minutes.
    let mut backoff = DefaultBackoff::default();
    loop {
        let mut events = watcher::watcher(api.clone(), config.clone()).boxed();
        // A relist is applied at once at its end, so lookups never see half a list.
        let mut listed: Vec<K> = Vec::new();
        let error = loop {
            let next = tokio::select! {
                () = cancel.cancelled() => return,
                next = events.next() => next,
            };
            match next {
                Some(Ok(Event::Init)) => listed.clear(),
                Some(Ok(Event::InitApply(obj))) => listed.push(obj),
                Some(Ok(Event::InitDone)) => {
                    K::replace(index, std::mem::take(&mut listed));
                    index.report_ok(K::STREAM);
                }
                Some(Ok(Event::Apply(obj))) => {
                    K::apply(index, &obj);
                    index.report_ok(K::STREAM);
                }
                Some(Ok(Event::Delete(obj))) => {
                    K::delete(index, &obj);
                    index.report_ok(K::STREAM);
                }
                Some(Err(e)) => break describe(&e),
                None => break "watch stream ended".to_owned(),
            }
        };
        index.report_error(K::STREAM, error);
        let delay = backoff.next().unwrap_or(std::time::Duration::from_secs(30));
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// A watcher error on one line: an API server's refusal as its HTTP status and message
/// (kube's own text repeats the whole `Status` object).
fn describe(e: &watcher::Error) -> String {
    let (step, inner) = match e {
        watcher::Error::InitialListFailed(inner) => ("list", inner),
        watcher::Error::WatchStartFailed(inner) => ("watch start", inner),
        watcher::Error::WatchFailed(inner) => ("watch", inner),
        watcher::Error::WatchError(status) => return format!("watch: {}", api_status(status)),
        watcher::Error::NoResourceVersion => return e.to_string(),
    };
    match inner {
        kube::Error::Api(status) => format!("{step}: {}", api_status(status)),
        other => format!("{step}: {}", error_chain(other)),
    }
}

fn api_status(status: &kube::core::Status) -> String {
    let reason = http::StatusCode::from_u16(status.code)
        .ok()
        .and_then(|c| c.canonical_reason())
        .unwrap_or(status.reason.as_str());
    if status.message.is_empty() || status.message == reason {
        format!("HTTP {} {reason}", status.code)
    } else {
        format!("HTTP {} {reason}: {}", status.code, status.message)
    }
}
