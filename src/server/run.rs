//! `agentid server`: the authority as a daemon of its own. It serves the node API over TLS on
//! TCP, and local administration (join tokens, key rotation, the bundle) on a Unix socket
//! only its own user can open.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

use kube::Api;
use tokio_util::sync::CancellationToken;

use super::authority::Authority;
use super::cluster::{Cluster, ClusterConfig, ClusterError};
use super::crd::CrPolicies;
use super::join::{JoinError, JoinTokens};
use super::keys::AuthorityConfig;
use super::kube_store::{self, SecretStore};
use super::lease::{Election, LEASE_NAME, LeaseConfig};
use super::listen;
use super::node_api::{DEFAULT_NODE_SVID_TTL, NodeApi, NodeKind};
use super::rotation::{always_leading, record as record_key_event, spawn_rotation};
use super::state::KeyKind;
use super::store::{DocStore, FileStore};
use crate::admin::{self, Readiness};
use crate::api::node as pb;
use crate::audit::{Action, AuditEvent, AuditLog, Decision};
use crate::crypto::tls::{self, Accept, Identity, Trust};
use crate::crypto::{PrivateKey, x509::CertInfo};
use crate::k8s::ApiConfig;
use crate::policy::{PolicySet, load_paths};
use crate::policy_watch;
use crate::spiffe::{SpiffeId, TrustDomain};

/// Lifetime of the server's own X509-SVID (renewed at half of it).
const SERVER_SVID_TTL: Duration = Duration::from_secs(3600);

/// Where the server keeps its keys and state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "dir")]
pub enum StoreSpec {
    /// A private directory on this host (`file:DIR`).
    File(PathBuf),
    /// Secrets, a ConfigMap and custom resources in the cluster (`kubernetes`).
    Kubernetes,
}

impl std::str::FromStr for StoreSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kubernetes" => Ok(Self::Kubernetes),
            _ => match s.strip_prefix("file:") {
                Some(dir) if !dir.is_empty() => Ok(Self::File(PathBuf::from(dir))),
                _ => Err(format!(
                    "{s:?}: expected file:DIR or kubernetes (e.g. file:/var/lib/agentid-server)"
                )),
            },
        }
    }
}

/// Configuration of `agentid server`, logged at start and served at `/config`.
#[derive(Debug, Clone, Serialize)]
pub struct ServerConfig {
    pub trust_domain: TrustDomain,
    pub store: StoreSpec,
    pub listen: SocketAddr,
    pub admin_socket: PathBuf,
    pub policy: Vec<PathBuf>,
    pub admin_addr: SocketAddr,
    pub admin_allow_remote: bool,
    #[serde(with = "humantime_serde")]
    pub node_svid_ttl: Duration,
    /// Key lifetimes and rotation of the authority.
    pub authority: AuthorityConfig,
    /// Kubernetes node attestation and pod checks; `None`: hosts only.
    pub k8s: Option<ClusterConfig>,
    /// Where `--store kubernetes` keeps state and elects its leader.
    pub kube_store: KubeStoreConfig,
    /// The audit log (default with `file:DIR`: `DIR/audit.log`).
    pub audit_log: Option<PathBuf>,
}

/// `--store kubernetes`: the namespace of the server's objects, the API server, the Lease.
#[derive(Debug, Clone, Serialize)]
pub struct KubeStoreConfig {
    pub namespace: String,
    /// This replica's name as Lease holder (its pod name).
    pub replica_id: String,
    /// How long a Lease holder's record must stay unchanged before another replica takes over.
    #[serde(with = "humantime_serde")]
    pub lease_duration: Duration,
    pub api: ApiConfig,
}

impl Default for KubeStoreConfig {
    fn default() -> Self {
        Self {
            namespace: "agentid".into(),
            replica_id: "agentid-server".into(),
            lease_duration: Duration::from_secs(15),
            api: ApiConfig::default(),
        }
    }
}

/// Where the audit log goes when `--audit-log` is not given with `--store kubernetes`.
pub const KUBE_AUDIT_LOG: &str = "/var/log/agentid/server-audit.log";

impl ServerConfig {
    /// Defaults for everything but the trust domain and store.
    pub fn new(trust_domain: TrustDomain, store: StoreSpec) -> Self {
        Self {
            trust_domain,
            store,
            listen: "0.0.0.0:8081".parse().expect("literal address"),
            admin_socket: PathBuf::from("/run/agentid-server/admin.sock"),
            policy: Vec::new(),
            admin_addr: "127.0.0.1:9465".parse().expect("literal address"),
            admin_allow_remote: false,
            node_svid_ttl: DEFAULT_NODE_SVID_TTL,
            authority: AuthorityConfig::default(),
            k8s: None,
            kube_store: KubeStoreConfig::default(),
            audit_log: None,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("--store kubernetes: {0}")]
    Kube(String),
    #[error("--lease-duration {0:?} is outside 3s..=5m")]
    LeaseDuration(Duration),
    #[error("binding the node API on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin socket {path}: {source}")]
    AdminSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is in use by a running server; stop it or choose another --admin-socket")]
    AdminSocketInUse { path: PathBuf },
    #[error("loading policies")]
    Policy(#[source] crate::policy::PolicyError),
    #[error("the cluster view: {0}")]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl ServerError {
    /// A mistake in the configuration rather than in the environment (exit 64).
    pub fn is_config(&self) -> bool {
        matches!(self, Self::LeaseDuration(_) | Self::Policy(_))
    }
}

/// A built server, ready to serve.
pub struct ServerDaemon {
    pub config: ServerConfig,
    pub listen_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub policies: Arc<PolicySet>,
    authority: Arc<Authority>,
    cluster: Option<Arc<Cluster>>,
    node_api: NodeApi,
    admin_api: AdminApi,
    tls: Arc<rustls::ServerConfig>,
    listener: TcpListener,
    admin_listener: UnixListener,
    ready: Readiness,
    /// The authority's key rotation, stopped at shutdown.
    rotation: tokio::task::JoinHandle<()>,
    /// Stops the Kubernetes followers and the election (which then releases the Lease).
    cancel: CancellationToken,
    election: Option<tokio::task::JoinHandle<()>>,
    _policy_tx: watch::Sender<Arc<PolicySet>>,
}

/// The state backend once opened.
struct Opened {
    authority: Arc<Authority>,
    joins: Arc<JoinTokens>,
    audit: AuditLog,
    /// The API client, with `--store kubernetes`.
    kube: Option<kube::Client>,
}

impl ServerDaemon {
    /// Opens the store and keys, loads policies, binds the listeners.
    pub async fn build(config: ServerConfig) -> Result<Self, ServerError> {
        let td = config.trust_domain.clone();
        let policies = if config.policy.is_empty() {
            PolicySet::default()
        } else {
            load_paths(&config.policy, &td).map_err(ServerError::Policy)?
        };
        let opened = match &config.store {
            StoreSpec::File(dir) => open_files(&config, dir)?,
            StoreSpec::Kubernetes => open_kubernetes(&config).await?,
        };
        let Opened {
            authority,
            joins,
            audit,
            kube,
        } = opened;
        let mut registry = Registry::default();
        let reload_failures = Counter::default();
        registry.register(
            "agentid_server_policy_reload_failures",
            "Policy reloads refused (the previous policies stay in force)",
            reload_failures.clone(),
        );
        let (policy_tx, file_policies) = watch::channel(Arc::new(policies.clone()));
        if !config.policy.is_empty() {
            policy_watch::spawn(
                config.policy.clone(),
                td.clone(),
                policy_tx.clone(),
                audit.clone(),
                reload_failures,
            )
            .map_err(|e| anyhow::anyhow!("watching policy files: {e}"))?;
        }
        let cancel = CancellationToken::new();
        let leading_gauge: Gauge = Gauge::default();
        registry.register(
            "agentid_server_leader",
            "1 while this replica holds the Lease (rotates keys, publishes the bundle), else 0",
            leading_gauge.clone(),
        );
        let (policy_rx, policies, leading, election) = match &kube {
            None => (file_policies, policies, always_leading(), None),
            Some(client) => {
                let (crs, set) =
                    CrPolicies::start(client.clone(), td.clone(), audit.clone(), file_policies)
                        .await
                        .map_err(|e| {
                            let hint = match &e {
                                kube::Error::Api(s) if s.code == 404 => {
                                    " (is the CRD installed? kubectl apply -f charts/agentid/crds/)"
                                }
                                _ => "",
                            };
                            ServerError::Kube(format!("listing AgentIdentity resources: {e}{hint}"))
                        })?;
                let rx = crs.subscribe();
                tokio::spawn(crs.run(cancel.clone()));
                let k = &config.kube_store;
                let election = Election::new(
                    Api::namespaced(client.clone(), &k.namespace),
                    LeaseConfig {
                        name: LEASE_NAME.into(),
                        identity: k.replica_id.clone(),
                        duration: k.lease_duration,
                    },
                );
                let leading = election.subscribe();
                let handle = tokio::spawn(election.run(cancel.clone()));
                tokio::spawn(kube_store::publish_bundle(
                    authority.clone(),
                    Api::namespaced(client.clone(), &k.namespace),
                    leading.clone(),
                    cancel.clone(),
                ));
                tokio::spawn(kube_store::follow_keys(
                    authority.clone(),
                    Api::namespaced(client.clone(), &k.namespace),
                    cancel.clone(),
                ));
                (rx, set, leading, Some(handle))
            }
        };
        if policies.policies().is_empty() {
            tracing::warn!(
                "no policies (--policy files or AgentIdentity resources): no workload will be issued an identity yet"
            );
        }
        {
            let mut leading = leading.clone();
            tokio::spawn(async move {
                loop {
                    leading_gauge.set(i64::from(*leading.borrow_and_update()));
                    if leading.changed().await.is_err() {
                        return;
                    }
                }
            });
        }
        let rotation = spawn_rotation(authority.clone(), audit.clone(), leading);
        let ready = Readiness::default();
        if kube.is_some() {
            // Not ready (and not signing) while the keys cannot be confirmed with the store.
            let a = authority.clone();
            ready.add_check(Arc::new(move || match a.check_confirmed() {
                Ok(()) => Ok("keys confirmed with the store".into()),
                Err(e) => Err(e.to_string()),
            }));
        }
        let cluster = match &config.k8s {
            Some(k8s) => Some(Arc::new(start_cluster(k8s, &mut registry, &ready).await?)),
            None => None,
        };
        let tls = Arc::new(server_tls(&authority)?);
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let listen_addr = listener
            .local_addr()
            .map_err(|source| ServerError::Listen {
                addr: config.listen,
                source,
            })?;
        let admin_listener = bind_admin_socket(&config.admin_socket)?;
        let node_api = NodeApi::new(
            authority.clone(),
            policy_rx,
            joins.clone(),
            audit.clone(),
            config.node_svid_ttl,
            cluster.clone(),
        );
        let admin_api = AdminApi {
            authority: authority.clone(),
            joins,
            audit,
        };
        let admin_addr = admin::spawn(
            config.admin_addr,
            config.admin_allow_remote,
            registry,
            ready.clone(),
            serde_json::to_value(&config).map_err(anyhow::Error::new)?,
        )
        .await
        .map_err(anyhow::Error::new)?;
        Ok(Self {
            policies: Arc::new(policies),
            listen_addr,
            admin_addr,
            authority,
            cluster,
            node_api,
            admin_api,
            tls,
            listener,
            admin_listener,
            ready,
            rotation,
            cancel,
            election,
            config,
            _policy_tx: policy_tx,
        })
    }

    /// The human banner printed at start.
    pub fn banner(&self) -> String {
        let mut out = format!(
            "agentid server: trust domain {}\n",
            self.config.trust_domain
        );
        out += &format!("  node API   {} (TLS)\n", self.listen_addr);
        out += &format!(
            "  admin      {} (unix socket, owner only)\n",
            self.config.admin_socket.display()
        );
        out += &format!(
            "  http       http://{}/ (healthz, readyz, metrics, config)\n",
            self.admin_addr
        );
        match &self.config.store {
            StoreSpec::File(dir) => {
                out += &format!("  store      {} (files, 0600)\n", dir.display())
            }
            StoreSpec::Kubernetes => {
                let k = &self.config.kube_store;
                out += &format!(
                    "  store      kubernetes namespace {}: Secrets {} and {}, ConfigMap {}, Lease {} (replica {}, lease {})\n",
                    k.namespace,
                    kube_store::KEYS_SECRET,
                    kube_store::JOIN_SECRET,
                    kube_store::BUNDLE_CONFIGMAP,
                    LEASE_NAME,
                    k.replica_id,
                    humantime::format_duration(k.lease_duration)
                );
            }
        }
        match &self.cluster {
            Some(c) => {
                let k = c.config();
                out += &format!(
                    "  kubernetes cluster {}: node daemons of {} with tokens for {:?}, pods checked against the API server ({})\n",
                    k.cluster_name,
                    k.node_service_account,
                    k.node_token_audience,
                    k.api.url.as_deref().unwrap_or("kubeconfig or in-cluster")
                );
            }
            None => out += "  kubernetes off: hosts only (--cluster-name turns it on)\n",
        }
        out += "  policies\n";
        for p in self.policies.policies() {
            out += &format!("    {:<20} {}\n", p.name, p.origin);
        }
        out += &format!(
            "\njoin a host:  agentid server token create --admin-socket {}\n",
            self.config.admin_socket.display()
        );
        out
    }

    /// The authority (tests, `agentid up`-style embedding).
    pub fn authority(&self) -> &Arc<Authority> {
        &self.authority
    }

    /// Serves until `shutdown`; the admin socket file is removed on the way out.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop) = watch::channel(false);
        let node = Server::builder()
            .add_service(pb::node_server::NodeServer::new(self.node_api))
            .serve_with_incoming_shutdown(
                listen::incoming(self.listener, self.tls),
                wait(stop.clone()),
            );
        let admin = Server::builder()
            .add_service(pb::server_admin_server::ServerAdminServer::new(
                self.admin_api,
            ))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(self.admin_listener),
                wait(stop),
            );
        self.ready.set(true);
        let path = self.config.admin_socket.clone();
        let result = tokio::select! {
            r = async { tokio::try_join!(node, admin) } => r.map(|_| ()),
            () = shutdown => {
                let _ = stop_tx.send(true);
                Ok(())
            }
        };
        self.ready.set(false);
        self.rotation.abort();
        self.cancel.cancel();
        if let Some(election) = self.election {
            // Releasing the Lease lets another replica take over at once.
            let _ = tokio::time::timeout(Duration::from_secs(3), election).await;
        }
        let _ = std::fs::remove_file(&path);
        Ok(result?)
    }
}

/// `--store file:DIR`: keys, join tokens and the audit log in a private directory.
fn open_files(config: &ServerConfig, dir: &Path) -> Result<Opened, ServerError> {
    let td = config.trust_domain.clone();
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| anyhow::anyhow!("creating store directory {}: {e}", dir.display()))?;
    let authority = Arc::new(
        Authority::open(&dir.join("authority"), td.clone(), config.authority.clone())
            .map_err(anyhow::Error::new)?,
    );
    let audit_path = config
        .audit_log
        .clone()
        .unwrap_or_else(|| dir.join("audit.log"));
    let audit = AuditLog::open(&audit_path, format!("agentid://{td}/server"))
        .map_err(anyhow::Error::new)?;
    let nodes: Arc<dyn DocStore> =
        Arc::new(FileStore::open(&dir.join("nodes")).map_err(anyhow::Error::new)?);
    let joins = Arc::new(JoinTokens::open(Some(nodes)).map_err(anyhow::Error::new)?);
    Ok(Opened {
        authority,
        joins,
        audit,
        kube: None,
    })
}

/// `--store kubernetes`: keys and join tokens in Secrets of the server's namespace.
async fn open_kubernetes(config: &ServerConfig) -> Result<Opened, ServerError> {
    let k = &config.kube_store;
    if !(Duration::from_secs(3)..=Duration::from_secs(300)).contains(&k.lease_duration) {
        return Err(ServerError::LeaseDuration(k.lease_duration));
    }
    let client = crate::k8s::api::client(&k.api)
        .await
        .map_err(|e| ServerError::Kube(e.to_string()))?;
    let secrets = SecretStore::new(client.clone(), &k.namespace);
    let (td, authority_config) = (config.trust_domain.clone(), config.authority.clone());
    let store = secrets.clone();
    // The store blocks on the API: open from a blocking thread.
    let (authority, joins) = tokio::task::spawn_blocking(move || {
        let authority = Authority::open_with(
            Box::new(store.clone()),
            td,
            authority_config,
            std::time::SystemTime::now(),
        )?
        .require_confirmation(kube_store::CONFIRM_LIMIT);
        let joins = JoinTokens::open(Some(Arc::new(store)))?;
        Ok::<_, super::AuthorityError>((authority, joins))
    })
    .await
    .map_err(anyhow::Error::new)?
    .map_err(|e| ServerError::Kube(e.to_string()))?;
    let audit_path = config
        .audit_log
        .clone()
        .unwrap_or_else(|| PathBuf::from(KUBE_AUDIT_LOG));
    let audit = AuditLog::open(
        &audit_path,
        format!("agentid://{}/server/{}", config.trust_domain, k.replica_id),
    )
    .map_err(anyhow::Error::new)?;
    Ok(Opened {
        authority: Arc::new(authority),
        joins: Arc::new(joins),
        audit,
        kube: Some(client),
    })
}

async fn wait(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Starts the server's view of the cluster; its state is part of readiness and metrics.
async fn start_cluster(
    config: &ClusterConfig,
    registry: &mut Registry,
    ready: &Readiness,
) -> Result<Cluster, ServerError> {
    let cluster = Cluster::start(config.clone()).await?;
    let (pods, up) = (Gauge::default(), Gauge::default());
    registry.register(
        "agentid_server_pod_view_pods",
        "Pods in the server's view of the cluster",
        pods.clone(),
    );
    registry.register(
        "agentid_server_pod_view_up",
        "1 while the API server watch answers, else 0 (known pods are still verified)",
        up.clone(),
    );
    cluster.attach_gauges(pods, up);
    ready.add_check(cluster.readiness_check());
    Ok(cluster)
}

/// The TLS side of the node API: the server's own SVID (renewed at half-life), and node
/// SVIDs checked against the current bundle (refreshed on every bundle change).
fn server_tls(authority: &Arc<Authority>) -> Result<rustls::ServerConfig, ServerError> {
    let td = authority.trust_domain().clone();
    let id: SpiffeId = format!("{}/agentid/server", td.id_string())
        .parse()
        .map_err(anyhow::Error::new)?;
    let (chain, key) = server_svid(authority, &id)?;
    let identity = Identity::new(&chain, &key).map_err(anyhow::Error::new)?;
    let trust = Trust::new(&authority.bundle()).map_err(anyhow::Error::new)?;
    let accept = {
        let td = td.clone();
        Accept::new(move |peer| NodeKind::of(peer, &td).is_some())
    };
    let config =
        tls::server_config(identity.clone(), trust.clone(), accept).map_err(anyhow::Error::new)?;
    let authority = authority.clone();
    tokio::spawn(async move {
        let mut bundles = authority.subscribe();
        let mut renew = tokio::time::interval(SERVER_SVID_TTL / 2);
        renew.tick().await;
        loop {
            tokio::select! {
                r = bundles.changed() => {
                    if r.is_err() { return; }
                    let b = bundles.borrow_and_update().clone();
                    if let Err(e) = trust.replace(&b) {
                        tracing::error!(error = %e, "trusting the new bundle");
                    }
                }
                _ = renew.tick() => {}
            }
            // A new bundle may carry a new CA: renew the server SVID under it too.
            match server_svid(&authority, &id) {
                Ok((chain, key)) => {
                    if let Err(e) = identity.replace(&chain, &key) {
                        tracing::error!(error = %e, "renewing the server SVID");
                    }
                }
                Err(e) => tracing::error!(error = %e, "renewing the server SVID"),
            }
        }
    });
    Ok(config)
}

fn server_svid(
    authority: &Authority,
    id: &SpiffeId,
) -> Result<(Vec<Vec<u8>>, Vec<u8>), ServerError> {
    let key = PrivateKey::generate().map_err(anyhow::Error::new)?;
    let chain = authority
        .sign_x509_svid(id, &key.spki_der(), SERVER_SVID_TTL, &[])
        .map_err(anyhow::Error::new)?;
    Ok((chain, key.pkcs8_der()))
}

/// Binds the admin socket with mode 0600: whoever can open it can enroll nodes.
fn bind_admin_socket(path: &Path) -> Result<UnixListener, ServerError> {
    let err = |source| ServerError::AdminSocket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if std::fs::symlink_metadata(path).is_ok() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServerError::AdminSocketInUse {
                path: path.to_owned(),
            });
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Local administration on the admin socket.
#[derive(Clone)]
struct AdminApi {
    authority: Arc<Authority>,
    joins: Arc<JoinTokens>,
    audit: AuditLog,
}

#[tonic::async_trait]
impl pb::server_admin_server::ServerAdmin for AdminApi {
    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let body = req.into_inner();
        let ttl = Duration::from_secs(u64::try_from(body.ttl_seconds).unwrap_or(0));
        let node = Some(body.node_name).filter(|n| !n.is_empty());
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        // The store may block on the API server.
        let (joins, bound) = (self.joins.clone(), node.clone());
        let (token, expires_at) =
            tokio::task::spawn_blocking(move || joins.create(ttl, bound, now))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| match e {
                    JoinError::Store(_) => Status::unavailable(e.to_string()),
                    _ => Status::invalid_argument(e.to_string()),
                })?;
        let reason = format!(
            "join token created, valid {}{}",
            humantime::format_duration(ttl),
            node.map(|n| format!(" for node {n}")).unwrap_or_default()
        );
        if let Err(e) = self.audit.record(
            AuditEvent::new(Action::Issued, "join-token")
                .decision(Decision::allow().reason(reason)),
        ) {
            tracing::error!(error = %e, "writing audit record");
        }
        Ok(Response::new(pb::CreateJoinTokenResponse {
            token,
            expires_at,
        }))
    }

    /// Emergency rotation of the CA and the JWT key: each published next key signs at once,
    /// or a new, unannounced one does (see `Authority::rotate_now`); every step is audited.
    async fn rotate_keys(
        &self,
        _: Request<pb::RotateKeysRequest>,
    ) -> Result<Response<pb::RotateKeysResponse>, Status> {
        let mut changes = Vec::new();
        for kind in KeyKind::ALL {
            let authority = self.authority.clone();
            let events = tokio::task::spawn_blocking(move || authority.rotate_now(kind))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::unavailable(format!("rotating the {kind}: {e}")))?;
            for e in &events {
                record_key_event(&self.audit, self.authority.trust_domain(), e);
                changes.push(e.reason());
            }
        }
        Ok(Response::new(pb::RotateKeysResponse { changes }))
    }

    async fn get_bundle(
        &self,
        _: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::GetBundleResponse>, Status> {
        Ok(Response::new(pb::GetBundleResponse {
            bundle: self.authority.bundle_document(),
        }))
    }
}

/// The CA certificates of a bundle document, for logs.
pub fn bundle_summary(doc: &[u8]) -> String {
    match crate::spiffe::SpiffeBundle::from_json(doc) {
        Ok(b) => b
            .x509_authorities
            .iter()
            .filter_map(|c| CertInfo::parse(c).ok())
            .map(|i| i.fingerprint)
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => format!("unreadable bundle: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::server_admin_server::ServerAdmin;

    #[tokio::test]
    async fn rotate_keys_rotates_both_kinds_and_audits_each_step() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let authority =
            Arc::new(Authority::open(dir.path(), td, AuthorityConfig::default()).unwrap());
        let before = authority.bundle();
        let reissue = authority.subscribe_reissue();
        assert_eq!(*reissue.borrow(), 0);
        let audit = AuditLog::memory("test");
        let admin = AdminApi {
            authority: authority.clone(),
            joins: Arc::new(JoinTokens::open(None).unwrap()),
            audit: audit.clone(),
        };
        let changes = admin
            .rotate_keys(Request::new(pb::RotateKeysRequest {}))
            .await
            .unwrap()
            .into_inner()
            .changes;
        // No next keys were published: each kind gets a new key, unannounced.
        assert_eq!(changes.len(), 4, "{changes:?}");
        assert!(changes[1].contains("activated CA") && changes[1].contains("unannounced"));
        assert!(changes[3].contains("activated JWT key"));
        let after = authority.bundle();
        assert_eq!(after.x509_authorities.len(), 2, "the old CA stays trusted");
        assert_eq!(after.x509_authorities[0], before.x509_authorities[0]);
        assert_eq!(after.jwt_authorities.len(), 2);
        assert_eq!(
            *reissue.borrow(),
            2,
            "holders are told to re-sign, once per kind"
        );
        let log = audit.lines().join("\n");
        assert_eq!(
            log.matches("dev.agentid.bundle_updated").count(),
            4,
            "{log}"
        );
        assert!(log.contains("emergency rotation"), "{log}");
    }
}
