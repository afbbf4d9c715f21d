//! The node daemon: serves the SPIFFE Workload API on a Unix socket and attests callers.
pub mod answer;
pub mod attest;
pub mod cache;
pub mod composite;
pub mod daemon;
pub mod delegation;
pub mod drift;
pub mod h2_authority;
pub mod issuer;
pub mod k8s;
pub mod peer;
pub mod remote;
pub mod run;
pub mod security_header;
pub mod uds;
pub mod workload_api;

use std::future::Future;
use std::time::Duration;

use tokio::sync::oneshot;
use tonic::transport::Server;

use crate::api::delegation::delegation_server::DelegationServer;
use answer::server::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use delegation::DelegationApi;
use security_header::RequireSecurityHeader;
use uds::WorkloadSocket;
use workload_api::WorkloadApi;

/// How long shutdown waits for open connections to finish before closing them.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// Why serving stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("serving the Workload API: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("building reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Serves the Workload API, the Delegation API, gRPC health and server reflection on `socket`
/// until `shutdown`.
pub async fn serve(
    mut socket: WorkloadSocket,
    api: WorkloadApi,
    delegation: DelegationApi,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<SpiffeWorkloadApiServer<WorkloadApi>>()
        .await;
    health_reporter
        .set_serving::<DelegationServer<DelegationApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // Streams never end by themselves; end them first so the graceful drain can finish.
    let streams = api.shutdown_token();
    let (draining_tx, draining) = oneshot::channel();
    let shutdown = async move {
        shutdown.await;
        streams.cancel();
        let _ = draining_tx.send(());
    };
    let workload = RequireSecurityHeader(SpiffeWorkloadApiServer::new(api));
    // Same socket, same header rule: a browser or a confused proxy cannot mint tokens either.
    let delegation = RequireSecurityHeader(DelegationServer::new(delegation));
    let server = Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(workload)
        .add_service(delegation)
        .serve_with_incoming_shutdown(socket.incoming(), shutdown);
    // Other streams (a gRPC health `Watch`, a reflection session) never end either, and the
    // graceful drain would wait for them forever: give them a bounded time, then stop anyway.
    let deadline = async {
        match draining.await {
            Ok(()) => tokio::time::sleep(DRAIN_LIMIT).await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        result = server => result?,
        () = deadline => tracing::warn!(
            limit = ?DRAIN_LIMIT,
            "connections still open at shutdown; closing them"
        ),
    }
    Ok(())
}
