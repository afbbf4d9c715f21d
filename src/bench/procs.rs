//! The servers under test run as child processes, so each one's memory is its own and the
//! client load (this process) is not counted in it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long a server may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A scratch directory removed when dropped.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates a fresh directory under the system temp dir (short, for socket paths).
    pub fn new() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("agentid-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server child process listening on a Unix socket; killed when dropped.
pub struct Server {
    pub name: &'static str,
    pub socket: PathBuf,
    child: Child,
    stderr: PathBuf,
}

impl Server {
    /// Starts the real daemon, `agentid up`, with its state, socket and admin port private to
    /// this run and the built-in policy (which entitles this process).
    pub fn daemon(exe: &Path, dir: &Path) -> anyhow::Result<Self> {
        Self::daemon_with(exe, dir, "daemon", &[])
    }

    /// Starts `agentid up` like [`Server::daemon`], named `name` (socket, state and log
    /// files), with `extra` flags.
    pub fn daemon_with(
        exe: &Path,
        dir: &Path,
        name: &'static str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let socket = dir.join(format!("{name}.sock"));
        let mut cmd = Command::new(exe);
        cmd.arg("up")
            .arg("--state-dir")
            .arg(dir.join(format!("{name}-state")))
            .arg("--socket")
            .arg(&socket)
            .arg("--admin-addr")
            .arg("127.0.0.1:0")
            .args(extra);
        Self::spawn(name, cmd, socket, dir)
    }

    /// Starts the floor server, `agentid bench-floor`.
    pub fn floor(exe: &Path, dir: &Path) -> anyhow::Result<Self> {
        Self::floor_named(exe, dir, "floor", None)
    }

    /// Starts a floor server named `name` (socket and log files) that busy-waits `spin` in
    /// every call.
    pub fn floor_named(
        exe: &Path,
        dir: &Path,
        name: &'static str,
        spin: Option<Duration>,
    ) -> anyhow::Result<Self> {
        let socket = dir.join(format!("{name}.sock"));
        let mut cmd = Command::new(exe);
        cmd.arg("bench-floor").arg("--socket").arg(&socket);
        if let Some(spin) = spin {
            cmd.arg("--spin")
                .arg(humantime::format_duration(spin).to_string());
        }
        Self::spawn(name, cmd, socket, dir)
    }

    /// Starts `cmd` as the server named `name`, listening on `socket`; logs in `dir`.
    pub(super) fn spawn(
        name: &'static str,
        mut cmd: Command,
        socket: PathBuf,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        // Only the flags given here configure the child, not the caller's environment.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("AGENTID_") {
                cmd.env_remove(k);
            }
        }
        let stderr = dir.join(format!("{name}.stderr"));
        cmd.env("AGENTID_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr)?);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting the {name} server"))?;
        Ok(Self {
            name,
            socket,
            child,
            stderr,
        })
    }

    /// Waits until the server accepts connections.
    pub async fn ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(&self.stderr).unwrap_or_default();
                bail!("the {} server exited with {status}: {log}", self.name);
            }
            if Instant::now() > deadline {
                bail!(
                    "the {} server did not listen within {START_TIMEOUT:?}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resident set size of the server process, from `/proc/<pid>/status` (VmRSS).
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/status", self.child.id());
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let kib: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no VmRSS in {path}"))?;
        Ok(kib * 1024)
    }
}

impl Server {
    /// CPU time (user + system, all threads) the server process has used so far.
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        let path = format!("/proc/{}/stat", self.child.id());
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
        let fields: Vec<&str> = text
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| -> anyhow::Result<u64> {
            Ok(fields
                .get(i - 3)
                .with_context(|| format!("short {path}"))?
                .parse()?)
        };
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let total = ticks(14)? + ticks(15)?;
        Ok(Duration::from_nanos(total * 1_000_000_000 / hz))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Raises the soft open-files limit to the hard limit: a thousand connections need a thousand
/// descriptors on each side, and the servers inherit the raised limit.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}
