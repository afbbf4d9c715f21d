//! Launching `agentid server` and `agentid node` as real processes, shared by the cluster tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Daemon, bin};

/// Starts `agentid server` with its store, admin socket and logs under `dir`, listening on
/// `listen`, with `policy` and `extra` flags; waits for its banner.
pub fn launch_server(dir: &Path, listen: &str, policy: &Path, extra: &[String]) -> Daemon {
    let admin_socket = dir.join("admin.sock");
    let mut args: Vec<String> = vec![
        "server".into(),
        format!("--store=file:{}", dir.join("store").display()),
        format!("--listen={listen}"),
        "--admin-socket".into(),
        admin_socket.display().to_string(),
        "--admin-addr=127.0.0.1:0".into(),
        "--policy".into(),
        policy.display().to_string(),
    ];
    args.extend_from_slice(extra);
    Daemon::launch(
        &dir.join("server-run"),
        &args,
        admin_socket,
        dir.join("store"),
        "join a host:",
    )
    .unwrap_or_else(|e| panic!("agentid server did not start: {e}"))
}

/// The first word after `name` on a banner line (`node API`, `http`).
pub fn banner_field(d: &Daemon, name: &str) -> String {
    d.banner
        .lines()
        .find_map(|l| l.trim().strip_prefix(name))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("{name} in the banner: {}", d.banner))
        .to_owned()
}

/// `agentid bundle export` from the admin socket into `to`; returns `to`.
pub fn export_bundle(admin_socket: &Path, to: &Path) -> PathBuf {
    let out = std::process::Command::new(bin())
        .args(["bundle", "export", "--admin-socket"])
        .arg(admin_socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(to, &out.stdout).unwrap();
    to.to_owned()
}

/// Starts `agentid node NAME` under `dir` against `server_url`, trusting `bundle`, with its
/// credential and other `extra` flags; waits for its banner.
pub fn launch_node(
    dir: &Path,
    server_url: &str,
    bundle: &Path,
    name: &str,
    extra: &[String],
) -> Result<Daemon, String> {
    let socket = dir.join("workload.sock");
    let state = dir.join("state");
    let mut args: Vec<String> = vec![
        "node".into(),
        "--server".into(),
        server_url.into(),
        "--server-bundle".into(),
        bundle.display().to_string(),
        "--node-name".into(),
        name.into(),
        "--socket".into(),
        socket.display().to_string(),
        "--state-dir".into(),
        state.display().to_string(),
        "--admin-addr=127.0.0.1:0".into(),
    ];
    args.extend_from_slice(extra);
    Daemon::launch(
        &dir.join("run"),
        &args,
        socket,
        state,
        "SPIFFE_ENDPOINT_SOCKET=",
    )
}

/// A stand-in API server accepting `token`, and its CA and token files in `dir`.
pub async fn kube_standin(dir: &Path, token: &str) -> (super::k8s::StandIn, KubeApi) {
    let standin = super::k8s::StandIn::start(token, "node-a").await;
    let (ca, token) = standin.write_files(dir);
    let api = KubeApi {
        url: standin.url.clone(),
        ca,
        token,
    };
    (standin, api)
}

/// Where a `--store kubernetes` server finds the API server: URL, CA file, token file.
pub struct KubeApi {
    pub url: String,
    pub ca: PathBuf,
    pub token: PathBuf,
}

/// Starts `agentid server --store kubernetes` as replica `replica` in namespace `agentid`,
/// with its admin socket, audit log and logs under `dir`, listening on `listen`, and `extra`
/// flags; waits for its banner.
pub fn launch_kube_server(
    dir: &Path,
    api: &KubeApi,
    replica: &str,
    listen: &str,
    extra: &[String],
) -> Result<Daemon, String> {
    let admin_socket = dir.join("admin.sock");
    let mut args: Vec<String> = vec![
        "server".into(),
        "--store=kubernetes".into(),
        format!("--kube-api-url={}", api.url),
        format!("--kube-ca-file={}", api.ca.display()),
        format!("--kube-token-file={}", api.token.display()),
        "--kube-namespace=agentid".into(),
        format!("--replica-id={replica}"),
        format!("--audit-log={}", dir.join("audit.log").display()),
        format!("--listen={listen}"),
        "--admin-socket".into(),
        admin_socket.display().to_string(),
        "--admin-addr=127.0.0.1:0".into(),
    ];
    args.extend_from_slice(extra);
    Daemon::launch(
        &dir.join("server-run"),
        &args,
        admin_socket,
        dir.to_owned(),
        "join a host:",
    )
}

/// `agentid server token create` through `admin_socket` with `extra` flags; the token.
pub fn join_token(admin_socket: &Path, extra: &[&str]) -> String {
    let out = std::process::Command::new(bin())
        .args(["server", "token", "create", "--admin-socket"])
        .arg(admin_socket)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "token create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A TLS identity from a PEM chain file and a PEM key file (a node SVID a node stored, or an
/// SVID `agentid x509 fetch` wrote).
pub fn identity_from(chain: &Path, key: &Path) -> agentid::crypto::tls::Identity {
    let chain: Vec<Vec<u8>> = pem::parse_many(std::fs::read(chain).unwrap())
        .unwrap()
        .into_iter()
        .map(pem::Pem::into_contents)
        .collect();
    let key = pem::parse(std::fs::read(key).unwrap())
        .unwrap()
        .into_contents();
    agentid::crypto::tls::Identity::new(&chain, &key).unwrap()
}

/// The SPIFFE ID of the next SVID an X509-SVID stream sends, within `limit`; panics on a
/// stream error.
pub async fn next_id<S>(stream: &mut S, limit: Duration) -> Option<String>
where
    S: futures::Stream<Item = Result<spiffe::X509Svid, spiffe::workload_api::WorkloadApiError>>
        + Unpin,
{
    use futures::StreamExt;
    match tokio::time::timeout(limit, stream.next()).await {
        Ok(Some(Ok(svid))) => Some(svid.spiffe_id().to_string()),
        Ok(Some(Err(e))) => panic!("stream error: {e}"),
        _ => None,
    }
}

/// Reads the stream until it sends an SVID for `want`, within `limit`; panics with `what`
/// otherwise.
pub async fn wait_for_id<S>(stream: &mut S, want: &str, limit: Duration, what: &str)
where
    S: futures::Stream<Item = Result<spiffe::X509Svid, spiffe::workload_api::WorkloadApiError>>
        + Unpin,
{
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let id = next_id(stream, left)
            .await
            .unwrap_or_else(|| panic!("{what}: no SVID for {want} within {limit:?}"));
        if id == want {
            return;
        }
    }
}
