//! Source B (`--pod-source kubelet`): polls this node's kubelet, `GET /pods` (a `PodList` of
//! the pods the kubelet runs), so the API server carries no load per node. The bearer token is
//! read from its file on every poll because projected tokens rotate. A caller that `wait_for`
//! cannot find yet triggers an early poll, at most one per `MIN_REPOLL`.
//!
//! The kubelet knows nothing about namespaces, so this source gives no namespace labels.
//! RBAC: `get` on `nodes/proxy` (which is how the kubelet authorises `/pods`).

use std::time::Duration;

use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::KubeletConfig;
use crate::k8s::status::Stream;
use crate::k8s::token::{TokenError, read_bearer};
use crate::k8s::{PodIndex, error_chain, pem_certificates};

/// Early polls asked for by `wait_for` come no closer together than this.
pub const MIN_REPOLL: Duration = Duration::from_millis(500);
/// A node runs at most a few hundred pods; anything far larger is not a pod list.
const MAX_BODY: usize = 64 << 20;

/// Why the kubelet client could not be built, or one poll failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("kubelet URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("reading kubelet CA file {path}: {source}")]
    ReadCa {
        path: String,
        source: std::io::Error,
    },
    #[error("kubelet CA: {0}")]
    Ca(String),
    #[error("building the kubelet client: {}", error_chain(.0))]
    Client(#[source] Box<kube::Error>),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("GET {url}: {}", error_chain(.source))]
    Request {
        url: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("GET {url}: no complete answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("GET {url}: HTTP {status}: the kubelet refused the token from {token_file}: {body}")]
    Unauthorized {
        url: String,
        status: StatusCode,
        token_file: String,
        body: String,
    },
    #[error("GET {url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: StatusCode,
        body: String,
    },
    #[error("GET {url}: reading the answer: {reason}")]
    Body { url: String, reason: String },
    #[error("GET {url}: the answer is not a PodList: {source}")]
    Decode {
        url: String,
        source: serde_json::Error,
    },
}

/// The client `config` asks for (no credentials: the token is added to each request).
pub fn client(config: &KubeletConfig) -> Result<Client, KubeletError> {
    let uri: http::Uri =
        config
            .url
            .parse()
            .map_err(|e: http::uri::InvalidUri| KubeletError::Url {
                url: config.url.clone(),
                reason: e.to_string(),
            })?;
    let mut kc = kube::Config::new(uri);
    if let Some(path) = &config.ca_file {
        let pem = std::fs::read(path).map_err(|source| KubeletError::ReadCa {
            path: path.display().to_string(),
            source,
        })?;
        kc.root_cert = Some(pem_certificates(&pem).map_err(KubeletError::Ca)?);
    }
    if config.insecure_skip_tls_verify {
        tracing::warn!(
            url = %config.url,
            "kubelet certificate NOT verified (insecure_skip_tls_verify): anyone able to \
             intercept this connection can feed the pod index"
        );
        kc.accept_invalid_certs = true;
    }
    kc.read_timeout = Some(config.request_timeout);
    kc.connect_timeout = Some(config.request_timeout);
    // The poll loop is the retry; a retried request would only delay the next poll.
    kc.default_retry = false;
    Client::try_from(kc).map_err(|e| KubeletError::Client(Box::new(e)))
}

/// One `GET /pods`, with a freshly read token.
pub async fn poll_once(client: &Client, config: &KubeletConfig) -> Result<Vec<Pod>, KubeletError> {
    let url = format!("{}/pods", config.url.trim_end_matches('/'));
    // Read on every poll: no client state to go stale when the token rotates.
    let bearer = read_bearer(&config.token_file)?;
    let request = Request::get("/pods")
        .header(header::AUTHORIZATION, bearer)
        .header(header::ACCEPT, "application/json")
        .body(Vec::new())
        .map_err(|e| KubeletError::Body {
            url: url.clone(),
            reason: e.to_string(),
        })?;
    let exchange = async {
        let response = client
            .send(request.map(kube::client::Body::from))
            .await
            .map_err(|source| KubeletError::Request {
                url: url.clone(),
                source: Box::new(source),
            })?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| KubeletError::Body {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        Ok::<_, KubeletError>((status, body))
    };
    let (status, body) = tokio::time::timeout(config.request_timeout, exchange)
        .await
        .map_err(|_| KubeletError::Timeout {
            url: url.clone(),
            timeout: config.request_timeout,
        })??;
    match status {
        StatusCode::OK => {}
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            return Err(KubeletError::Unauthorized {
                url,
                status,
                token_file: config.token_file.display().to_string(),
                body: excerpt(&body),
            });
        }
        _ => {
            return Err(KubeletError::Status {
                url,
                status,
                body: excerpt(&body),
            });
        }
    }
    // Only `items` matters; a kubelet's list carries its kind and version too.
    #[derive(serde::Deserialize)]
    struct PodList {
        items: Vec<Pod>,
    }
    serde_json::from_slice::<PodList>(&body)
        .map(|list| list.items)
        .map_err(|source| KubeletError::Decode { url, source })
}

/// Feeds `index` from the kubelet until `cancel`: a poll every `poll_interval`, or sooner when
/// a lookup misses.
pub async fn run(
    client: Client,
    config: KubeletConfig,
    index: PodIndex,
    cancel: CancellationToken,
) {
    loop {
        let started = Instant::now();
        match poll_once(&client, &config).await {
            Ok(pods) => {
                let outcome = index.replace_pods(pods);
                if outcome.rejected > 0 {
                    tracing::warn!(
                        rejected = outcome.rejected,
                        "kubelet listed pods of another node; they were refused"
                    );
                }
                index.report_ok(Stream::Pods);
            }
            Err(e) => index.report_error(Stream::Pods, e.to_string()),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep_until(started + config.poll_interval) => {}
            () = index.refresh_requested() => {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep_until(started + MIN_REPOLL) => {}
                }
            }
        }
    }
}

/// The start of an error body, for a status line.
fn excerpt(body: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.chars().count() <= MAX {
        text.to_owned()
    } else {
        let mut s: String = text.chars().take(MAX).collect();
        s.push('…');
        s
    }
}
