//! `agentid server`, `agentid node` and the commands that administer them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::api::node as pb;
use crate::api::node::server_admin_client::ServerAdminClient;
use crate::cli::{NodeArgs, ServerArgs, ServerK8sArgs};
use crate::k8s::ApiConfig;
use crate::node::remote::NodeCredential;
use crate::node::run::{Node, NodeConfig};
use crate::server::cluster::ClusterConfig;
use crate::server::run::{KubeStoreConfig, ServerConfig, ServerDaemon, StoreSpec};
use crate::server::{Authority, AuthorityConfig};
use crate::spiffe::TrustDomain;

/// The typed server configuration from its flags.
pub fn server_config(args: ServerArgs) -> anyhow::Result<ServerConfig> {
    let store: StoreSpec = args
        .store
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--store {e}"))?;
    let mut c = ServerConfig::new(args.trust_domain, store);
    c.listen = args.listen;
    c.admin_socket = args.admin.admin_socket;
    c.policy = args.policy;
    c.admin_addr = args.admin_addr;
    c.admin_allow_remote = args.admin_allow_remote;
    c.node_svid_ttl = args.node_svid_ttl;
    c.authority = args.rotation.config();
    c.authority.validate()?;
    c.audit_log = args.audit_log;
    let api = ApiConfig {
        url: args.k8s.kube_api_url.clone(),
        ca_file: args.k8s.kube_ca_file.clone(),
        token_file: args.k8s.kube_token_file.clone(),
    };
    api.validate()?;
    let kube_store = c.store == StoreSpec::Kubernetes;
    let s = args.store_k8s;
    c.kube_store = KubeStoreConfig {
        namespace: s.kube_namespace.unwrap_or_else(own_namespace),
        replica_id: s.replica_id.unwrap_or_else(replica_id),
        lease_duration: s.lease_duration,
        api: api.clone(),
    };
    c.k8s = cluster_config(args.k8s, api, kube_store)?;
    Ok(c)
}

/// The pod's namespace from its service account, else "agentid".
fn own_namespace() -> String {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "agentid".into())
}

/// `$POD_NAME` (the chart sets it from the downward API), else the host name.
fn replica_id() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("agentid-server-{}", std::process::id()))
}

/// The server's Kubernetes node settings: on with `--cluster-name`, else none (hosts only).
/// The API flags are also the store's with `--store kubernetes`.
fn cluster_config(
    k: ServerK8sArgs,
    api: ApiConfig,
    kube_store: bool,
) -> anyhow::Result<Option<ClusterConfig>> {
    let Some(name) = k.cluster_name else {
        if kube_store {
            return Ok(None);
        }
        let given = [
            ("--kube-api-url", k.kube_api_url.is_some()),
            ("--kube-ca-file", k.kube_ca_file.is_some()),
            ("--kube-token-file", k.kube_token_file.is_some()),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
            bail!(
                "{flag} is only used with --cluster-name (Kubernetes node attestation) or --store kubernetes"
            );
        }
        return Ok(None);
    };
    let mut c = ClusterConfig::new(name);
    c.node_token_audience = k.node_token_audience;
    c.node_service_account = k
        .node_service_account
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--node-service-account {e}"))?;
    c.pod_wait = k.pod_wait;
    c.api = api;
    c.validate()?;
    Ok(Some(c))
}

/// Builds the server and prints its banner.
pub async fn server_build(config: ServerConfig) -> anyhow::Result<ServerDaemon> {
    let server = ServerDaemon::build(config).await?;
    print!("{}", server.banner());
    flush();
    Ok(server)
}

/// The typed node configuration from its flags.
pub fn node_config(args: NodeArgs) -> anyhow::Result<NodeConfig> {
    let Some(node_name) = args.k8s.node_name.clone().filter(|n| !n.is_empty()) else {
        bail!("--node-name is required (in Kubernetes, from the downward API: spec.nodeName)");
    };
    let (credential, shown) = match (args.join_token, args.k8s_token_file) {
        (Some(t), None) => (NodeCredential::JoinToken(t), "join-token".to_owned()),
        (None, Some(f)) => {
            let shown = f.display().to_string();
            (NodeCredential::K8sTokenFile(f), shown)
        }
        _ => bail!("give exactly one of --join-token and --k8s-token-file"),
    };
    let state_dir = args
        .state_dir
        .unwrap_or_else(|| crate::cli::default_state_dir().join("node"));
    Ok(NodeConfig {
        trust_domain: args.trust_domain,
        server: args.server,
        server_bundle: args.server_bundle,
        node_name,
        credential: shown,
        credential_value: Some(credential),
        socket: args.socket,
        state_dir,
        admin_addr: args.admin_addr,
        admin_allow_remote: args.admin_allow_remote,
        rehash_interval: args.rehash_interval,
        k8s: args.k8s.config(),
    })
}

/// Joins the server and prints the node's banner.
pub async fn node_build(config: NodeConfig) -> anyhow::Result<Node> {
    let node = Node::build(config).await?;
    print!("{}", node.banner());
    flush();
    Ok(node)
}

fn flush() {
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

async fn admin_client(path: &Path) -> anyhow::Result<ServerAdminClient<tonic::transport::Channel>> {
    if !path.exists() {
        bail!(
            "no admin socket at {}: is `agentid server` running, and is this its --admin-socket?",
            path.display()
        );
    }
    let channel = crate::client::unix_channel(path)
        .await
        .with_context(|| format!("connecting to {}", path.display()))?;
    Ok(ServerAdminClient::new(channel))
}

/// `agentid server token create`: the token alone on stdout.
pub async fn token_create(
    admin_socket: &Path,
    ttl: Duration,
    node_name: Option<String>,
) -> anyhow::Result<()> {
    let resp = admin_client(admin_socket)
        .await?
        .create_join_token(pb::CreateJoinTokenRequest {
            ttl_seconds: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            node_name: node_name.unwrap_or_default(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    println!("{}", resp.token);
    let expires = time::OffsetDateTime::from_unix_timestamp(resp.expires_at)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    eprintln!("single use, expires {expires}");
    Ok(())
}

/// `agentid server ca rotate`.
pub async fn ca_rotate(admin_socket: &Path, now: bool) -> anyhow::Result<()> {
    if !now {
        bail!("keys rotate on their schedule; pass --now to rotate at once (emergencies)");
    }
    let resp = admin_client(admin_socket)
        .await?
        .rotate_keys(pb::RotateKeysRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    for c in resp.changes {
        println!("{c}");
    }
    Ok(())
}

/// `agentid bundle export`: the SPIFFE bundle document on stdout.
pub async fn bundle_export(
    store: Option<String>,
    admin_socket: Option<PathBuf>,
) -> anyhow::Result<()> {
    let doc = match (store, admin_socket) {
        (Some(store), None) => {
            let StoreSpec::File(dir) = store
                .parse::<StoreSpec>()
                .map_err(|e| anyhow::anyhow!("--store {e}"))?
            else {
                bail!(
                    "--store kubernetes: read the agentid-bundle ConfigMap instead (kubectl get configmap agentid-bundle -o jsonpath='{{.data.bundle\\.spiffe}}')"
                );
            };
            let state = dir.join("authority");
            if !state.is_dir() {
                bail!(
                    "no authority in {}: has `agentid server --store file:{}` run?",
                    dir.display(),
                    dir.display()
                );
            }
            let td = read_trust_domain(&state)?;
            Authority::open(&state, td, AuthorityConfig::default())?.bundle_document()
        }
        (None, Some(path)) => {
            admin_client(&path)
                .await?
                .get_bundle(pb::GetBundleRequest {})
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner()
                .bundle
        }
        _ => bail!("give --store file:DIR or --admin-socket PATH"),
    };
    println!("{}", String::from_utf8_lossy(&doc));
    Ok(())
}

/// The trust domain of the authority stored in `state` (its `trust-domain` file).
fn read_trust_domain(state: &Path) -> anyhow::Result<TrustDomain> {
    let text = std::fs::read_to_string(state.join("trust-domain"))
        .with_context(|| format!("reading the trust domain of {}", state.display()))?;
    Ok(TrustDomain::new(text.trim())?)
}
