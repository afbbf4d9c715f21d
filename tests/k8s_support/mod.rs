//! Real "containers" for Kubernetes attestation tests: a child process with its own mount
//! namespace (its `/etc` is a directory the test prepares, so the files it sees are not the
//! node's), placed in a kubelet-style cgroup so the kernel reports a pod UID and container ID
//! in `/proc/<pid>/cgroup`. The child is this test binary, re-run in a mode where it fetches
//! SVIDs with the `spiffe` crate and prints what it got as JSON lines.
//!
//! Needs root, `unshare(1)` and a writable cgroup hierarchy; without them the tests fail with
//! the reason (never skip).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use agentid::node::attest::cgroup::{self, Driver, Qos, Runtime};
use agentid::node::attest::cgroup_fs::{CgroupGuard, place_in_cgroup};

/// Environment variable that puts the test binary in child mode (`fetch` or `watch`).
pub const CHILD_MODE: &str = "AGENTID_TEST_CHILD_MODE";

/// A pod UID and container ID, random per test.
pub fn new_ids() -> (String, String) {
    let uid = uuid::Uuid::new_v4().to_string();
    let cid = format!("{:016x}", fastrand::u64(..)).repeat(4);
    (uid, cid)
}

/// Files the container sees under its `/etc` (paths relative to `/etc`).
pub struct ContainerFs {
    dir: tempfile::TempDir,
}

impl ContainerFs {
    /// An `/etc` for the container with the loader cache (so the child's binary still loads).
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        if Path::new("/etc/ld.so.cache").exists() {
            std::fs::copy("/etc/ld.so.cache", dir.path().join("ld.so.cache")).unwrap();
        }
        Self { dir }
    }

    pub fn write(&self, rel: &str, contents: &str) {
        let p = self.dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, contents).unwrap();
    }

    pub fn symlink(&self, rel: &str, target: &str) {
        let p = self.dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, p).unwrap();
    }

    /// The host path of a file the container sees as `/etc/<rel>`.
    pub fn host_path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

/// A running child "container".
pub struct Container {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    _cgroup: CgroupGuard,
    pub pod_uid: String,
    pub container_id: String,
}

impl Container {
    /// Starts the child test `entry` (an `#[ignore]`d test of the calling test binary) in
    /// `mode`, with `etc` as its `/etc`, in the cgroup of container `container_id` of pod
    /// `pod_uid`. It waits for [`Container::go`] before connecting to `socket`.
    pub fn start(
        entry: &str,
        mode: &str,
        socket: &Path,
        etc: &ContainerFs,
        pod_uid: &str,
        container_id: &str,
    ) -> Container {
        let exe = std::env::current_exe().unwrap();
        let script = r#"mount --bind "$ETC_DIR" /etc || exit 97; exec "$@""#;
        let mut child = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "sh",
            ])
            .arg(&exe)
            .args([
                entry,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("ETC_DIR", etc.dir.path())
            .env(CHILD_MODE, mode)
            .env(
                "SPIFFE_ENDPOINT_SOCKET",
                format!("unix://{}", socket.display()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("these tests need unshare(1) and root: {e}"));
        let rel = cgroup::kubelet_cgroup_path(
            Qos::Burstable,
            pod_uid,
            container_id,
            Driver::Cgroupfs,
            Runtime::Containerd,
        );
        let guard = place_in_cgroup(child.id(), &rel).unwrap_or_else(|e| {
            let _ = child.kill();
            panic!(
                "Kubernetes attestation tests must place a process in a kubelet-style cgroup \
                 ({rel}) and could not: {e}. They need root and a writable cgroup hierarchy \
                 under /sys/fs/cgroup."
            )
        });
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // The test harness may print "test child_entry ... " on the same line.
                if let Some(at) = line.find("CHILD ") {
                    let _ = tx.send(line[at + "CHILD ".len()..].to_owned());
                }
            }
        });
        let stdin = child.stdin.take();
        Container {
            child,
            stdin,
            lines,
            _cgroup: guard,
            pod_uid: pod_uid.to_owned(),
            container_id: container_id.to_owned(),
        }
    }

    /// Lets the child connect and fetch.
    pub fn go(&mut self) {
        let stdin = self.stdin.as_mut().expect("go called twice");
        writeln!(stdin, "go").unwrap();
        stdin.flush().unwrap();
    }

    /// The next JSON line the child printed.
    pub fn next(&self, within: Duration) -> serde_json::Value {
        let line = self
            .lines
            .recv_timeout(within)
            .unwrap_or_else(|_| panic!("child printed nothing within {within:?}"));
        serde_json::from_str(&line).unwrap()
    }

    /// The pid, as the node sees it.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child side: waits for "go", then fetches (mode `fetch`: one X509-SVID and one JWT-SVID)
/// or streams (mode `watch`: every X509-SVID update until the stream ends), printing each
/// result as `CHILD <json>`. Returns at once when not in child mode.
pub async fn child_main() {
    let Ok(mode) = std::env::var(CHILD_MODE) else {
        return;
    };
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let emit = |v: serde_json::Value| println!("CHILD {v}");
    let client = match spiffe::WorkloadApiClient::connect_env().await {
        Ok(c) => c,
        Err(e) => return emit(serde_json::json!({"error": format!("{e:?}")})),
    };
    match mode.as_str() {
        "fetch" => {
            let x509 = client.fetch_x509_svid().await;
            let jwt = client.fetch_jwt_token(["ledger"], None).await;
            emit(match (x509, jwt) {
                (Ok(svid), Ok(token)) => serde_json::json!({
                    "spiffe_id": svid.spiffe_id().to_string(),
                    "leaf": hex::encode(svid.leaf().as_bytes()),
                    "jwt": token,
                }),
                (Err(e), _) | (_, Err(e)) => serde_json::json!({"error": format!("{e:?}")}),
            });
        }
        "watch" => {
            use futures::StreamExt;
            let mut stream = match client.stream_x509_svids().await {
                Ok(s) => s,
                Err(e) => return emit(serde_json::json!({"error": format!("{e:?}")})),
            };
            while let Some(item) = stream.next().await {
                match item {
                    Ok(svid) => emit(serde_json::json!({
                        "spiffe_id": svid.spiffe_id().to_string(),
                        "leaf": hex::encode(svid.leaf().as_bytes()),
                    })),
                    Err(e) => return emit(serde_json::json!({"error": format!("{e:?}")})),
                }
            }
            emit(serde_json::json!({"error": "stream ended"}));
        }
        other => panic!("unknown child mode {other}"),
    }
}
