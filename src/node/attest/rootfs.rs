//! Reading a file as a container sees it, through `/proc/<pid>/root`, without leaving that root.
//!
//! The path is resolved by the kernel with `openat2(2)` and `RESOLVE_IN_ROOT`: `..` stops at
//! the root and symlinks (absolute ones included) resolve inside it, exactly as a `chroot` would,
//! so a container cannot point us at a host file. `RESOLVE_NO_MAGICLINKS` refuses
//! `/proc/<pid>/root`-style links, which would jump out. The final symlink is followed (no
//! `O_NOFOLLOW`): `/usr/bin/python3 -> python3.12` is the normal case, and it stays inside too.
//! Mount points are crossed (no `RESOLVE_NO_XDEV`): volumes and ConfigMaps are mounts in the
//! container's namespace, and `/proc/<pid>/root` walks that namespace's mounts.
//!
//! Non-regular files: the first open is `O_PATH`, which never calls into a driver's `open` (no
//! blocking on a fifo with no writer, no side effects on a device), and is checked with `fstat`.
//! Only a regular file is then reopened for reading through `/proc/self/fd/<n>`: the same inode,
//! with no second path walk for a swap to race into. (`O_NONBLOCK` alone would stop a fifo from
//! blocking but would still open devices.)
//!
//! All of this is blocking I/O: call it from `spawn_blocking` in async code.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use aws_lc_rs::digest;

use super::digest_cache::DigestCache;

/// The most bytes [`read_in_root`] and [`digest_in_root`] read from one file.
pub const MAX_READ_BYTES: u64 = 16 << 20;

/// Why a file inside a root could not be read. Each names the root and the path.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("{path:?}: not an absolute path as the container sees it, or contains a NUL byte")]
    InvalidPath { path: PathBuf },
    #[error("cannot open the root {root}: {source}")]
    Root { root: PathBuf, source: io::Error },
    #[error("{path} not found in {root}")]
    NotFound { root: PathBuf, path: PathBuf },
    #[error("{path} in {root}: resolution refused: {reason}")]
    Refused {
        root: PathBuf,
        path: PathBuf,
        reason: &'static str,
    },
    #[error("{path} in {root}: permission denied")]
    PermissionDenied { root: PathBuf, path: PathBuf },
    #[error("{path} in {root} is a {kind}, not a regular file")]
    NotRegular {
        root: PathBuf,
        path: PathBuf,
        kind: &'static str,
    },
    #[error("{path} in {root} is over the {max}-byte limit ({size} bytes or more)")]
    TooLarge {
        root: PathBuf,
        path: PathBuf,
        size: u64,
        max: u64,
    },
    #[error("opening {path} in {root} safely needs openat2(2) (Linux 5.6 or later)")]
    Unsupported { root: PathBuf, path: PathBuf },
    #[error("{path} in {root}: {source}")]
    Io {
        root: PathBuf,
        path: PathBuf,
        source: io::Error,
    },
}

/// Opens `path` (absolute, as the container sees it) for reading inside `root`; regular files only.
pub fn open_in_root(root: &Path, path: &Path) -> Result<File, RootfsError> {
    let invalid = || RootfsError::InvalidPath {
        path: path.to_owned(),
    };
    if !path.is_absolute() {
        return Err(invalid());
    }
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| invalid())?;
    let io_err = |source: io::Error| RootfsError::Io {
        root: root.to_owned(),
        path: path.to_owned(),
        source,
    };

    // Following `/proc/<pid>/root` here is the point: it is the container's root directory.
    let root_dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(root)
        .map_err(|source| RootfsError::Root {
            root: root.to_owned(),
            source,
        })?;

    let handle =
        File::from(openat2_in_root(&root_dir, &c_path).map_err(|e| errno_error(root, path, e))?);

    // fstat works on an O_PATH descriptor and never touches the file's driver.
    let ft = handle.metadata().map_err(io_err)?.file_type();
    if !ft.is_file() {
        let kind = if ft.is_dir() {
            "directory"
        } else if ft.is_fifo() {
            "fifo"
        } else if ft.is_char_device() {
            "character device"
        } else if ft.is_block_device() {
            "block device"
        } else if ft.is_socket() {
            "socket"
        } else {
            "special file"
        };
        return Err(RootfsError::NotRegular {
            root: root.to_owned(),
            path: path.to_owned(),
            kind,
        });
    }

    // Upgrade the O_PATH handle to a readable one: the same inode, no path walk.
    let fd_path = format!("/proc/self/fd/{}", handle.as_raw_fd());
    File::open(&fd_path).map_err(|e| match e.kind() {
        io::ErrorKind::PermissionDenied => RootfsError::PermissionDenied {
            root: root.to_owned(),
            path: path.to_owned(),
        },
        // Not "not found": the file was found; it is /proc that is missing or odd.
        kind => io_err(io::Error::new(
            kind,
            format!("reopening via {fd_path}: {e}"),
        )),
    })
}

/// Reads a whole regular file inside `root`, up to [`MAX_READ_BYTES`].
pub fn read_in_root(root: &Path, path: &Path) -> Result<Vec<u8>, RootfsError> {
    let mut out = Vec::new();
    read_capped(root, path, MAX_READ_BYTES, |chunk| {
        out.extend_from_slice(chunk)
    })?;
    Ok(out)
}

/// `sha256:<hex>` of a regular file inside `root`, up to [`MAX_READ_BYTES`].
pub fn digest_in_root(root: &Path, path: &Path) -> Result<String, RootfsError> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    read_capped(root, path, MAX_READ_BYTES, |chunk| ctx.update(chunk))?;
    Ok(format!("sha256:{}", hex::encode(ctx.finish().as_ref())))
}

/// Bound on the digests a [`digest_in_root_cached`] cache should hold.
pub const DIGEST_CACHE_MAX: usize = 65_536;

/// `sha256:<hex>` of a regular file inside `root`, like [`digest_in_root`], reusing the
/// digest `cache` holds for an unchanged file (keyed with `fstat` on the descriptor that
/// would be hashed).
pub fn digest_in_root_cached(
    cache: &DigestCache,
    root: &Path,
    path: &Path,
) -> Result<String, RootfsError> {
    let file = open_in_root(root, path)?;
    let meta = file.metadata().map_err(|source| RootfsError::Io {
        root: root.to_owned(),
        path: path.to_owned(),
        source,
    })?;
    if let Some(d) = cache.get(&meta) {
        return Ok(d);
    }
    let mut ctx = digest::Context::new(&digest::SHA256);
    read_file_capped(root, path, file, MAX_READ_BYTES, |chunk| ctx.update(chunk))?;
    let d = format!("sha256:{}", hex::encode(ctx.finish().as_ref()));
    cache.insert(&meta, &d);
    Ok(d)
}

/// Streams the file to `sink`, failing once more than `max` bytes are seen: the size from `fstat`
/// is checked first, and the count again while reading (a file can grow, and procfs says 0).
fn read_capped(
    root: &Path,
    path: &Path,
    max: u64,
    sink: impl FnMut(&[u8]),
) -> Result<(), RootfsError> {
    let file = open_in_root(root, path)?;
    read_file_capped(root, path, file, max, sink)
}

fn read_file_capped(
    root: &Path,
    path: &Path,
    file: File,
    max: u64,
    mut sink: impl FnMut(&[u8]),
) -> Result<(), RootfsError> {
    let too_large = |size| RootfsError::TooLarge {
        root: root.to_owned(),
        path: path.to_owned(),
        size,
        max,
    };
    let io_err = |source| RootfsError::Io {
        root: root.to_owned(),
        path: path.to_owned(),
        source,
    };
    let size = file.metadata().map_err(io_err)?.len();
    if size > max {
        return Err(too_large(size));
    }
    let mut limited = file.take(max + 1);
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match limited.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        };
        total += n as u64;
        if total > max {
            return Err(too_large(total));
        }
        sink(&buf[..n]);
    }
}

/// `openat2(root_dir, path, O_PATH|O_CLOEXEC, RESOLVE_IN_ROOT|RESOLVE_NO_MAGICLINKS)`.
fn openat2_in_root(root_dir: &File, path: &CString) -> io::Result<OwnedFd> {
    // libc marks `open_how` non-exhaustive (the kernel may extend it), so start from zeroes.
    // SAFETY: `open_how` is three integers; all-zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // EAGAIN: a concurrent rename made the kernel unsure the walk stayed inside; retrying is
    // what the man page prescribes. Bounded, so a hostile renamer cannot pin us here.
    let mut attempts = 0;
    loop {
        // SAFETY: `path` is NUL-terminated and `how` lives across the call with its exact size.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root_dir.as_raw_fd(),
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if ret >= 0 {
            let fd = i32::try_from(ret).map_err(|_| io::Error::other("openat2 fd out of range"))?;
            // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EAGAIN) if attempts < 16 => attempts += 1,
            _ => return Err(err),
        }
    }
}

/// Maps an errno from resolution or reopening to what it means here.
fn errno_error(root: &Path, path: &Path, err: io::Error) -> RootfsError {
    let (root, path) = (root.to_owned(), path.to_owned());
    let refused = |reason| RootfsError::Refused {
        root: root.clone(),
        path: path.clone(),
        reason,
    };
    match err.raw_os_error() {
        Some(libc::ENOENT | libc::ENOTDIR) => RootfsError::NotFound { root, path },
        Some(libc::EACCES | libc::EPERM) => RootfsError::PermissionDenied { root, path },
        Some(libc::EXDEV) => refused("the path would escape the root"),
        Some(libc::ELOOP) => {
            refused("a magic link (like /proc/<pid>/root) or too many levels of symlinks")
        }
        Some(libc::ENOSYS) => RootfsError::Unsupported { root, path },
        _ => RootfsError::Io {
            root,
            path,
            source: err,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::process::{Child, Command};
    use std::sync::mpsc;
    use std::time::Duration;

    /// sha256 of "hello\n".
    const HELLO_DIGEST: &str =
        "sha256:5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";

    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn sha256(data: &[u8]) -> String {
        format!(
            "sha256:{}",
            hex::encode(digest::digest(&digest::SHA256, data).as_ref())
        )
    }

    fn root_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        for (path, content) in files {
            let full = root.path().join(path.trim_start_matches('/'));
            fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
            fs::write(full, content).expect("write");
        }
        root
    }

    fn read(root: &Path, path: &str) -> Result<String, RootfsError> {
        read_in_root(root, Path::new(path)).map(|b| String::from_utf8(b).expect("utf8"))
    }

    #[test]
    fn reads_a_file_inside_the_root() {
        let root = root_with(&[("/app/agent.py", "hello\n")]);
        assert_eq!(read(root.path(), "/app/agent.py").unwrap(), "hello\n");
        assert_eq!(
            digest_in_root(root.path(), Path::new("/app/agent.py")).unwrap(),
            HELLO_DIGEST
        );
    }

    #[test]
    fn cached_digests_follow_every_change() {
        let root = root_with(&[("/etc/agent/prompt.md", "aaaa")]);
        let file = root.path().join("etc/agent/prompt.md");
        let path = Path::new("/etc/agent/prompt.md");
        let cache = DigestCache::new(DIGEST_CACHE_MAX);
        let first = digest_in_root_cached(&cache, root.path(), path).unwrap();
        assert_eq!(first, digest_in_root(root.path(), path).unwrap());
        assert_eq!(
            digest_in_root_cached(&cache, root.path(), path).unwrap(),
            first
        );
        // Same size, rewritten in place: ctime moves, so it is re-read.
        std::fs::write(&file, "bbbb").unwrap();
        let second = digest_in_root_cached(&cache, root.path(), path).unwrap();
        assert_ne!(second, first);
        assert_eq!(second, digest_in_root(root.path(), path).unwrap());
        // Replaced by rename (how ConfigMaps and editors update): a new inode.
        let tmp = root.path().join("etc/agent/.prompt.tmp");
        std::fs::write(&tmp, "cccc").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        let third = digest_in_root_cached(&cache, root.path(), path).unwrap();
        assert_eq!(third, digest_in_root(root.path(), path).unwrap());
        assert_ne!(third, second);
        // Refusals are not cached away.
        std::fs::remove_file(&file).unwrap();
        assert!(digest_in_root_cached(&cache, root.path(), path).is_err());
    }

    #[test]
    fn dot_dot_is_clamped_at_the_root() {
        assert!(
            Path::new("/etc/passwd").exists(),
            "the host file this test guards against"
        );
        let root = root_with(&[("/app/agent.py", "x")]);
        for p in ["/../../etc/passwd", "/app/../../../../etc/passwd"] {
            assert!(
                matches!(read(root.path(), p), Err(RootfsError::NotFound { .. })),
                "{p}"
            );
        }
        fs::create_dir(root.path().join("etc")).unwrap();
        fs::write(root.path().join("etc/passwd"), "decoy\n").unwrap();
        for p in ["/../../etc/passwd", "/app/../../../../etc/passwd"] {
            assert_eq!(read(root.path(), p).unwrap(), "decoy\n", "{p}");
        }
        assert!(matches!(
            read(root.path(), "../../etc/passwd"),
            Err(RootfsError::InvalidPath { .. })
        ));
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        assert!(
            Path::new("/etc/shadow").exists(),
            "the host file this test guards against"
        );
        let root = root_with(&[("/app/agent.py", "x")]);
        symlink("/etc/shadow", root.path().join("app/abs")).unwrap();
        symlink("../../../../../etc/shadow", root.path().join("app/rel")).unwrap();
        symlink("/etc", root.path().join("app/etcdir")).unwrap();
        for p in ["/app/abs", "/app/rel", "/app/etcdir/shadow"] {
            let got = read(root.path(), p);
            assert!(
                matches!(got, Err(RootfsError::NotFound { .. })),
                "{p}: {got:?}"
            );
        }
        fs::create_dir(root.path().join("etc")).unwrap();
        fs::write(root.path().join("etc/shadow"), "decoy shadow\n").unwrap();
        for p in ["/app/abs", "/app/rel", "/app/etcdir/shadow"] {
            assert_eq!(read(root.path(), p).unwrap(), "decoy shadow\n", "{p}");
        }
    }

    #[test]
    fn magic_links_and_loops_are_refused() {
        // `/proc/self/root` is a magic link: following it would leave any root.
        let got = read(Path::new("/"), "/proc/self/root/etc/passwd");
        assert!(matches!(got, Err(RootfsError::Refused { .. })), "{got:?}");
        let root = root_with(&[]);
        symlink("b", root.path().join("a")).unwrap();
        symlink("a", root.path().join("b")).unwrap();
        let got = read(root.path(), "/a");
        assert!(matches!(got, Err(RootfsError::Refused { .. })), "{got:?}");
    }

    #[test]
    fn non_regular_files_are_refused_without_blocking() {
        let root = root_with(&[("/app/agent.py", "x")]);
        let fifo = CString::new(root.path().join("app/fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0, "mkfifo");

        // A fifo with no writer blocks a plain open forever: run it where a hang is detectable.
        let (tx, rx) = mpsc::channel();
        let root_path = root.path().to_owned();
        std::thread::spawn(move || {
            let _ = tx.send(digest_in_root(&root_path, Path::new("/app/fifo")));
        });
        let got = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("opening a fifo blocked");
        let err = got.unwrap_err();
        assert!(
            matches!(err, RootfsError::NotRegular { kind: "fifo", .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("/app/fifo"), "{err}");

        let err = read(root.path(), "/app").unwrap_err();
        assert!(
            matches!(
                err,
                RootfsError::NotRegular {
                    kind: "directory",
                    ..
                }
            ),
            "{err:?}"
        );
        let err = read(Path::new("/"), "/dev/null").unwrap_err();
        assert!(
            matches!(
                err,
                RootfsError::NotRegular {
                    kind: "character device",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn size_is_capped() {
        let root = root_with(&[]);
        // Sparse: no disk is spent on the 16 MiB.
        let f = File::create(root.path().join("big")).unwrap();
        f.set_len(MAX_READ_BYTES + 1).unwrap();
        let err = digest_in_root(root.path(), Path::new("/big")).unwrap_err();
        assert!(matches!(err, RootfsError::TooLarge { .. }), "{err:?}");
        assert!(
            open_in_root(root.path(), Path::new("/big")).is_ok(),
            "opening is not capped"
        );
        f.set_len(MAX_READ_BYTES).unwrap();
        let all = read_in_root(root.path(), Path::new("/big")).unwrap();
        assert_eq!(all.len() as u64, MAX_READ_BYTES);

        // procfs reports size 0: the cap must hold while streaming too.
        let err =
            read_capped(Path::new("/"), Path::new("/proc/self/status"), 100, |_| ()).unwrap_err();
        assert!(matches!(err, RootfsError::TooLarge { .. }), "{err:?}");
    }

    #[test]
    fn bad_roots_and_paths_are_named() {
        let root = root_with(&[]);
        let missing = root.path().join("nope");
        let err = read(&missing, "/x").unwrap_err();
        assert!(matches!(err, RootfsError::Root { .. }), "{err:?}");
        assert!(err.to_string().contains("nope"), "{err}");
        let err = read(root.path(), "/missing/file").unwrap_err();
        assert!(matches!(err, RootfsError::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains("/missing/file"), "{err}");
        assert!(matches!(
            read_in_root(root.path(), Path::new("relative")),
            Err(RootfsError::InvalidPath { .. })
        ));
    }

    #[test]
    fn reads_through_a_real_process_root() {
        let dir = root_with(&[("seen.txt", "hello\n")]);
        let file = dir.path().join("seen.txt");
        let child = Kill(
            Command::new("sleep")
                .arg("30")
                .spawn()
                .expect("spawn sleep"),
        );
        let proc_root = PathBuf::from(format!("/proc/{}/root", child.0.id()));
        assert_eq!(digest_in_root(&proc_root, &file).unwrap(), HELLO_DIGEST);
        assert_eq!(
            digest_in_root(&proc_root, &file).unwrap(),
            digest_in_root(Path::new("/"), &file).unwrap()
        );
    }

    /// The digest is of the file the container sees: a bind mount in the child's private mount
    /// namespace shadows the host's file at the same path.
    #[test]
    fn reads_the_container_view_in_a_private_mount_namespace() {
        let dir = root_with(&[
            ("seen.txt", "host view\n"),
            ("only-in-ns.txt", "container view\n"),
        ]);
        let target = dir.path().join("seen.txt");
        let src = CString::new(dir.path().join("only-in-ns.txt").as_os_str().as_bytes()).unwrap();
        let dst = CString::new(target.as_os_str().as_bytes()).unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        // SAFETY: only async-signal-safe syscalls between fork and exec; the strings were
        // allocated before the fork.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                let fail = || Err(io::Error::last_os_error());
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return fail();
                }
                // Private, so the bind mount below cannot propagate back to the host.
                let flags = libc::MS_REC | libc::MS_PRIVATE;
                let none = std::ptr::null();
                if libc::mount(none, c"/".as_ptr(), none, flags, std::ptr::null()) != 0 {
                    return fail();
                }
                if libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    none,
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    return fail();
                }
                Ok(())
            });
        }
        // spawn returns once exec has happened, so the mount is in place.
        let child = Kill(cmd.spawn().unwrap_or_else(|e| {
            panic!("a private mount namespace with a bind mount needs root (CAP_SYS_ADMIN): {e}")
        }));
        let proc_root = PathBuf::from(format!("/proc/{}/root", child.0.id()));
        assert_eq!(
            digest_in_root(&proc_root, &target).unwrap(),
            sha256(b"container view\n")
        );
        assert_eq!(
            digest_in_root(Path::new("/"), &target).unwrap(),
            sha256(b"host view\n")
        );
        assert_eq!(fs::read_to_string(&target).unwrap(), "host view\n");
    }
}
