//! Helpers shared by the lifecycle, policy-reload and operations tests: raw Workload API
//! calls through the crate's own generated client, the admin endpoint over plain HTTP/1.0,
//! the audit log as JSON, and `agentid up` runs that are expected to fail.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use agentid::api::workload as pb;
use agentid::client::Client;
use agentid::crypto::x509::{CertInfo, split_der_chain, to_pem};

/// How long any single expected event may take before a test fails.
pub const EVENT: Duration = Duration::from_secs(5);

/// A Workload API client on `socket` (the crate's generated client, security header set).
pub async fn connect(socket: &Path) -> Client {
    agentid::client::connect(socket)
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()))
}

/// Opens a FetchX509SVID stream and returns it with its first message.
pub async fn open_x509_stream(
    socket: &Path,
) -> (tonic::Streaming<pb::X509svidResponse>, pb::X509svidResponse) {
    let mut client = connect(socket).await;
    let mut stream = client
        .fetch_x509svid(pb::X509svidRequest {})
        .await
        .expect("FetchX509SVID")
        .into_inner();
    let first = next_within(&mut stream, EVENT)
        .await
        .expect("first FetchX509SVID message within 5 s")
        .expect("first FetchX509SVID message is not an error")
        .expect("stream open");
    (stream, first)
}

/// The next item of `stream` if one arrives within `wait`; `None` when nothing arrived.
pub async fn next_within<T>(
    stream: &mut tonic::Streaming<T>,
    wait: Duration,
) -> Option<Result<Option<T>, tonic::Status>> {
    tokio::time::timeout(wait, stream.message()).await.ok()
}

/// A one-shot FetchX509SVID (new connection, first message).
pub async fn fetch_x509(socket: &Path) -> Result<pb::X509svidResponse, tonic::Status> {
    let mut client = connect(socket).await;
    let mut stream = client
        .fetch_x509svid(pb::X509svidRequest {})
        .await?
        .into_inner();
    let msg = tokio::time::timeout(EVENT, stream.message())
        .await
        .expect("FetchX509SVID answers within 5 s")?;
    Ok(msg.expect("a message before the stream ends"))
}

/// FetchJWTSVID for `audience`, optionally for one SPIFFE ID.
pub async fn fetch_jwt(
    socket: &Path,
    audience: &str,
    spiffe_id: &str,
) -> Result<pb::JwtsvidResponse, tonic::Status> {
    let mut client = connect(socket).await;
    client
        .fetch_jwtsvid(pb::JwtsvidRequest {
            audience: vec![audience.to_owned()],
            spiffe_id: spiffe_id.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// ValidateJWTSVID; returns the SPIFFE ID the daemon vouches for.
pub async fn validate_jwt(
    socket: &Path,
    audience: &str,
    token: &str,
) -> Result<String, tonic::Status> {
    let mut client = connect(socket).await;
    client
        .validate_jwtsvid(pb::ValidateJwtsvidRequest {
            audience: audience.to_owned(),
            svid: token.to_owned(),
        })
        .await
        .map(|r| r.into_inner().spiffe_id)
}

/// The X.509 and JWT bundles of the own trust domain, as served.
pub async fn fetch_bundles(socket: &Path, td_id: &str) -> (Vec<u8>, serde_json::Value) {
    let mut client = connect(socket).await;
    let x509 = client
        .fetch_x509_bundles(pb::X509BundlesRequest {})
        .await
        .expect("FetchX509Bundles")
        .into_inner()
        .message()
        .await
        .expect("X.509 bundle message")
        .expect("X.509 bundle message before the end");
    let jwt = client
        .fetch_jwt_bundles(pb::JwtBundlesRequest {})
        .await
        .expect("FetchJWTBundles")
        .into_inner()
        .message()
        .await
        .expect("JWT bundle message")
        .expect("JWT bundle message before the end");
    let x = x509.bundles.get(td_id).cloned().expect("own X.509 bundle");
    let j = jwt.bundles.get(td_id).expect("own JWT bundle");
    (x, serde_json::from_slice(j).expect("JWT bundle is JSON"))
}

/// The leaf of an X509-SVID, parsed.
pub fn leaf(svid: &pb::X509svid) -> CertInfo {
    let chain = split_der_chain(&svid.x509_svid).expect("x509_svid is concatenated DER");
    CertInfo::parse(&chain[0]).expect("leaf parses")
}

/// SPIFFE IDs of a response, in order.
pub fn ids(msg: &pb::X509svidResponse) -> Vec<String> {
    msg.svids.iter().map(|s| s.spiffe_id.clone()).collect()
}

/// Leaf serials of a response, in order.
pub fn serials(msg: &pb::X509svidResponse) -> Vec<String> {
    msg.svids.iter().map(|s| leaf(s).serial_hex).collect()
}

/// Writes concatenated DER certificates as a PEM file.
pub fn write_pem(path: &Path, concatenated_der: &[u8]) {
    std::fs::write(path, to_pem(&split_der_chain(concatenated_der).unwrap())).unwrap();
}

/// `openssl verify -CAfile ca cert`: whether it printed OK, and its output.
pub fn openssl_verify(ca: &Path, cert: &Path) -> (bool, String) {
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(ca)
        .arg(cert)
        .output()
        .expect("this test needs `openssl` on PATH (.ci/run installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && text.contains(": OK"), text)
}

/// Writes `contents` to `path` atomically (temp file in the same directory, then rename), so
/// the daemon's file watcher never reads a half-written policy.
pub fn replace_file(path: &Path, contents: &str) {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Permission bits of `path`.
pub fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// `host:port` of the admin listener from the banner's `http://host:port/`.
pub fn admin_addr(admin: &str) -> String {
    admin
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// GET `path` from the admin listener with a bare HTTP/1.0 request; (status, body).
pub fn http_get(admin: &str, path: &str) -> (u16, String) {
    let addr = admin_addr(admin);
    let mut s =
        TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connecting to admin {addr}: {e}"));
    s.set_read_timeout(Some(EVENT)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {head:?}"));
    (status, body.to_owned())
}

/// Sum of every sample of the metric family `name` (any labels) in a Prometheus text body
/// whose labels contain all of `labels` (e.g. `kind="x509-svid"`).
pub fn metric(body: &str, name: &str, labels: &[&str]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|want| rest.contains(want)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// The audit log's records, parsed.
pub fn audit_records(state: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(state.join("audit.log")).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
        .collect()
}

/// The `data.decision.action` of every audit record, in order.
pub fn audit_actions(state: &Path) -> Vec<String> {
    audit_records(state)
        .iter()
        .map(|r| {
            r["data"]["decision"]["action"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect()
}

/// Polls `f` until it returns `Some` or `wait` passes.
pub async fn eventually<T>(wait: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Runs `agentid up` with exactly `args` (no harness defaults) and waits for it to exit;
/// returns (exit code, stderr). Panics if it is still running after 20 s, i.e. started
/// serving when it should have refused.
pub fn up_expecting_exit(args: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let err_path = dir.path().join("stderr.log");
    let mut child = Command::new(common_bin())
        .arg("up")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("spawn agentid up");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "agentid up {args:?} kept running; expected it to refuse to start. stderr: {}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.code().unwrap_or(-1),
        std::fs::read_to_string(&err_path).unwrap_or_default(),
    )
}

fn common_bin() -> &'static str {
    env!("CARGO_BIN_EXE_agentid")
}

/// Seconds until `t` (negative when past), for messages.
pub fn secs_until(t: SystemTime) -> f64 {
    match t.duration_since(SystemTime::now()) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// A path under `dir`, created as a directory.
pub fn subdir(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Fails loudly unless the tests run as root (needed to run a client as another uid).
pub fn require_root(why: &str) {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test must run as root ({why}); it runs as euid {euid}. Run `cargo test` as root (as .ci/run does) — it is not skipped"
    );
}

/// A plain gRPC channel to the Unix socket at `path` (no Workload API header), for the other
/// services the daemon serves (health, reflection).
pub async fn uds_channel(path: &Path) -> tonic::transport::Channel {
    let owned = path.to_owned();
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = owned.clone();
            async move {
                tokio::net::UnixStream::connect(p)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", path.display()))
}
