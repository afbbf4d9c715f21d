//! The Workload API Unix socket: binding it safely and accepting attested connections.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::server::Connected;

use super::h2_authority::AuthorityRewrite;
use super::peer::PeerInfo;

/// Why the socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot create socket directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error(
        "{path} is in use by a running Workload API server (another `agentid up` or SPIRE agent?); stop it or choose another --socket"
    )]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("cannot bind {path}: {source} (is the directory writable?)")]
    Bind { path: PathBuf, source: io::Error },
}

/// A bound Workload API socket; the file is removed when this is dropped.
pub struct WorkloadSocket {
    path: PathBuf,
    ino: u64,
    listener: Option<UnixListener>,
}

impl WorkloadSocket {
    /// Binds `path`. A stale socket left by a crashed daemon is replaced; a live one or any
    /// other kind of file is refused.
    ///
    /// The socket is made connectable by every local user (0777), as SPIRE's agent does:
    /// callers are identified by the kernel's peer credentials, not by who can open the file,
    /// and an agent that cannot connect gets no identity at all. The directory is created
    /// 0755 if missing.
    pub fn bind(path: &Path) -> Result<Self, SocketError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| SocketError::Dir {
                path: dir.to_owned(),
                source,
            })?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(SocketError::InUse {
                        path: path.to_owned(),
                    });
                }
                let _ = std::fs::remove_file(path);
            }
            Ok(_) => {
                return Err(SocketError::NotASocket {
                    path: path.to_owned(),
                });
            }
            Err(_) => {}
        }
        let listener = UnixListener::bind(path).map_err(|source| SocketError::Bind {
            path: path.to_owned(),
            source,
        })?;
        let bind_err = |source| SocketError::Bind {
            path: path.to_owned(),
            source,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).map_err(bind_err)?;
        let ino = std::fs::metadata(path).map_err(bind_err)?.ino();
        Ok(Self {
            path: path.to_owned(),
            ino,
            listener: Some(listener),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepted connections with their peer credentials. Accept errors are logged, never
    /// returned: one bad connection must not stop the server.
    pub fn incoming(&mut self) -> impl Stream<Item = io::Result<PeerStream>> + Send + 'static {
        let listener = self.listener.take().expect("incoming() is called once");
        futures::stream::unfold(listener, |listener| async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => match PeerInfo::from_stream(&stream) {
                        Ok(info) => {
                            return Some((
                                Ok(PeerStream {
                                    io: AuthorityRewrite::new(stream),
                                    info,
                                }),
                                listener,
                            ));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "dropping Workload API connection without peer credentials")
                        }
                    },
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::error!(error = %e, "accepting Workload API connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        })
    }
}

impl Drop for WorkloadSocket {
    fn drop(&mut self) {
        // Remove the file only if it is still ours (not re-bound by another daemon since).
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// One accepted connection: the byte stream (with the HTTP/2 `:authority` fix-up in front)
/// and the kernel's account of who connected.
pub struct PeerStream {
    io: AuthorityRewrite<UnixStream>,
    info: PeerInfo,
}

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_live_socket_and_regular_file_replaces_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/w.sock");
        let s = WorkloadSocket::bind(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o777
        );
        assert!(matches!(
            WorkloadSocket::bind(&path),
            Err(SocketError::InUse { .. })
        ));
        drop(s);
        assert!(!path.exists(), "socket removed on drop");
        // A stale socket file (nobody listening) is replaced.
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        assert!(path.exists());
        let s = WorkloadSocket::bind(&path).unwrap();
        drop(s);
        std::fs::write(&path, "x").unwrap();
        assert!(matches!(
            WorkloadSocket::bind(&path),
            Err(SocketError::NotASocket { .. })
        ));
    }
}
