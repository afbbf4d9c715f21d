//! The floor: the least a Workload API server can do on a Unix socket. It answers
//! FetchX509SVID and FetchJWTSVID with responses made once at start (a real SVID and a real
//! JWT-SVID, so the bytes on the wire match the daemon's), with no attestation, no security
//! header check, no HTTP/2 fix-up and no per-stream task. The daemon is measured against it.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use anyhow::Context;
use futures::{Stream, StreamExt};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

use crate::api::workload as pb;
use crate::api::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use crate::crypto::PrivateKey;
use crate::crypto::jwt::{JwtSigner, JwtSvidClaims};
use crate::crypto::x509::CaSigner;
use crate::policy::{PolicySet, UnixFacts, WorkloadFacts};
use crate::spiffe::{SpiffeId, TrustDomain};

/// The audience the benchmark asks JWT-SVIDs for.
pub const AUDIENCE: &str = "bench";

/// Pre-made responses, cloned for every call.
#[derive(Clone)]
pub struct Floor {
    x509: pb::X509svidResponse,
    jwt: pb::JwtsvidResponse,
    /// Busy-waited in every call before answering (zero: not at all).
    spin: Duration,
}

impl Floor {
    /// Signs one X509-SVID and one JWT-SVID for `id`, shaped like the daemon's.
    pub fn new(id: &SpiffeId, hint: &str) -> anyhow::Result<Self> {
        let td: &TrustDomain = id.trust_domain();
        let ttl = crate::policy::DEFAULT_X509_TTL;
        let ca = CaSigner::generate(td, Duration::from_secs(24 * 3600))?;
        let key = PrivateKey::generate()?;
        let leaf = ca.sign_leaf(id, &key.spki_der(), ttl, &[])?;
        let x509 = pb::X509svidResponse {
            svids: vec![pb::X509svid {
                spiffe_id: id.to_string(),
                x509_svid: leaf.into(),
                x509_svid_key: key.pkcs8_der().into(),
                bundle: ca.cert_der().to_vec().into(),
                hint: hint.into(),
            }],
            crl: Vec::new(),
            federated_bundles: Default::default(),
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = JwtSvidClaims {
            sub: id.to_string(),
            aud: vec![AUDIENCE.into()],
            exp: now + crate::policy::DEFAULT_JWT_TTL.as_secs() as i64,
            iat: now,
            iss: td.id_string(),
            jti: uuid::Uuid::new_v4().to_string(),
            extra: Default::default(),
        };
        let token = JwtSigner::new(PrivateKey::generate()?).sign("JWT", &claims)?;
        let jwt = pb::JwtsvidResponse {
            svids: vec![pb::Jwtsvid {
                spiffe_id: id.to_string(),
                svid: token,
                hint: hint.into(),
            }],
        };
        Ok(Self {
            x509,
            jwt,
            spin: Duration::ZERO,
        })
    }

    /// Busy-waits `spin` in every call: server CPU added on purpose, for calibration.
    pub fn with_spin(self, spin: Duration) -> Self {
        Self { spin, ..self }
    }

    fn spin(&self) {
        if self.spin.is_zero() {
            return;
        }
        let start = std::time::Instant::now();
        while start.elapsed() < self.spin {
            std::hint::spin_loop();
        }
    }

    /// The FetchX509SVID message.
    pub fn x509(&self) -> &pb::X509svidResponse {
        &self.x509
    }

    /// The FetchJWTSVID response.
    pub fn jwt(&self) -> &pb::JwtsvidResponse {
        &self.jwt
    }
}

type StreamOf<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn unimplemented<T>() -> Result<T, Status> {
    Err(Status::unimplemented("not part of the benchmark floor"))
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for Floor {
    type FetchX509SVIDStream = StreamOf<pb::X509svidResponse>;
    type FetchX509BundlesStream = StreamOf<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = StreamOf<pb::JwtBundlesResponse>;
    type FetchWITSVIDStream = StreamOf<pb::WitsvidResponse>;
    type FetchWITBundlesStream = StreamOf<pb::WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        _: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        self.spin();
        // One message, then the stream stays open (as a real one does) until the client leaves.
        let first = futures::stream::once(std::future::ready(Ok(self.x509.clone())));
        Ok(Response::new(Box::pin(
            first.chain(futures::stream::pending()),
        )))
    }

    async fn fetch_jwtsvid(
        &self,
        _: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        self.spin();
        Ok(Response::new(self.jwt.clone()))
    }

    async fn fetch_x509_bundles(
        &self,
        _: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        unimplemented()
    }

    async fn fetch_jwt_bundles(
        &self,
        _: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        unimplemented()
    }

    async fn validate_jwtsvid(
        &self,
        _: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        unimplemented()
    }

    async fn fetch_witsvid(
        &self,
        _: Request<pb::WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        unimplemented()
    }

    async fn fetch_wit_bundles(
        &self,
        _: Request<pb::WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        unimplemented()
    }
}

/// The identity (SPIFFE ID and hint) the daemon's built-in policy gives the current user, so
/// both servers send the same message.
pub fn default_identity() -> anyhow::Result<(SpiffeId, String)> {
    let td = TrustDomain::new("agentid.local")?;
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let name = crate::node::attest::user_name(uid);
    let policies = PolicySet::default_for_user(uid, name.as_deref().unwrap_or_default());
    let facts = WorkloadFacts {
        unix: Some(UnixFacts {
            uid,
            user_name: name,
            ..Default::default()
        }),
        k8s: None,
    };
    let e = policies
        .entitlements(&td, &facts)
        .0
        .into_iter()
        .next()
        .context("the built-in policy gives the current user no identity")?;
    Ok((e.spiffe_id, e.hint))
}

/// `agentid bench-floor`: serves the floor on `socket` until `shutdown`, busy-waiting `spin`
/// in every call.
pub async fn serve(
    socket: &Path,
    spin: Duration,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (id, hint) = default_identity()?;
    let floor = Floor::new(&id, &hint)?.with_spin(spin);
    let _ = std::fs::remove_file(socket);
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    Server::builder()
        .add_service(SpiffeWorkloadApiServer::new(floor))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    let _ = std::fs::remove_file(socket);
    Ok(())
}
