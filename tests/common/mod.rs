//! Shared harness for integration tests: runs the real `agentid` binary as a child process
//! on a private socket, state directory and admin port.
#![allow(dead_code)]

pub mod cluster;
pub mod k8s;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The `agentid` binary cargo built for these tests.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_agentid")
}

/// A running `agentid up`, killed when dropped.
pub struct Daemon {
    child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub admin: String,
    pub banner: String,
    stderr_path: PathBuf,
}

impl Daemon {
    /// Starts `agentid up` with its files under `dir` plus `extra` arguments, and waits until
    /// it prints the `SPIFFE_ENDPOINT_SOCKET=` line. Panics (with its stderr) if it exits.
    pub fn start_in(dir: &Path, extra: &[&str]) -> Daemon {
        Self::try_start_in(dir, extra).unwrap_or_else(|e| panic!("agentid up did not start: {e}"))
    }

    /// Like `start_in` but returns the failure (exit status and stderr) instead of panicking.
    pub fn try_start_in(dir: &Path, extra: &[&str]) -> Result<Daemon, String> {
        std::fs::create_dir_all(dir).unwrap();
        let (socket, state) = (dir.join("workload.sock"), dir.join("state"));
        let mut args: Vec<String> = vec!["up".into(), "--state-dir".into()];
        args.push(state.display().to_string());
        args.extend(["--socket".into(), socket.display().to_string()]);
        args.extend(["--admin-addr".into(), "127.0.0.1:0".into()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::launch(dir, &args, socket, state, "SPIFFE_ENDPOINT_SOCKET=")
    }

    /// Runs `agentid ARGS…` with its stderr in `dir/stderr.log`, until it prints a line that
    /// starts with `ready`; `socket` and `state` are recorded for the caller.
    pub fn launch(
        dir: &Path,
        args: &[String],
        socket: PathBuf,
        state: PathBuf,
        ready: &str,
    ) -> Result<Daemon, String> {
        std::fs::create_dir_all(dir).unwrap();
        let stderr_path = dir.join("stderr.log");
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .env("AGENTID_LOG", "info,agentid=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap());
        let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut banner = String::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    banner.push_str(&line);
                    banner.push('\n');
                    if line.starts_with(ready) {
                        break;
                    }
                }
                Err(_) => {
                    if let Some(status) = child.try_wait().unwrap() {
                        let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                        return Err(format!("exited with {status}: {err}"));
                    }
                    if std::time::Instant::now() > deadline {
                        let _ = child.kill();
                        return Err("no banner within 20 s".into());
                    }
                }
            }
        }
        let admin = banner
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("admin")
                    .map(|r| r.split_whitespace().next().unwrap_or("").to_owned())
            })
            .unwrap_or_default();
        Ok(Daemon {
            child: Some(child),
            dir: dir.to_owned(),
            socket,
            state,
            admin,
            banner,
            stderr_path,
        })
    }

    /// `unix:///…` for SPIFFE clients.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The daemon's log so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// SIGTERM, then waits for a clean exit; returns whether it exited 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        for _ in 0..100 {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the `agentid` CLI with `args` against `socket`; returns (exit code, stdout, stderr).
pub fn cli(socket: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", socket.display()),
        )
        .output()
        .expect("run agentid");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the CLI as `uid` (and gid `uid`) against `d`; returns (success, stdout, stderr).
pub fn cli_as(uid: u32, d: &Daemon, args: &[&str]) -> (bool, String, String) {
    use std::os::unix::process::CommandExt;
    let out = Command::new(bin())
        .args(args)
        .env("SPIFFE_ENDPOINT_SOCKET", d.endpoint())
        .uid(uid)
        .gid(uid)
        .output()
        .expect("run agentid as another uid");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes a policy file and returns its path.
pub fn write_policy(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    path
}

/// One policy document granting `id_path` to processes of `uid`.
pub fn policy_doc(name: &str, id_path: &str, uid: u32, extra: &str) -> String {
    format!(
        "apiVersion: agentid.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {{name: {name}}}\nspec:\n  spiffeID: \"spiffe://{{{{ .TrustDomain }}}}{id_path}\"\n  hint: {name}\n  selector:\n    unix: {{uid: {uid}}}\n{extra}"
    )
}

/// The uid of this test process.
pub fn my_uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// `GET path` on the admin listener (`admin` as in [`Daemon::admin`]): status code and body.
pub fn http_get(admin: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = admin.trim_start_matches("http://").trim_end_matches('/');
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(conn, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut resp = String::new();
    conn.read_to_string(&mut resp).unwrap();
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (code, body.to_owned())
}
