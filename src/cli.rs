//! Command line: every flag can also come from an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::spiffe::TrustDomain;

/// SPIFFE workload identity for AI agents.
#[derive(Debug, Parser)]
#[command(name = "agentid", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, env = "AGENTID_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter (tracing-subscriber EnvFilter syntax, e.g. `info,agentid=debug`).
    #[arg(long, env = "AGENTID_LOG", default_value = "info", global = true)]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a whole trust domain on this machine: authority and Workload API in one process.
    Up(Box<UpArgs>),
    /// The trust-domain authority of a cluster: attests node daemons and signs for them.
    Server(Box<ServerCommand>),
    /// A node daemon of a cluster: serves the Workload API, with `agentid server` signing.
    Node(Box<NodeArgs>),
    /// X509-SVIDs from the Workload API.
    #[command(subcommand)]
    X509(X509Command),
    /// JWT-SVIDs from the Workload API.
    #[command(subcommand)]
    Jwt(JwtCommand),
    /// Task tokens: mint for a task, delegate to a sub-agent, verify as a relying party.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Trust bundles from the Workload API.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// The audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Benchmark the Workload API against a minimal floor server, and issuance against raw signing.
    Bench(BenchArgs),
    /// The benchmark's floor server (started by `agentid bench`).
    #[command(hide = true)]
    BenchFloor {
        /// Unix socket to serve on.
        #[arg(long)]
        socket: PathBuf,
        /// Busy-wait this long in every call before answering (`bench --calibrate-spin`).
        #[arg(long, value_parser = humantime::parse_duration)]
        spin: Option<Duration>,
    },
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Trust domain name.
    #[arg(long, env = "AGENTID_TRUST_DOMAIN", default_value = "agentid.local")]
    pub trust_domain: TrustDomain,
    /// Directory for keys and the audit log (default: $XDG_STATE_HOME/agentid or ~/.local/state/agentid).
    #[arg(long, env = "AGENTID_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Workload API socket path (default: $XDG_RUNTIME_DIR/agentid/workload.sock or /tmp/agentid/workload.sock).
    #[arg(long, env = "AGENTID_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Policy file or directory of *.yaml files; repeatable. Without it, a built-in policy
    /// gives processes of the current user the ID spiffe://<td>/user/<name>.
    #[arg(long, env = "AGENTID_POLICY", value_delimiter = ',')]
    pub policy: Vec<PathBuf>,
    /// Admin HTTP listener (healthz, readyz, metrics, config).
    #[arg(long, env = "AGENTID_ADMIN_ADDR", default_value = "127.0.0.1:9464")]
    pub admin_addr: SocketAddr,
    /// Allow a non-loopback admin address.
    #[arg(long, env = "AGENTID_ADMIN_ALLOW_REMOTE")]
    pub admin_allow_remote: bool,
    /// How often every file behind a live composite identity is re-hashed, as a safety net
    /// behind inotify (e.g. 30s, 5m).
    #[arg(long, env = "AGENTID_REHASH_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub rehash_interval: std::time::Duration,
    #[command(flatten)]
    pub k8s: K8sArgs,
    #[command(flatten)]
    pub rotation: RotationArgs,
}

/// How callers are attested.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttestorKind {
    /// Local processes: uid, gid, groups, executable.
    #[default]
    Unix,
    /// Processes in Kubernetes pods on this node (and local processes, by their unix facts).
    K8s,
}

/// Kubernetes workload attestation (`--attestor k8s`).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Kubernetes attestation (--attestor k8s)")]
pub struct K8sArgs {
    /// How callers are attested.
    #[arg(long, env = "AGENTID_ATTESTOR", value_enum, default_value_t = AttestorKind::Unix)]
    pub attestor: AttestorKind,
    /// This node's name (from the downward API: spec.nodeName).
    #[arg(long, env = "AGENTID_NODE_NAME")]
    pub node_name: Option<String>,
    /// The cluster's name, as policies and composite identities state it.
    #[arg(long, env = "AGENTID_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// Where pods are learned from: the API server (watch) or this node's kubelet (poll).
    #[arg(long, env = "AGENTID_POD_SOURCE", value_enum, default_value_t = crate::k8s::PodSource::Api)]
    pub pod_source: crate::k8s::PodSource,
    /// How long a caller whose container is not in the pod index yet is waited for.
    #[arg(long, env = "AGENTID_POD_WAIT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub pod_wait: Duration,
    /// API server URL (default: kubeconfig or in-cluster configuration).
    #[arg(long, env = "AGENTID_KUBE_API_URL")]
    pub kube_api_url: Option<String>,
    /// CA bundle (PEM) for --kube-api-url.
    #[arg(long, env = "AGENTID_KUBE_CA_FILE")]
    pub kube_ca_file: Option<PathBuf>,
    /// Bearer token file for --kube-api-url (re-read as it rotates).
    #[arg(long, env = "AGENTID_KUBE_TOKEN_FILE")]
    pub kube_token_file: Option<PathBuf>,
    /// The kubelet's HTTPS endpoint (--pod-source kubelet).
    #[arg(
        long,
        env = "AGENTID_KUBELET_URL",
        default_value = "https://127.0.0.1:10250"
    )]
    pub kubelet_url: String,
    /// CA bundle (PEM) for the kubelet's serving certificate.
    #[arg(long, env = "AGENTID_KUBELET_CA_FILE")]
    pub kubelet_ca_file: Option<PathBuf>,
    /// Bearer token file for the kubelet (re-read on every poll).
    #[arg(long, env = "AGENTID_KUBELET_TOKEN_FILE", default_value = crate::node::k8s::config::SERVICE_ACCOUNT_TOKEN)]
    pub kubelet_token_file: PathBuf,
    /// Accept any kubelet certificate (insecure; logged as a warning).
    #[arg(long, env = "AGENTID_KUBELET_INSECURE_SKIP_TLS_VERIFY")]
    pub kubelet_insecure_skip_tls_verify: bool,
    /// How often the kubelet's /pods is polled (a miss triggers an early poll).
    #[arg(long, env = "AGENTID_KUBELET_POLL_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub kubelet_poll_interval: Duration,
}

impl K8sArgs {
    /// The Kubernetes configuration, when `--attestor k8s` is chosen.
    pub fn config(&self) -> Option<crate::node::k8s::K8sConfig> {
        use crate::node::k8s::{ApiConfig, K8sConfig, KubeletConfig};
        if self.attestor != AttestorKind::K8s {
            return None;
        }
        Some(K8sConfig {
            node_name: self.node_name.clone().unwrap_or_default(),
            cluster_name: self.cluster_name.clone().unwrap_or_default(),
            pod_source: self.pod_source,
            api: ApiConfig {
                url: self.kube_api_url.clone(),
                ca_file: self.kube_ca_file.clone(),
                token_file: self.kube_token_file.clone(),
            },
            kubelet: KubeletConfig {
                url: self.kubelet_url.clone(),
                ca_file: self.kubelet_ca_file.clone(),
                token_file: self.kubelet_token_file.clone(),
                insecure_skip_tls_verify: self.kubelet_insecure_skip_tls_verify,
                poll_interval: self.kubelet_poll_interval,
                ..KubeletConfig::default()
            },
            pod_wait: self.pod_wait,
        })
    }
}

/// `agentid server`: run the server, or administer a running one through its admin socket.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ServerCommand {
    #[command(subcommand)]
    pub command: Option<ServerSubcommand>,
    #[command(flatten)]
    pub run: ServerArgs,
}

#[derive(Debug, Subcommand)]
pub enum ServerSubcommand {
    /// Join tokens for hosts outside Kubernetes.
    #[command(subcommand)]
    Token(ServerTokenCommand),
    /// The signing keys.
    #[command(subcommand)]
    Ca(ServerCaCommand),
}

#[derive(Debug, Subcommand)]
pub enum ServerTokenCommand {
    /// Create a single-use join token; prints it on stdout.
    Create {
        #[command(flatten)]
        admin: AdminSocketArg,
        /// How long the token may be used.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Only a node of this name may use it.
        #[arg(long)]
        node_name: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServerCaCommand {
    /// Rotate the CA and JWT keys (audited).
    Rotate {
        #[command(flatten)]
        admin: AdminSocketArg,
        /// Make the next keys current now, even if they were not published ahead.
        #[arg(long)]
        now: bool,
    },
}

/// The running server's admin socket.
#[derive(Debug, Clone, Args)]
pub struct AdminSocketArg {
    /// Admin socket of the running server.
    #[arg(long, env = "AGENTID_ADMIN_SOCKET", default_value_os_t = default_admin_socket())]
    pub admin_socket: PathBuf,
}

/// `agentid server` flags.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Trust domain name.
    #[arg(long, env = "AGENTID_TRUST_DOMAIN", default_value = "agentid.local")]
    pub trust_domain: TrustDomain,
    /// Where keys and state live: file:DIR, or kubernetes.
    #[arg(long, env = "AGENTID_STORE", default_value_t = default_server_store())]
    pub store: String,
    /// Node API address (gRPC over TLS).
    #[arg(long, env = "AGENTID_LISTEN", default_value = "0.0.0.0:8081")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub admin: AdminSocketArg,
    /// Policy file or directory of *.yaml files; repeatable.
    #[arg(long, env = "AGENTID_POLICY", value_delimiter = ',')]
    pub policy: Vec<PathBuf>,
    /// Admin HTTP listener (healthz, readyz, metrics, config).
    #[arg(long, env = "AGENTID_ADMIN_ADDR", default_value = "127.0.0.1:9465")]
    pub admin_addr: SocketAddr,
    /// Allow a non-loopback admin address.
    #[arg(long, env = "AGENTID_ADMIN_ALLOW_REMOTE")]
    pub admin_allow_remote: bool,
    /// Lifetime of node SVIDs (nodes renew at about half of it).
    #[arg(long, env = "AGENTID_NODE_SVID_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub node_svid_ttl: Duration,
    /// The audit log (default: DIR/audit.log with file:DIR, /var/log/agentid/server-audit.log
    /// with kubernetes).
    #[arg(long, env = "AGENTID_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    #[command(flatten)]
    pub rotation: RotationArgs,
    #[command(flatten)]
    pub store_k8s: ServerStoreArgs,
    #[command(flatten)]
    pub k8s: ServerK8sArgs,
}

/// `--store kubernetes`: where the server's objects live and how replicas elect a leader.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Kubernetes store (--store kubernetes)")]
pub struct ServerStoreArgs {
    /// Namespace of the server's Secrets, ConfigMap and Lease (default: the pod's own, from
    /// its service account; else "agentid").
    #[arg(long, env = "AGENTID_KUBE_NAMESPACE")]
    pub kube_namespace: Option<String>,
    /// This replica's name as Lease holder (default: $POD_NAME, else the host name).
    #[arg(long, env = "AGENTID_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// How long a Lease holder's record must stay unchanged before another replica takes
    /// over key rotation (the holder renews every third of it).
    #[arg(long, env = "AGENTID_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
}

/// Kubernetes node attestation and pod checks of `agentid server`.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Kubernetes nodes (on with --cluster-name)")]
pub struct ServerK8sArgs {
    /// The cluster's name: node SVIDs are spiffe://<td>/agentid/node/<cluster>/<node>, and
    /// policies and composite identities state it. Turns on Kubernetes node attestation and
    /// the server's watch of the cluster's pods; without it, only hosts can join.
    #[arg(long, env = "AGENTID_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// The audience node daemons' projected service-account tokens must carry.
    #[arg(long, env = "AGENTID_NODE_TOKEN_AUDIENCE", default_value = crate::server::cluster::DEFAULT_NODE_TOKEN_AUDIENCE)]
    pub node_token_audience: String,
    /// The node daemons' service account, NAMESPACE/NAME (the default is the Helm chart's for a
    /// release "agentid" in namespace "agentid"; the chart passes its own).
    #[arg(long, env = "AGENTID_NODE_SERVICE_ACCOUNT", default_value = crate::server::cluster::DEFAULT_NODE_SERVICE_ACCOUNT)]
    pub node_service_account: String,
    /// How long a pod the server's view does not know yet is waited for.
    #[arg(long, env = "AGENTID_POD_WAIT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub pod_wait: Duration,
    /// API server URL, for node attestation and --store kubernetes (default: kubeconfig or
    /// in-cluster configuration).
    #[arg(long, env = "AGENTID_KUBE_API_URL")]
    pub kube_api_url: Option<String>,
    /// CA bundle (PEM) for --kube-api-url.
    #[arg(long, env = "AGENTID_KUBE_CA_FILE")]
    pub kube_ca_file: Option<PathBuf>,
    /// Bearer token file for --kube-api-url (re-read as it rotates).
    #[arg(long, env = "AGENTID_KUBE_TOKEN_FILE")]
    pub kube_token_file: Option<PathBuf>,
}

/// `agentid node` flags.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Trust domain name (the server's).
    #[arg(long, env = "AGENTID_TRUST_DOMAIN", default_value = "agentid.local")]
    pub trust_domain: TrustDomain,
    /// The server's node API, https://HOST:PORT; several replicas comma-separated (tried in
    /// turn, starting from the last one that answered).
    #[arg(long, env = "AGENTID_SERVER")]
    pub server: String,
    /// The trust domain's bundle to trust the server with (`agentid bundle export`).
    #[arg(long, env = "AGENTID_SERVER_BUNDLE")]
    pub server_bundle: PathBuf,
    /// A single-use join token (`agentid server token create`), for hosts.
    #[arg(
        long,
        env = "AGENTID_JOIN_TOKEN",
        conflicts_with = "k8s_token_file",
        hide_env_values = true
    )]
    pub join_token: Option<String>,
    /// A projected service-account token file with the server's audience, for Kubernetes nodes.
    #[arg(long, env = "AGENTID_K8S_TOKEN_FILE")]
    pub k8s_token_file: Option<PathBuf>,
    /// Workload API socket path.
    #[arg(long, env = "AGENTID_SOCKET", default_value_os_t = default_socket())]
    pub socket: PathBuf,
    /// Directory for the node SVID and the audit log.
    #[arg(long, env = "AGENTID_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Admin HTTP listener (healthz, readyz, metrics, config).
    #[arg(long, env = "AGENTID_ADMIN_ADDR", default_value = "127.0.0.1:9464")]
    pub admin_addr: SocketAddr,
    /// Allow a non-loopback admin address.
    #[arg(long, env = "AGENTID_ADMIN_ALLOW_REMOTE")]
    pub admin_allow_remote: bool,
    /// How often every file behind a live composite identity is re-hashed.
    #[arg(long, env = "AGENTID_REHASH_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub rehash_interval: Duration,
    #[command(flatten)]
    pub k8s: K8sArgs,
}

/// Where the client finds the Workload API.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Workload API socket: a path or unix:///path.
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    pub socket: Option<String>,
    /// Machine-readable JSON output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum X509Command {
    /// Fetch this process's X509-SVIDs; with --out, write svid.pem, svid.key (0600) and bundle.pem.
    Fetch {
        #[command(flatten)]
        client: ClientArgs,
        /// Directory to write PEM files into.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Keep the stream open and print every update (rotation, policy change, withdrawal).
    Watch {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Decode a certificate offline: SPIFFE ID, validity, issuer, key, composite identity.
    Inspect {
        /// PEM (one or more certificates, leaf first) or DER file; `-` reads stdin.
        input: String,
        /// Machine-readable JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum JwtCommand {
    /// Fetch a JWT-SVID for one or more audiences.
    Fetch {
        #[command(flatten)]
        client: ClientArgs,
        /// Audience (repeatable).
        #[arg(long, required = true)]
        audience: Vec<String>,
        /// Only this identity (default: every identity the process has).
        #[arg(long)]
        spiffe_id: Option<String>,
    },
    /// Validate a JWT-SVID through the Workload API.
    Validate {
        #[command(flatten)]
        client: ClientArgs,
        /// The audience the token must carry.
        #[arg(long)]
        audience: String,
        /// The token (`-` reads it from stdin).
        token: String,
    },
    /// Decode a token offline, without verifying it: header, claims, composite identity.
    Inspect {
        /// The token (`-` reads it from stdin).
        token: String,
        /// Machine-readable JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// Task-token subcommands: tokens go to stdout, a refusal to stderr with the rule that refused.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mint a task token for this agent: an audience, a few scopes, a few minutes.
    Mint(TokenMintArgs),
    /// Delegate part of a task to a sub-agent: a narrower token naming it as the holder.
    Delegate(TokenDelegateArgs),
    /// Verify a task token and print its claims as JSON: through the socket, or offline.
    Verify {
        #[command(flatten)]
        client: ClientArgs,
        /// The audience this relying party is.
        #[arg(long)]
        audience: String,
        /// The SPIFFE ID of whoever presented the token (mTLS peer or JWT-SVID subject); it
        /// must be the token's outermost actor.
        #[arg(long)]
        presenter: Option<String>,
        /// Verify offline with this bundle file (a SPIFFE bundle or JWKS of the token's trust
        /// domain, or the output of `agentid bundle show --json`) instead of the socket.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// The token (`-` reads stdin).
        token: String,
    },
}

/// `agentid token mint`.
#[derive(Debug, Args)]
pub struct TokenMintArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Target service (repeatable).
    #[arg(long, required = true)]
    pub audience: Vec<String>,
    /// Scopes, space-separated (e.g. "ledger:read ledger:write"); repeatable.
    #[arg(long, required = true)]
    pub scope: Vec<String>,
    /// Lifetime (e.g. 90s, 5m); clamped to the policy's maximum. Default: that maximum.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// The principal the task is done for (needs `allowSubject` in the policy).
    #[arg(long)]
    pub subject: Option<String>,
    /// What the task is for; fixed for the whole delegation tree.
    #[arg(long)]
    pub purpose: Option<String>,
    /// Which of this process's identities mints (needed only when several may).
    #[arg(long)]
    pub spiffe_id: Option<String>,
}

/// `agentid token delegate`.
#[derive(Debug, Args)]
pub struct TokenDelegateArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The parent task token held by this agent (`-` reads stdin).
    #[arg(long)]
    pub parent: String,
    /// The sub-agent's SPIFFE ID.
    #[arg(long)]
    pub to: String,
    /// Scopes for the child, a subset of the parent's; space-separated, repeatable.
    #[arg(long, required = true)]
    pub scope: Vec<String>,
    /// Lifetime; never past the parent's expiry. Default: as long as allowed.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
}

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Show the X.509 and JWT bundles this process may use.
    Show {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the trust domain's SPIFFE bundle document, the one a node bootstraps trust from:
    /// from a server's store, or from a running server's admin socket.
    Export {
        /// The server's store (file:DIR).
        #[arg(long, conflicts_with = "admin_socket")]
        store: Option<String>,
        /// A running server's admin socket.
        #[arg(long)]
        admin_socket: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain of an audit log.
    Verify {
        /// The audit log file.
        file: PathBuf,
        /// Accept a log that starts after seq 1 (a rotated log).
        #[arg(long)]
        any_start: bool,
    },
}

/// `agentid bench`: every figure is measured against a floor taken in the same run.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Measuring time per load level and server, split over the alternating rounds.
    #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Concurrent FetchX509SVID clients, one connection each.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,1000")]
    pub levels: Vec<usize>,
    /// Concurrent FetchJWTSVID clients, one connection each.
    #[arg(long, value_delimiter = ',', default_value = "1,100")]
    pub jwt_levels: Vec<usize>,
    /// Concurrent node connections for the cluster signing measurement.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    pub node_levels: Vec<usize>,
    /// Pods in the index for the Kubernetes attestation measurement.
    #[arg(long, value_delimiter = ',', default_value = "10,500,5000")]
    pub pod_levels: Vec<usize>,
    /// Open FetchX509SVID streams for the memory measurement.
    #[arg(long, default_value_t = 1000)]
    pub streams: usize,
    /// Floor/daemon rounds per level (drift on a shared machine hits both alike); latency
    /// ratios are the median of the rounds' ratios.
    #[arg(long, default_value_t = 8)]
    pub rounds: usize,
    /// Put a second floor where the daemon goes: every ratio then shows how far two
    /// identical servers differ on this machine, the noise the real ratios sit in.
    #[arg(long)]
    pub calibrate: bool,
    /// With --calibrate, the second floor busy-waits this long in every call: how the ratios
    /// answer to that much more server CPU per call.
    #[arg(long, requires = "calibrate", value_parser = humantime::parse_duration)]
    pub calibrate_spin: Option<Duration>,
    /// A short smoke run: at most 0.5 s per level, one round.
    #[arg(long)]
    pub quick: bool,
    /// Machine-readable JSON output.
    #[arg(long)]
    pub json: bool,
}

/// `$XDG_STATE_HOME/agentid`, else `~/.local/state/agentid`.
pub fn default_state_dir() -> PathBuf {
    let env = |k| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    match (env("XDG_STATE_HOME"), env("HOME")) {
        (Some(x), _) => x.join("agentid"),
        (None, Some(h)) => h.join(".local/state/agentid"),
        (None, None) => PathBuf::from("/var/lib/agentid"),
    }
}

/// `file:$XDG_STATE_HOME/agentid/server` (or the home equivalent).
pub fn default_server_store() -> String {
    format!("file:{}", default_state_dir().join("server").display())
}

/// `$XDG_RUNTIME_DIR/agentid/server-admin.sock`, else `/tmp/agentid/server-admin.sock`.
pub fn default_admin_socket() -> PathBuf {
    default_socket().with_file_name("server-admin.sock")
}

/// `$XDG_RUNTIME_DIR/agentid/workload.sock`, else `/tmp/agentid/workload.sock`.
pub fn default_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d).join("agentid/workload.sock"),
        None => PathBuf::from("/tmp/agentid/workload.sock"),
    }
}

/// Lifetimes and rotation of the embedded authority's keys (short values are for tests).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Key rotation")]
pub struct RotationArgs {
    /// Lifetime of each CA certificate; a CA signs for about the first half of it.
    #[arg(long, env = "AGENTID_CA_TTL", default_value = "7d", value_parser = humantime::parse_duration)]
    pub ca_ttl: Duration,
    /// Lifetime of each JWT signing key; it signs for about the first half of it.
    #[arg(long, env = "AGENTID_JWT_KEY_TTL", default_value = "1d", value_parser = humantime::parse_duration)]
    pub jwt_key_ttl: Duration,
    /// How long a new key is in the bundle before it signs (at least 3 bundle refresh hints).
    #[arg(long, env = "AGENTID_ROTATION_PREPARE_AHEAD", default_value = "1h", value_parser = humantime::parse_duration)]
    pub rotation_prepare_ahead: Duration,
    /// Bundle refresh interval suggested to federation peers.
    #[arg(long, env = "AGENTID_BUNDLE_REFRESH_HINT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub bundle_refresh_hint: Duration,
}

impl RotationArgs {
    /// The authority configuration these flags give (checked by `AuthorityConfig::validate`).
    pub fn config(&self) -> crate::server::AuthorityConfig {
        crate::server::AuthorityConfig {
            ca_ttl: self.ca_ttl,
            jwt_key_ttl: self.jwt_key_ttl,
            prepare_ahead: self.rotation_prepare_ahead,
            refresh_hint: self.bundle_refresh_hint,
        }
    }
}

#[cfg(test)]
mod rotation_args_tests {
    use super::*;

    #[test]
    fn defaults_are_the_authority_defaults() {
        let cli = Cli::try_parse_from(["agentid", "up"]).unwrap();
        let Command::Up(up) = cli.command else {
            panic!("not up")
        };
        assert_eq!(
            up.rotation.config(),
            crate::server::AuthorityConfig::default()
        );
        let cli = Cli::try_parse_from([
            "agentid",
            "up",
            "--ca-ttl",
            "20s",
            "--rotation-prepare-ahead",
            "6s",
        ])
        .unwrap();
        let Command::Up(up) = cli.command else {
            panic!("not up")
        };
        assert_eq!(up.rotation.config().ca_ttl, Duration::from_secs(20));
        assert_eq!(up.rotation.config().prepare_ahead, Duration::from_secs(6));
    }
}
