//! Unix process attestation from `/proc`: uid, gid, supplementary groups, executable path
//! and SHA-256; the user name on demand (`resolve_user_name`), since it follows from the uid.
//!
//! Pid reuse: a pid can be recycled once the caller exits. The peer's pidfd (taken from the
//! socket with `SO_PEERPIDFD`, so it names exactly the connecting process) pins it down. When
//! the connection is accepted, `/proc/<pid>` is opened and kept only if the pidfd shows the
//! process alive after the open: that directory is the caller's, and procfs fails every read
//! through it once the caller has exited, whatever process gets the pid next. Reads go
//! through it with `*at` calls. Without a pidfd, reads go by path and the process is checked
//! to be alive after them: a live process's pid cannot be reused, so everything read was
//! about it.

use std::borrow::Cow;
use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Arc;

use aws_lc_rs::digest;

use super::digest_cache::{DigestCache, FileKey};
use super::{AttestError, WorkloadAttestor};
use crate::node::peer::PeerInfo;
use crate::policy::{FactNeeds, UnixFacts, WorkloadFacts};

/// Attests local processes. Executable digests are cached by (device, inode, size, mtime,
/// ctime) so a fetch does not re-hash a large binary on every call.
#[derive(Clone)]
pub struct UnixAttestor {
    inner: Arc<Inner>,
}

struct Inner {
    digests: DigestCache,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            digests: DigestCache::new(DIGEST_CACHE_MAX),
        }
    }
}

impl Default for UnixAttestor {
    fn default() -> Self {
        Self::new()
    }
}

const DIGEST_CACHE_MAX: usize = 4096;

impl UnixAttestor {
    /// An attestor reading the host's `/proc`.
    pub fn new() -> Self {
        Self {
            inner: Arc::default(),
        }
    }
}

/// The caller's `/proc/<pid>`: its own directory handle (see [`Peer::proc_dir`](crate::node::peer::Peer::proc_dir)), or,
/// without one, the path from the working directory. Entries are read with `*at` calls
/// either way, so the two differ only in what they are relative to.
struct ProcDir<'a> {
    peer: &'a PeerInfo,
    dir: BorrowedFd<'a>,
    /// `/proc/<pid>/` when reading by path, else empty (nothing allocated per call).
    prefix: String,
}

impl<'a> ProcDir<'a> {
    fn of(peer: &'a PeerInfo) -> Self {
        match peer.proc_dir() {
            Some(dir) => Self {
                peer,
                dir,
                prefix: String::new(),
            },
            None => Self {
                peer,
                dir: rustix::fs::CWD,
                prefix: format!("/proc/{}/", peer.pid),
            },
        }
    }

    fn entry<'n>(&self, name: &'n str) -> Cow<'n, str> {
        if self.is_own() {
            Cow::Borrowed(name)
        } else {
            Cow::Owned(format!("{}{name}", self.prefix))
        }
    }

    /// The path of the executable `exe` leads to (`readlinkat`).
    fn exe_path(&self) -> Result<String, AttestError> {
        let link = rustix::fs::readlinkat(self.dir, &*self.entry("exe"), Vec::new())
            .map_err(|e| self.error("exe", e.into()))?;
        Ok(link
            .into_string()
            .unwrap_or_else(|e| e.into_cstring().to_string_lossy().into_owned()))
    }

    /// The file key of the executable `exe` leads to (`statx`).
    fn exe_key(&self) -> Result<FileKey, AttestError> {
        use rustix::fs::{AtFlags, StatxFlags};
        let flags = StatxFlags::BASIC_STATS;
        rustix::fs::statx(self.dir, &*self.entry("exe"), AtFlags::empty(), flags)
            .map(|st| FileKey::from(&st))
            .map_err(|e| self.error("exe", e.into()))
    }

    /// Opens entry `name` for reading.
    fn open(&self, name: &str) -> Result<File, AttestError> {
        use rustix::fs::{Mode, OFlags};
        let flags = OFlags::RDONLY | OFlags::CLOEXEC;
        rustix::fs::openat(self.dir, &*self.entry(name), flags, Mode::empty())
            .map(File::from)
            .map_err(|e| self.error(name, e.into()))
    }

    /// Why reading entry `name` failed. Through the caller's own directory, a read fails
    /// once it has exited: that is said as such.
    fn error(&self, name: &str, source: io::Error) -> AttestError {
        if self.is_own() && !self.peer.is_alive() {
            return AttestError::Exited(self.peer.pid);
        }
        AttestError::Proc {
            path: self.path(name),
            source,
        }
    }

    fn path(&self, name: &str) -> String {
        format!("/proc/{}/{name}", self.peer.pid)
    }

    /// Whether reads go through the caller's own directory handle (not by path).
    fn is_own(&self) -> bool {
        self.prefix.is_empty()
    }

    /// The supplementary groups of the peer, from the `Groups:` line of `status`.
    fn supplementary_gids(&self) -> Result<Vec<u32>, AttestError> {
        let path = self.path("status");
        let err = |source| AttestError::Proc {
            path: path.clone(),
            source,
        };
        // One read gets the whole file unless the group list is very long: no size probe,
        // no read to EOF.
        let mut file = self.open("status")?;
        let mut buf = [0u8; 4096];
        let n = file.read(&mut buf).map_err(err)?;
        let text = match groups_line(&buf[..n]) {
            Some(line) => line,
            None if n < buf.len() => b"",
            None => {
                let mut rest = buf[..n].to_vec();
                file.read_to_end(&mut rest).map_err(err)?;
                return parse_groups(groups_line(&rest).unwrap_or(b""), Path::new(&path));
            }
        };
        parse_groups(text, Path::new(&path))
    }
}

/// The rest of the complete `Groups:` line in `status`, if it is there.
fn groups_line(status: &[u8]) -> Option<&[u8]> {
    let start = if status.starts_with(b"Groups:") {
        0
    } else {
        status.windows(8).position(|w| w == b"\nGroups:")? + 1
    };
    let line = &status[start + b"Groups:".len()..];
    let end = line.iter().position(|&b| b == b'\n')?;
    Some(&line[..end])
}

fn parse_groups(line: &[u8], path: &std::path::Path) -> Result<Vec<u32>, AttestError> {
    let malformed = |detail: String| AttestError::Malformed {
        path: path.display().to_string(),
        detail,
    };
    let line = std::str::from_utf8(line).map_err(|e| malformed(e.to_string()))?;
    line.split_whitespace()
        .map(|g| g.parse().map_err(|_| malformed(format!("group {g:?}"))))
        .collect()
}

#[async_trait::async_trait]
impl WorkloadAttestor for UnixAttestor {
    async fn attest(
        &self,
        peer: &PeerInfo,
        needs: FactNeeds,
    ) -> Result<WorkloadFacts, AttestError> {
        let proc = ProcDir::of(peer);
        // /proc reads are memory-backed and take microseconds: done inline. Each is still a
        // path walk and an access check in the kernel, so only what `needs` asks for is read.
        let path = match needs.exe_path {
            true => Some(proc.exe_path()?),
            false => None,
        };
        let sha256 = match needs.exe_sha256 {
            true => Some(self.exe_digest(&proc).await?),
            false => None,
        };
        let supplementary_gids = match &peer.groups {
            Some(groups) => groups.clone(),
            None => proc.supplementary_gids()?.into(),
        };
        // Read through the caller's own directory, the facts are its own or the reads failed.
        // Anything else (reads by path, or the connection's credentials alone) describes the
        // caller only while the process that connected is still there.
        let read_proc = path.is_some() || sha256.is_some() || peer.groups.is_none();
        let through_own_dir = read_proc && proc.is_own();
        if !(through_own_dir || peer.is_alive()) {
            return Err(AttestError::Exited(peer.pid));
        }
        Ok(WorkloadFacts {
            unix: Some(UnixFacts {
                uid: peer.uid,
                gid: peer.gid,
                supplementary_gids,
                // Looked up only when needed (`resolve_user_name`): it depends on the
                // uid alone, and the passwd lookup costs more than everything above.
                user_name: None,
                path,
                sha256,
            }),
            k8s: None,
        })
    }
}

impl UnixAttestor {
    /// The digest of the caller's executable: from the cache by file key, else hashed.
    async fn exe_digest(&self, proc: &ProcDir<'_>) -> Result<String, AttestError> {
        // /proc/<pid>/exe leads to the very file the process runs, even if it was replaced
        // or deleted on disk since. Its metadata is the digest cache key; the file is opened
        // only to hash it, which is not quick: a miss goes to the blocking pool (once per
        // binary version).
        if let Some(d) = self.inner.digests.get(proc.exe_key()?) {
            return Ok(d);
        }
        let file = proc.open("exe")?;
        let name = proc.path("exe");
        // Keyed by what was opened, in case the process exec'd since the stat.
        let meta = file.metadata().map_err(|source| AttestError::Proc {
            path: name.clone(),
            source,
        })?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.hash(file, &meta, &name))
            .await
            .map_err(|e| AttestError::Malformed {
                path: "digest worker".into(),
                detail: e.to_string(),
            })?
    }
}

impl Inner {
    fn hash(&self, mut file: File, meta: &Metadata, name: &str) -> Result<String, AttestError> {
        let mut ctx = digest::Context::new(&digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = file.read(&mut buf).map_err(|source| AttestError::Proc {
                path: name.to_owned(),
                source,
            })?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
        }
        let d = format!("sha256:{}", hex::encode(ctx.finish()));
        self.digests.insert(meta, &d);
        Ok(d)
    }
}

/// Fills in the user name of a Unix caller if it is not known yet: the attestor leaves it
/// out, and it is looked up only for policies that render it and for audit records.
pub fn resolve_user_name(facts: &mut WorkloadFacts) {
    if let Some(u) = facts.unix.as_mut().filter(|u| u.user_name.is_none()) {
        u.user_name = user_name(u.uid);
    }
}

/// The user name for `uid` from the passwd database, if any.
pub fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes into our buffers and sets `result` to `&pwd` on success.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points to a NUL-terminated string inside `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    name.to_str().ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: FactNeeds = FactNeeds::ALL;
    const NONE: FactNeeds = FactNeeds::NONE;

    #[test]
    fn groups_line_is_found_only_when_complete() {
        let status = b"Name:\tx\nUid:\t0\t0\t0\t0\nGroups:\t4 27 1000 \nNSgid:\t0\n";
        assert_eq!(groups_line(status), Some(&b"\t4 27 1000 "[..]));
        assert_eq!(groups_line(&status[..30]), None, "cut inside the line");
        assert_eq!(groups_line(b"Name:\tx\n"), None);
        let path = std::path::Path::new("/proc/1/status");
        assert_eq!(parse_groups(b"\t4 27 1000 ", path).unwrap(), [4, 27, 1000]);
        assert!(parse_groups(b"\t", path).unwrap().is_empty());
        assert!(matches!(
            parse_groups(b"\t4 x", path),
            Err(AttestError::Malformed { .. })
        ));
    }

    /// Reads go through the caller's own /proc directory: once the caller has exited (and
    /// been reaped, so its pid is free for reuse) attestation says so instead of answering
    /// from whatever now has that pid.
    #[tokio::test]
    async fn a_caller_that_exited_is_refused_through_its_proc_directory() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let peer = PeerInfo::of_pid(child.id() as i32).unwrap();
        assert!(
            peer.proc_dir().is_some(),
            "a pidfd and /proc/<pid> were taken"
        );
        let attestor = UnixAttestor::new();
        let unix = attestor.attest(&peer, ALL).await.unwrap().unix.unwrap();
        let sleep = std::fs::canonicalize(which("sleep")).unwrap();
        assert_eq!(unix.path.as_deref(), sleep.to_str());
        // Groups come from /proc/<pid>/status (no socket to ask): through the directory too.
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        let line = groups_line(status.as_bytes()).unwrap();
        assert_eq!(
            *unix.supplementary_gids,
            parse_groups(line, std::path::Path::new("status")).unwrap()
        );
        // With the groups from the socket and no executable facts asked for, nothing is read
        // from /proc at all: the liveness check still stands for the rest.
        let connected = peer.with_groups(Some(&[4, 5]));
        let bare = attestor
            .attest(&connected, NONE)
            .await
            .unwrap()
            .unix
            .unwrap();
        assert_eq!((bare.path, bare.sha256), (None, None));
        assert_eq!(*bare.supplementary_gids, [4, 5]);
        child.kill().unwrap();
        child.wait().unwrap();
        for (p, needs) in [(&peer, ALL), (&peer, NONE), (&connected, NONE)] {
            let err = attestor.attest(p, needs).await.unwrap_err();
            assert!(
                matches!(err, AttestError::Exited(pid) if pid == peer.pid),
                "{needs:?}: {err:?}"
            );
        }
    }

    /// Each executable fact is read only when asked for, and is the same as when all are.
    #[tokio::test]
    async fn gathers_only_the_executable_facts_asked_for() {
        let attestor = UnixAttestor::new();
        let peer = PeerInfo::current_process();
        let all = attestor.attest(&peer, ALL).await.unwrap().unix.unwrap();
        assert!(all.path.is_some() && all.sha256.is_some());
        for exe_path in [false, true] {
            for exe_sha256 in [false, true] {
                let needs = FactNeeds {
                    exe_path,
                    exe_sha256,
                };
                let unix = attestor.attest(&peer, needs).await.unwrap().unix.unwrap();
                assert_eq!(unix.path.is_some(), exe_path, "{needs:?}");
                assert_eq!(unix.sha256.is_some(), exe_sha256, "{needs:?}");
                let expected = UnixFacts {
                    path: unix.path.clone().or(all.path.clone()),
                    sha256: unix.sha256.clone().or(all.sha256.clone()),
                    ..unix.clone()
                };
                assert_eq!(expected, all, "{needs:?}");
            }
        }
    }

    fn which(cmd: &str) -> std::path::PathBuf {
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join(cmd))
            .find(|p| p.is_file())
            .unwrap()
    }

    #[tokio::test]
    async fn attests_this_process() {
        let attestor = UnixAttestor::new();
        let peer = PeerInfo::current_process();
        // Without SO_PEERGROUPS the groups come from /proc/<pid>/status: the same answer.
        let from_proc = {
            attestor
                .attest(&peer.with_groups(None), ALL)
                .await
                .unwrap()
                .unix
                .unwrap()
                .supplementary_gids
        };
        assert!(peer.groups.is_some());
        let exe = std::env::current_exe().unwrap();
        let expected_sha = crate::crypto::keys::sha256_hex(&std::fs::read(&exe).unwrap());
        let mut groups = vec![0 as libc::gid_t; 4096];
        // SAFETY: getgroups writes at most `groups.len()` entries.
        let n = unsafe { libc::getgroups(groups.len() as i32, groups.as_mut_ptr()) };
        groups.truncate(n.max(0) as usize);
        // First call hashes the executable, the second one finds the digest cached.
        for _ in 0..2 {
            let facts = attestor.attest(&peer, ALL).await.unwrap();
            let unix = facts.unix.unwrap();
            assert_eq!((unix.uid, unix.gid), (peer.uid, peer.gid));
            assert_eq!(unix.path.as_deref(), exe.to_str());
            assert_eq!(unix.sha256.as_deref(), Some(expected_sha.as_str()));
            assert_eq!(*unix.supplementary_gids, groups);
            assert_eq!(*from_proc, groups);
            // Left for `resolve_user_name`, which fills it in from the uid.
            assert_eq!(unix.user_name, None);
            let mut facts = crate::policy::WorkloadFacts {
                unix: Some(unix),
                k8s: None,
            };
            resolve_user_name(&mut facts);
            assert_eq!(facts.unix.unwrap().user_name, user_name(peer.uid));
        }
    }
}
