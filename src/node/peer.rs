//! Who is on the other end of a Workload API connection, as the kernel reports it.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use tokio::net::UnixStream;

/// Kernel-reported credentials of a connected peer, taken when the connection is accepted.
///
/// A shared handle: every request on the connection carries it, and each call passes it on
/// through attestation and its stream, so a copy is one reference count, not one per part.
#[derive(Debug, Clone)]
pub struct PeerInfo(Arc<Peer>);

impl std::ops::Deref for PeerInfo {
    type Target = Peer;

    fn deref(&self) -> &Peer {
        &self.0
    }
}

/// The credentials a [`PeerInfo`] shares.
#[derive(Debug)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, from `SO_PEERGROUPS`: like uid and gid, what the kernel recorded
    /// when the peer connected. `None` where the kernel cannot say (then the attestor reads
    /// `/proc/<pid>/status`).
    pub groups: Option<Arc<[u32]>>,
    /// A pidfd naming exactly the peer process, to detect that it exited (pid reuse guard).
    pidfd: Option<OwnedFd>,
    /// `/proc/<pid>` of exactly the peer process (see [`Peer::proc_dir`]).
    proc_dir: Option<OwnedFd>,
}

/// Why peer credentials could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("reading peer credentials: {0}")]
    Creds(std::io::Error),
    #[error("peer has no pid (connection from another pid namespace?)")]
    NoPid,
}

impl PeerInfo {
    /// Reads `SO_PEERCRED` and `SO_PEERPIDFD` from an accepted connection.
    pub fn from_stream(stream: &UnixStream) -> Result<Self, PeerError> {
        let cred = stream.peer_cred().map_err(PeerError::Creds)?;
        let pid = cred.pid().filter(|p| *p > 0).ok_or(PeerError::NoPid)?;
        let pidfd = peer_pidfd(stream.as_raw_fd()).or_else(|| pidfd_open(pid));
        Ok(Self(Arc::new(Peer {
            pid,
            uid: cred.uid(),
            gid: cred.gid(),
            groups: peer_groups(stream.as_raw_fd()).map(Arc::from),
            proc_dir: open_proc_dir(pid, pidfd.as_ref()),
            pidfd,
        })))
    }

    /// Credentials of process `pid` as `/proc` reports them (its owner), for callers that hold
    /// no connection from it (benchmarks). The groups are left to the attestor.
    pub fn of_pid(pid: i32) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(format!("/proc/{pid}"))?;
        let pidfd = pidfd_open(pid);
        Ok(Self(Arc::new(Peer {
            pid,
            uid: meta.uid(),
            gid: meta.gid(),
            groups: None,
            proc_dir: open_proc_dir(pid, pidfd.as_ref()),
            pidfd,
        })))
    }

    /// Credentials for the current process (used by in-process callers and tests).
    pub fn current_process() -> Self {
        let pid = std::process::id() as i32;
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let pidfd = pidfd_open(pid);
        Self(Arc::new(Peer {
            pid,
            uid,
            gid,
            groups: own_groups().map(Arc::from),
            proc_dir: open_proc_dir(pid, pidfd.as_ref()),
            pidfd,
        }))
    }

    /// The same peer with other supplementary groups, for tests of where groups come from.
    #[cfg(test)]
    pub fn with_groups(&self, groups: Option<&[u32]>) -> PeerInfo {
        let dup = |fd: &Option<OwnedFd>| fd.as_ref().map(|f| f.try_clone().expect("dup"));
        PeerInfo(Arc::new(Peer {
            pid: self.pid,
            uid: self.uid,
            gid: self.gid,
            groups: groups.map(Arc::from),
            pidfd: dup(&self.pidfd),
            proc_dir: dup(&self.proc_dir),
        }))
    }
}

impl Peer {
    /// The peer as an audit record's requester.
    pub fn requester(&self) -> crate::audit::Requester {
        crate::audit::Requester::peer(self.pid as u32, self.uid, self.gid)
    }

    /// False once the peer process has exited. Without a pidfd, falls back to `/proc/<pid>`.
    pub fn is_alive(&self) -> bool {
        match &self.pidfd {
            Some(fd) => pidfd_alive(fd),
            None => std::path::Path::new(&format!("/proc/{}", self.pid)).exists(),
        }
    }

    /// `/proc/<pid>` of exactly the peer process, opened while its pidfd said it was alive.
    /// procfs binds the directory to that process: once it has exited, every lookup under it
    /// fails, even if the pid has been reused. A read through it is therefore about the peer
    /// or fails, with no liveness check afterwards. `None` without a pidfd to confirm it.
    pub fn proc_dir(&self) -> Option<BorrowedFd<'_>> {
        self.proc_dir.as_ref().map(AsFd::as_fd)
    }
}

/// Whether the process a pidfd names is still running (a pidfd turns readable when it exits).
fn pidfd_alive(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 0
}

/// Opens `/proc/<pid>` (a path handle, nothing read) and keeps it only if `pidfd` shows the
/// process alive after the open: then the pid had not been reused, and the directory is its.
fn open_proc_dir(pid: i32, pidfd: Option<&OwnedFd>) -> Option<OwnedFd> {
    use rustix::fs::{CWD, Mode, OFlags};
    let pidfd = pidfd?;
    let dir = rustix::fs::openat(
        CWD,
        format!("/proc/{pid}"),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    pidfd_alive(pidfd).then_some(dir)
}

fn peer_pidfd(sock: i32) -> Option<OwnedFd> {
    const SO_PEERPIDFD: libc::c_int = 77; // Linux 6.5+
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `fd`.
    let rc = unsafe {
        libc::getsockopt(
            sock,
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    // SAFETY: on success the kernel handed us a new file descriptor we now own.
    (rc == 0 && fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The peer's supplementary groups as of `connect()` (`SO_PEERGROUPS`, Linux 4.13+).
fn peer_groups(sock: i32) -> Option<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `groups`.
        let rc = unsafe {
            libc::getsockopt(
                sock,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n);
            return Some(groups);
        }
        // ERANGE: the buffer was too small and `len` says how much is needed.
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) || n <= groups.len()
        {
            return None;
        }
        groups.resize(n, 0);
    }
}

/// This process's supplementary groups.
fn own_groups() -> Option<Vec<u32>> {
    // SAFETY: with size 0, getgroups only returns the count.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    let mut groups: Vec<libc::gid_t> = vec![0; usize::try_from(n).ok()?];
    // SAFETY: getgroups writes at most `groups.len()` entries.
    let n = unsafe { libc::getgroups(groups.len() as i32, groups.as_mut_ptr()) };
    groups.truncate(usize::try_from(n).ok()?);
    Some(groups)
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: plain syscall; a non-negative result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_the_peer_groups_from_the_socket() {
        let (a, _b) = UnixStream::pair().unwrap();
        let peer = PeerInfo::from_stream(&a).unwrap();
        assert_eq!(peer.pid, std::process::id() as i32);
        assert_eq!(peer.groups, own_groups().map(Arc::from));
        assert!(peer.is_alive());
    }
}
