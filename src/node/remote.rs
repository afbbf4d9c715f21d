//! The node daemon's link to `agentid server`: node attestation, the node SVID and its
//! renewal, the policy and bundle stream, and signing requests (the remote `SvidIssuer`).
//!
//! The node SVID and its key are kept in the state directory (0600), so a restarted node
//! renews instead of needing a new join token. When the server is unreachable the node keeps
//! serving what it has (cached SVIDs until they expire, the last bundles and policies) and
//! reconnects with capped exponential backoff and jitter.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint, Uri};

use super::issuer::{
    IssueError, JwtRequest, SvidIssuer, TaskTokenError, TaskTokenOp, TaskTokenRequest,
    TrustBundles, X509Request,
};
use crate::api::convert;
use crate::api::node as pb;
use crate::api::node::node_client::NodeClient;
use crate::crypto::PrivateKey;
use crate::crypto::tls::{self, Accept, Identity, Trust};
use crate::crypto::x509::{CertInfo, to_pem};
use crate::policy::{PolicySet, PolicySource, from_sources};
use crate::spiffe::{SpiffeBundle, SpiffeId, TrustDomain};
use crate::token::{self, Issued};

/// Shortest and longest wait between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long one call to the server may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const SVID_FILE: &str = "node-svid.pem";
const KEY_FILE: &str = "node-svid.key";

/// How the node proves itself the first time.
#[derive(Clone)]
pub enum NodeCredential {
    /// A single-use join token (hosts).
    JoinToken(String),
    /// A file holding a projected service-account token (Kubernetes nodes), re-read each time.
    K8sTokenFile(PathBuf),
}

impl std::fmt::Debug for NodeCredential {
    // A join token is a secret until it is used: never in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::JoinToken(_) => f.write_str("JoinToken(<redacted>)"),
            Self::K8sTokenFile(p) => write!(f, "K8sTokenFile({})", p.display()),
        }
    }
}

/// Where the server is and how to trust it.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// `https://host:port`.
    pub server: String,
    pub trust_domain: TrustDomain,
    /// The bundle the node bootstraps trust from (`agentid bundle export`).
    pub server_bundle: SpiffeBundle,
    pub credential: NodeCredential,
    pub node_name: String,
    /// Private directory for the node SVID and key.
    pub state_dir: PathBuf,
}

/// Why the node could not join its server.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("server address {0:?}: expected https://HOST:PORT")]
    Address(String),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("node attestation refused by the server: {0}")]
    Refused(String),
    #[error("server unreachable: {0}")]
    Unreachable(String),
    #[error("state directory {path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    Credential {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the server's answer: {0}")]
    BadAnswer(String),
}

/// What the server last said, and when, for readiness and metrics.
#[derive(Debug, Default)]
pub struct SyncStatus {
    /// Unix seconds of the last message on the sync stream (0: never).
    pub last_sync: AtomicI64,
    /// Unix seconds since the stream has been down (0: up).
    pub down_since: AtomicI64,
    /// Expiry of the node SVID, Unix seconds.
    pub node_svid_expiry: AtomicI64,
}

/// The remote issuer: every signing request goes to the server over mTLS.
pub struct RemoteIssuer {
    client: NodeClient<Channel>,
    reissue: watch::Receiver<u64>,
    bundles: watch::Receiver<Arc<TrustBundles>>,
    own_bundle: Arc<Mutex<Arc<SpiffeBundle>>>,
    pub status: Arc<SyncStatus>,
}

impl RemoteIssuer {
    /// Attests (or reuses a stored node SVID), connects, and waits for the first policies
    /// and bundle. Returns the issuer and the policies the server sends, kept current.
    pub async fn connect(
        config: RemoteConfig,
    ) -> Result<(Self, watch::Receiver<Arc<PolicySet>>), RemoteError> {
        let servers = parse_servers(&config.server)?;
        let server_id: SpiffeId = format!("{}/agentid/server", config.trust_domain.id_string())
            .parse()
            .map_err(|_| RemoteError::Address(config.server.clone()))?;
        let accept_server = Accept::new(move |id| id == &server_id);
        let trust = Trust::new(&config.server_bundle)?;
        std::fs::create_dir_all(&config.state_dir)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&config.state_dir, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|source| RemoteError::State {
                path: config.state_dir.clone(),
                source,
            })?;

        let attestor = Attestor {
            config: config.clone(),
            servers: servers.clone(),
            trust: trust.clone(),
            accept: accept_server.clone(),
        };
        let (chain, key, bundle) = match load_node_svid(&config.state_dir) {
            Some((chain, key)) => (chain, key, config.server_bundle.clone()),
            None => attestor.attest().await?,
        };
        trust.replace(&bundle)?;
        let identity = Identity::new(&chain, &key)?;
        let mtls = tls::client_config(Some(identity.clone()), trust.clone(), accept_server)?;
        let client = NodeClient::new(channel(servers, mtls));
        let status = Arc::new(SyncStatus::default());
        status
            .node_svid_expiry
            .store(expiry(&chain), Ordering::Relaxed);

        let own = Arc::new(bundle);
        let td = config.trust_domain.clone();
        let (bundle_tx, bundle_rx) = watch::channel(Arc::new(TrustBundles {
            trust_domain: td.clone(),
            own: own.clone(),
            federated: Default::default(),
        }));
        let own_bundle = Arc::new(Mutex::new(own));
        let (policy_tx, policy_rx) = watch::channel(Arc::new(PolicySet::default()));
        let (reissue_tx, reissue_rx) = watch::channel(0);
        let sync = Sync {
            reissue: reissue_tx,
            epoch_seen: None,
            client: client.clone(),
            td,
            trust: trust.clone(),
            bundles: bundle_tx,
            own_bundle: own_bundle.clone(),
            policies: policy_tx,
            status: status.clone(),
        };
        // The first state is needed before anything can be served.
        let mut first = sync.policies.subscribe();
        tokio::spawn(sync.run());
        first
            .changed()
            .await
            .map_err(|_| RemoteError::Unreachable("sync ended".into()))?;
        // A join token is single use; a service-account token file holds a fresh token.
        let reattest = matches!(config.credential, NodeCredential::K8sTokenFile(_));
        tokio::spawn(renew(
            client.clone(),
            identity,
            config.state_dir.clone(),
            chain,
            status.clone(),
            reattest.then_some(attestor),
        ));
        Ok((
            Self {
                client,
                reissue: reissue_rx,
                bundles: bundle_rx,
                own_bundle,
                status,
            },
            policy_rx,
        ))
    }
}

/// Node attestation: the credential presented on a connection without a client certificate.
#[derive(Clone)]
struct Attestor {
    config: RemoteConfig,
    servers: Arc<[String]>,
    trust: Trust,
    accept: Accept,
}

impl Attestor {
    /// Attests with the configured credential (a token file is read now, so a rotated token is
    /// used) and stores the new node SVID; returns its chain, key and the trust bundle.
    async fn attest(&self) -> Result<(Vec<Vec<u8>>, Vec<u8>, SpiffeBundle), RemoteError> {
        let config = &self.config;
        let plain = tls::client_config(None, self.trust.clone(), self.accept.clone())?;
        let mut client = NodeClient::new(channel(self.servers.clone(), plain));
        let key = PrivateKey::generate().map_err(|e| RemoteError::BadAnswer(e.to_string()))?;
        let credential = match &config.credential {
            NodeCredential::JoinToken(t) => pb::attest_request::Credential::JoinToken(t.clone()),
            NodeCredential::K8sTokenFile(path) => {
                let token =
                    std::fs::read_to_string(path).map_err(|source| RemoteError::Credential {
                        path: path.clone(),
                        source,
                    })?;
                pb::attest_request::Credential::K8sServiceAccountToken(token.trim().to_owned())
            }
        };
        let svid = client
            .attest(pb::AttestRequest {
                credential: Some(credential),
                public_key: key.spki_der(),
                node_name: config.node_name.clone(),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::Unavailable | tonic::Code::Unknown => {
                    RemoteError::Unreachable(s.message().to_owned())
                }
                _ => RemoteError::Refused(s.message().to_owned()),
            })?
            .into_inner();
        let bundle = SpiffeBundle::from_json(&svid.bundle)
            .map_err(|e| RemoteError::BadAnswer(e.to_string()))?;
        store_node_svid(&config.state_dir, &svid.cert_chain, &key.pkcs8_der())?;
        tracing::info!(node = %svid.spiffe_id, "node attested");
        Ok((svid.cert_chain, key.pkcs8_der(), bundle))
    }
}

/// `https://host:port` → `host:port`.
fn parse_server(s: &str) -> Result<String, RemoteError> {
    let bad = || RemoteError::Address(s.to_owned());
    let uri: Uri = s.trim().parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("https") {
        return Err(bad());
    }
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(bad)?;
    // An IPv6 host keeps its brackets: `[::1]:8081` is what a socket address parser reads.
    Ok(format!("{host}:{}", uri.port_u16().unwrap_or(443)))
}

/// One or more comma-separated `https://host:port` addresses → `host:port` each.
fn parse_servers(s: &str) -> Result<Arc<[String]>, RemoteError> {
    let servers = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(parse_server)
        .collect::<Result<Vec<_>, _>>()?;
    if servers.is_empty() {
        return Err(RemoteError::Address(s.to_owned()));
    }
    Ok(servers.into())
}

/// A lazily connecting channel to the server(s) at `server` (one or more comma-separated
/// `https://host:port`) speaking TLS with `config`.
pub fn server_channel(server: &str, config: rustls::ClientConfig) -> Result<Channel, RemoteError> {
    Ok(channel(parse_servers(server)?, config))
}

/// A lazily connecting channel that speaks TLS with `config` to the first of `servers` that
/// answers, starting from the one that answered last: when a server goes away, tonic
/// reconnects and the next one is tried (failover across replicas).
fn channel(servers: Arc<[String]>, config: rustls::ClientConfig) -> Channel {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let last_good = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // The URI is a placeholder: the connector dials `servers` and checks the SPIFFE ID.
    Endpoint::from_static("http://agentid-server")
        .timeout(CALL_TIMEOUT)
        .connect_timeout(CALL_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let (connector, servers, last_good) =
                (connector.clone(), servers.clone(), last_good.clone());
            async move {
                let start = last_good.load(Ordering::Relaxed);
                let mut failure = None;
                for i in 0..servers.len() {
                    let at = (start + i) % servers.len();
                    match connect(&connector, &servers[at]).await {
                        Ok(tls) => {
                            if at != start {
                                tracing::info!(server = %servers[at], "connected to another server replica");
                            }
                            last_good.store(at, Ordering::Relaxed);
                            return Ok(TokioIo::new(tls));
                        }
                        Err(e) => {
                            tracing::debug!(server = %servers[at], error = %e, "server unreachable");
                            failure = Some(std::io::Error::new(e.kind(), format!("{}: {e}", servers[at])));
                        }
                    }
                }
                Err(failure.unwrap_or_else(|| std::io::Error::other("no server address")))
            }
        }))
}

/// A TLS connection to `addr` (`host:port`), each step bounded by the call timeout so one
/// silent replica does not hold up the others.
async fn connect(
    connector: &tokio_rustls::TlsConnector,
    addr: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
    let per_server = CALL_TIMEOUT / 2;
    let tcp = tokio::time::timeout(per_server, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| timed_out())??;
    let _ = tcp.set_nodelay(true);
    // Not checked: the verifier checks the server's SPIFFE ID instead.
    let name =
        rustls::pki_types::ServerName::try_from("agentid-server").map_err(std::io::Error::other)?;
    tokio::time::timeout(per_server, connector.connect(name, tcp))
        .await
        .map_err(|_| timed_out())?
}

fn expiry(chain: &[Vec<u8>]) -> i64 {
    chain
        .first()
        .and_then(|c| CertInfo::parse(c).ok())
        .and_then(|i| i.not_after.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs() as i64)
}

/// The stored node SVID, if there is one that is still valid for a while.
fn load_node_svid(dir: &Path) -> Option<(Vec<Vec<u8>>, Vec<u8>)> {
    let pem_text = std::fs::read(dir.join(SVID_FILE)).ok()?;
    let chain: Vec<Vec<u8>> = pem::parse_many(&pem_text)
        .ok()?
        .into_iter()
        .map(pem::Pem::into_contents)
        .collect();
    let key = pem::parse(std::fs::read(dir.join(KEY_FILE)).ok()?)
        .ok()?
        .into_contents();
    let remaining = expiry(&chain) - time::OffsetDateTime::now_utc().unix_timestamp();
    (remaining > 60).then_some((chain, key))
}

fn store_node_svid(dir: &Path, chain: &[Vec<u8>], key: &[u8]) -> Result<(), RemoteError> {
    let err = |source| RemoteError::State {
        path: dir.to_owned(),
        source,
    };
    let write = |name: &str, data: &[u8]| -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))
    };
    // Key first: a certificate without its key would be useless after a crash.
    write(
        KEY_FILE,
        pem::encode(&pem::Pem::new("PRIVATE KEY", key.to_vec())).as_bytes(),
    )
    .map_err(err)?;
    write(SVID_FILE, to_pem(chain).as_bytes()).map_err(err)
}

/// Keeps the bundles and policies current from the server's sync stream.
struct Sync {
    client: NodeClient<Channel>,
    td: TrustDomain,
    trust: Trust,
    bundles: watch::Sender<Arc<TrustBundles>>,
    own_bundle: Arc<Mutex<Arc<SpiffeBundle>>>,
    policies: watch::Sender<Arc<PolicySet>>,
    status: Arc<SyncStatus>,
    reissue: watch::Sender<u64>,
    /// The server's reissue epoch last seen (None: no message yet).
    epoch_seen: Option<u64>,
}

impl Sync {
    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.stream().await {
                Ok(()) => backoff = BACKOFF_MIN,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "server sync interrupted")
                }
            }
            if self.bundles.is_closed() && self.policies.is_closed() {
                return;
            }
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let _ = self.status.down_since.compare_exchange(
                0,
                now,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One sync stream, until it ends or fails.
    async fn stream(&mut self) -> Result<(), tonic::Status> {
        // No call timeout on a stream that lasts as long as the connection.
        let mut req = tonic::Request::new(pb::SyncRequest {});
        req.set_timeout(Duration::from_secs(365 * 24 * 3600));
        let mut stream = self.client.sync(req).await?.into_inner();
        while let Some(msg) = stream.message().await? {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            self.status.last_sync.store(now, Ordering::Relaxed);
            self.status.down_since.store(0, Ordering::Relaxed);
            self.apply(msg);
        }
        Ok(())
    }

    fn apply(&mut self, msg: pb::SyncResponse) {
        match SpiffeBundle::from_json(&msg.bundle) {
            Ok(bundle) => {
                if let Err(e) = self.trust.replace(&bundle) {
                    tracing::error!(error = %e, "the server's bundle has no usable CA; keeping the last one");
                } else {
                    let own = Arc::new(bundle);
                    *self.own_bundle.lock().expect("bundle") = own.clone();
                    self.bundles.send_if_modified(|cur| {
                        if *cur.own == *own {
                            return false;
                        }
                        *cur = Arc::new(TrustBundles {
                            trust_domain: self.td.clone(),
                            own,
                            federated: cur.federated.clone(),
                        });
                        true
                    });
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "the server sent a bad bundle; keeping the last one")
            }
        }
        // After the bundle: re-signed SVIDs must verify against what workloads hold. Also
        // when the epoch grew while this node was cut off from the server.
        if self.epoch_seen.is_some_and(|seen| msg.reissue_epoch > seen) {
            tracing::warn!(
                epoch = msg.reissue_epoch,
                "emergency rotation on the server: every SVID held is signed again"
            );
            self.reissue.send_modify(|e| *e += 1);
        }
        self.epoch_seen = Some(msg.reissue_epoch);
        let sources = msg
            .policies
            .into_iter()
            .map(|p| PolicySource {
                origin: p.origin,
                text: p.text,
            })
            .collect();
        match from_sources(sources, &self.td) {
            Ok(set) => {
                // Always notify the first time: `connect` waits for it.
                self.policies.send_if_modified(|cur| {
                    let first = self.status.last_sync.load(Ordering::Relaxed) != 0
                        && cur.sources().is_empty()
                        && cur.policies().is_empty();
                    if **cur == set && !first {
                        return false;
                    }
                    *cur = Arc::new(set);
                    true
                });
            }
            Err(e) => {
                tracing::error!(error = %e, "the server sent policies this node cannot load; keeping the last ones")
            }
        }
    }
}

/// Renews the node SVID at about half its lifetime, retrying with backoff. Once it has expired
/// (the server was away longer than its lifetime), renewing cannot work any more: a node that
/// can attest again (`reattest`, a Kubernetes node with its token file) does so.
async fn renew(
    mut client: NodeClient<Channel>,
    identity: Identity,
    dir: PathBuf,
    mut chain: Vec<Vec<u8>>,
    status: Arc<SyncStatus>,
    reattest: Option<Attestor>,
) {
    loop {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let left = (expiry(&chain) - now).max(0) as u64;
        tokio::time::sleep(jitter(
            Duration::from_secs(left / 2).max(Duration::from_secs(1)),
        ))
        .await;
        let mut backoff = BACKOFF_MIN;
        loop {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            // A Kubernetes node always attests afresh: its token is bound to its pod, so the
            // server sees each time that the pod still exists (the server refuses renewal
            // without it). A host renews with its node SVID: its join token was single use.
            let attempt = match &reattest {
                Some(a) => {
                    if expiry(&chain) <= now {
                        tracing::info!("the node SVID has expired; attesting again");
                    }
                    a.attest()
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|(new, key, bundle)| {
                            identity.replace(&new, &key).map_err(|e| e.to_string())?;
                            // The bundle comes with the SVID; the sync stream keeps it current.
                            a.trust.replace(&bundle).map_err(|e| e.to_string())?;
                            Ok(new)
                        })
                }
                _ => renew_once(&mut client, &identity, &dir).await,
            };
            match attempt {
                Ok(new) => {
                    status
                        .node_svid_expiry
                        .store(expiry(&new), Ordering::Relaxed);
                    chain = new;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "renewing the node SVID");
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

async fn renew_once(
    client: &mut NodeClient<Channel>,
    identity: &Identity,
    dir: &Path,
) -> Result<Vec<Vec<u8>>, String> {
    let key = PrivateKey::generate().map_err(|e| e.to_string())?;
    let svid = client
        .renew_node_svid(pb::RenewNodeSvidRequest {
            public_key: key.spki_der(),
        })
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    identity
        .replace(&svid.cert_chain, &key.pkcs8_der())
        .map_err(|e| e.to_string())?;
    store_node_svid(dir, &svid.cert_chain, &key.pkcs8_der()).map_err(|e| e.to_string())?;
    tracing::info!(node = %svid.spiffe_id, "node SVID renewed");
    Ok(svid.cert_chain)
}

/// `d` give or take a fifth, so a fleet does not retry in lockstep.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.8 + fastrand::f64() * 0.4)
}

/// How long a signed credential may wait for the bundle that carries its key.
const BUNDLE_WAIT: Duration = Duration::from_secs(10);

impl RemoteIssuer {
    /// Waits until this node's bundle is at least `sequence`: a key the server published at
    /// the moment it started signing (an emergency rotation) reaches the node on the sync
    /// stream, and a credential signed with it must not be handed out before.
    async fn bundle_reached(&self, sequence: u64) -> Result<(), IssueError> {
        let mut rx = self.bundles.clone();
        let reached =
            tokio::time::timeout(BUNDLE_WAIT, rx.wait_for(|b| b.own.sequence >= sequence)).await;
        match reached {
            Ok(Ok(_)) => Ok(()),
            _ => Err(IssueError(format!(
                "the bundle carrying the signing key (sequence {sequence}) has not arrived from the server"
            ))),
        }
    }
}

fn issue_error(s: tonic::Status) -> IssueError {
    IssueError(format!("server: {}", s.message()))
}

#[async_trait::async_trait]
impl SvidIssuer for RemoteIssuer {
    async fn sign_x509(&self, req: X509Request) -> Result<Vec<Vec<u8>>, IssueError> {
        let msg = pb::SignX509SvidRequest {
            spiffe_id: req.spiffe_id.to_string(),
            public_key: req.spki_der,
            workload: Some(convert::workload_message(
                &req.workload.facts,
                req.workload.composite.as_ref(),
            )),
        };
        let resp = self
            .client
            .clone()
            .sign_x509_svid(msg)
            .await
            .map_err(issue_error)?;
        Ok(resp.into_inner().cert_chain)
    }

    async fn sign_jwt(&self, req: JwtRequest) -> Result<String, IssueError> {
        let workload = req.workload.unwrap_or_default();
        let msg = pb::SignJwtSvidRequest {
            spiffe_id: req.spiffe_id.to_string(),
            audience: req.audience,
            workload: Some(convert::workload_message(
                &workload.facts,
                workload.composite.as_ref(),
            )),
        };
        let resp = self
            .client
            .clone()
            .sign_jwt_svid(msg)
            .await
            .map_err(issue_error)?;
        Ok(resp.into_inner().token)
    }

    fn bundles(&self) -> watch::Receiver<Arc<TrustBundles>> {
        self.bundles.clone()
    }

    fn reissue(&self) -> watch::Receiver<u64> {
        self.reissue.clone()
    }

    async fn task_token(&self, req: TaskTokenRequest) -> Result<Issued, TaskTokenError> {
        let op = match &req.op {
            TaskTokenOp::Mint(m) => pb::sign_task_token_request::Op::Mint(convert::mint_message(m)),
            TaskTokenOp::Delegate { parent, req: d } => {
                pb::sign_task_token_request::Op::Delegate(convert::delegate_message(parent, d))
            }
        };
        let msg = pb::SignTaskTokenRequest {
            spiffe_id: req.caller.id.to_string(),
            workload: Some(convert::workload_message(
                &req.workload.facts,
                req.workload.composite.as_ref(),
            )),
            op: Some(op),
        };
        let resp = match self.client.clone().sign_task_token(msg).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                return Err(match convert::refusal_rule(&s) {
                    Some(rule) => {
                        let prefix = format!("refused by rule {rule}: ");
                        TaskTokenError::RefusedRemotely {
                            rule: rule.to_owned(),
                            detail: s
                                .message()
                                .strip_prefix(&prefix)
                                .unwrap_or(s.message())
                                .to_owned(),
                            invalid_request: s.code() == tonic::Code::InvalidArgument,
                        }
                    }
                    None if s.code() == tonic::Code::PermissionDenied => {
                        TaskTokenError::RefusedRemotely {
                            rule: "server".into(),
                            detail: s.message().to_owned(),
                            invalid_request: false,
                        }
                    }
                    None => TaskTokenError::Unavailable(issue_error(s)),
                });
            }
        };
        self.bundle_reached(resp.bundle_sequence)
            .await
            .map_err(TaskTokenError::Unavailable)?;
        // Never hand out a token this node cannot verify itself.
        let bundle = self.own_bundle.lock().expect("bundle").clone();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims =
            token::verify::verify_unscoped(&resp.token, |_| Some(&*bundle), now).map_err(|e| {
                TaskTokenError::Unavailable(IssueError(format!(
                    "the server's token does not verify: {e}"
                )))
            })?;
        Ok(Issued {
            token: resp.token,
            claims,
        })
    }
}
