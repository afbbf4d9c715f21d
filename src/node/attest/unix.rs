//! Unix process attestation from `/proc`: uid, gid, supplementary groups, user name,
//! executable path and SHA-256.
//!
//! Pid reuse: every read goes through `/proc/<pid>`, and the pid could in principle be
//! recycled if the caller exits mid-attestation. The peer's pidfd (taken from the socket with
//! `SO_PEERPIDFD`, so it names exactly the connecting process) is checked after the reads: a
//! live process's pid cannot be reused, so if it is still alive everything read was about it.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use aws_lc_rs::digest;

use super::{AttestError, WorkloadAttestor};
use crate::node::peer::PeerInfo;
use crate::policy::{UnixFacts, WorkloadFacts};

/// Identity of an executable file's contents, for the digest cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

/// Attests local processes. Executable digests are cached by (device, inode, size, mtime,
/// ctime) so a fetch does not re-hash a large binary on every call.
#[derive(Clone)]
pub struct UnixAttestor {
    proc_root: PathBuf,
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    digests: Mutex<HashMap<FileKey, String>>,
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
            proc_root: PathBuf::from("/proc"),
            inner: Arc::default(),
        }
    }

    fn proc_path(&self, pid: i32, what: &str) -> PathBuf {
        self.proc_root.join(pid.to_string()).join(what)
    }

    /// Opens the executable and returns its cache key, and the cached digest if known.
    fn exe_lookup(&self, pid: i32) -> Result<(File, FileKey, Option<String>), AttestError> {
        let path = self.proc_path(pid, "exe");
        let err = |source| AttestError::Proc {
            path: path.display().to_string(),
            source,
        };
        // Opening /proc/<pid>/exe opens the very file the process runs, even if it was
        // replaced or deleted on disk since.
        let file = File::open(&path).map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        let key = FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        };
        let cached = self
            .inner
            .digests
            .lock()
            .expect("digest cache")
            .get(&key)
            .cloned();
        Ok((file, key, cached))
    }

    fn supplementary_gids(&self, pid: i32) -> Result<Vec<u32>, AttestError> {
        let path = self.proc_path(pid, "status");
        let text = std::fs::read_to_string(&path).map_err(|source| AttestError::Proc {
            path: path.display().to_string(),
            source,
        })?;
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .unwrap_or("");
        line.split_whitespace()
            .map(|g| {
                g.parse().map_err(|_| AttestError::Malformed {
                    path: path.display().to_string(),
                    detail: format!("group {g:?}"),
                })
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl WorkloadAttestor for UnixAttestor {
    async fn attest(&self, peer: &PeerInfo) -> Result<WorkloadFacts, AttestError> {
        let pid = peer.pid;
        // /proc reads are memory-backed and take microseconds: done inline. Hashing an
        // executable is not, so a cache miss goes to the blocking pool (once per binary).
        let exe = self.proc_path(pid, "exe");
        let path = std::fs::read_link(&exe).map_err(|source| AttestError::Proc {
            path: exe.display().to_string(),
            source,
        })?;
        let (file, key, cached) = self.exe_lookup(pid)?;
        let sha256 = match cached {
            Some(d) => d,
            None => {
                let inner = self.inner.clone();
                let name = exe.display().to_string();
                tokio::task::spawn_blocking(move || inner.hash(file, key, &name))
                    .await
                    .map_err(|e| AttestError::Malformed {
                        path: "digest worker".into(),
                        detail: e.to_string(),
                    })??
            }
        };
        let supplementary_gids = self.supplementary_gids(pid)?;
        if !peer.is_alive() {
            return Err(AttestError::Exited(pid));
        }
        Ok(WorkloadFacts {
            unix: Some(UnixFacts {
                uid: peer.uid,
                gid: peer.gid,
                supplementary_gids,
                user_name: user_name(peer.uid),
                path: Some(path.display().to_string()),
                sha256: Some(sha256),
            }),
        })
    }
}

impl Inner {
    fn hash(&self, mut file: File, key: FileKey, name: &str) -> Result<String, AttestError> {
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
        let mut cache = self.digests.lock().expect("digest cache");
        if cache.len() >= DIGEST_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, d.clone());
        Ok(d)
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
