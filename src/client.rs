//! A Workload API client over a Unix socket, for the CLI and the benchmark.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::api::delegation::delegation_client::DelegationClient;
use crate::api::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

/// Why the client could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no Workload API socket given: pass --socket or set SPIFFE_ENDPOINT_SOCKET (is `agentid up` running? it prints the value)"
    )]
    NoSocket,
    #[error(
        "{0:?} is not a unix socket address (expected unix:///path or an absolute path); this client speaks only Unix sockets"
    )]
    BadAddress(String),
    #[error(
        "no Workload API socket at {0}: is `agentid up` running, and is this the path it printed?"
    )]
    Missing(PathBuf),
    /// A socket file nobody accepts on (typically left by a daemon that was killed). The
    /// cause is the error's source, not repeated here: `{:#}` would print it twice.
    #[error("cannot connect to {path} (is `agentid up` running, and is this the path it printed?)")]
    Connect {
        path: PathBuf,
        source: tonic::transport::Error,
    },
}

/// Adds the mandatory `workload.spiffe.io: true` metadata to every call.
#[derive(Clone, Copy, Default)]
pub struct SecurityHeader;

impl Interceptor for SecurityHeader {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert(
            crate::api::SECURITY_HEADER,
            tonic::metadata::MetadataValue::from_static("true"),
        );
        Ok(req)
    }
}

/// A connected Workload API client.
pub type Client = SpiffeWorkloadApiClient<InterceptedService<Channel, SecurityHeader>>;

/// Resolves `--socket` / `SPIFFE_ENDPOINT_SOCKET` (a path, `unix:///path` or `unix:/path`).
pub fn socket_path(arg: Option<&str>) -> Result<PathBuf, ClientError> {
    let raw = arg.filter(|s| !s.is_empty()).ok_or(ClientError::NoSocket)?;
    let path = raw
        .strip_prefix("unix://")
        .or_else(|| raw.strip_prefix("unix:"))
        .unwrap_or(raw);
    if !path.starts_with('/') {
        return Err(ClientError::BadAddress(raw.to_owned()));
    }
    Ok(PathBuf::from(path))
}

/// A connected client of the task-token service on the same socket.
pub type TokenClient = DelegationClient<InterceptedService<Channel, SecurityHeader>>;

/// Opens a Workload API client on the socket at `path`.
pub async fn connect(path: &Path) -> Result<Client, ClientError> {
    Ok(SpiffeWorkloadApiClient::with_interceptor(
        channel(path).await?,
        SecurityHeader,
    ))
}

/// Opens a Delegation API client on the socket at `path`.
pub async fn connect_tokens(path: &Path) -> Result<TokenClient, ClientError> {
    Ok(DelegationClient::with_interceptor(
        channel(path).await?,
        SecurityHeader,
    ))
}

/// Opens a channel to the Workload API socket at `path`, with errors that say what to do.
async fn channel(path: &Path) -> Result<Channel, ClientError> {
    if !path.exists() {
        return Err(ClientError::Missing(path.to_owned()));
    }
    unix_channel(path)
        .await
        .map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })
}

/// A gRPC channel over the Unix socket at `path` (any of ours: Workload API, server admin).
pub async fn unix_channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let owned = path.to_owned();
    // The URI is a placeholder: the connector ignores it and dials the socket.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = owned.clone();
            async move { tokio::net::UnixStream::connect(p).await.map(TokioIo::new) }
        }))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_forms() {
        assert_eq!(
            socket_path(Some("unix:///run/a.sock")).unwrap(),
            PathBuf::from("/run/a.sock")
        );
        assert_eq!(
            socket_path(Some("unix:/run/a.sock")).unwrap(),
            PathBuf::from("/run/a.sock")
        );
        assert_eq!(
            socket_path(Some("/run/a.sock")).unwrap(),
            PathBuf::from("/run/a.sock")
        );
        assert!(matches!(
            socket_path(Some("tcp://127.0.0.1:1")),
            Err(ClientError::BadAddress(_))
        ));
        assert!(matches!(socket_path(None), Err(ClientError::NoSocket)));
    }
}
