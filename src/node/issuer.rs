//! The seam between the node daemon and whoever signs for it.
//!
//! In `agentid up` the authority runs in the same process; in cluster mode this trait is
//! implemented by a client of `agentid server`. The node daemon never holds CA keys.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::composite::CompositeIdentity;
use crate::crypto::x509::Extension;
use crate::policy::WorkloadFacts;
use crate::spiffe::{SpiffeBundle, SpiffeId, TrustDomain};
use crate::token::{self, Issued, Refusal, TokenRules};

/// Why a signing request failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct IssueError(pub String);

/// What the node attested about the workload a credential is for. An in-process issuer
/// trusts the node's evaluation; a remote one checks it all again before it signs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkloadClaims {
    pub facts: WorkloadFacts,
    /// The composite identity the node computed for the credential, if it states one.
    pub composite: Option<CompositeIdentity>,
}

/// A request to sign an X509-SVID over a public key the node generated.
#[derive(Debug, Clone)]
pub struct X509Request {
    pub spiffe_id: SpiffeId,
    pub spki_der: Vec<u8>,
    pub ttl: Duration,
    pub extensions: Vec<Extension>,
    pub workload: Arc<WorkloadClaims>,
}

/// A request to sign a JWT-SVID.
#[derive(Debug, Clone)]
pub struct JwtRequest {
    pub spiffe_id: SpiffeId,
    pub audience: Vec<String>,
    pub ttl: Duration,
    pub claims: Map<String, Value>,
    /// Set by the cache from the issue context, only when a token is actually signed.
    pub workload: Option<Arc<WorkloadClaims>>,
}

/// A task-token request for the issuer to check and sign (AGENT-IDENTITY.md §3).
///
/// The node daemon attests the caller and looks up its rules; the issuer enforces them and
/// holds the fan-out counts. A remote issuer that evaluates policy itself may ignore `rules`.
#[derive(Debug, Clone)]
pub struct TaskTokenRequest {
    pub caller: token::Caller,
    pub rules: Arc<TokenRules>,
    pub op: TaskTokenOp,
    pub workload: Arc<WorkloadClaims>,
}

/// What is asked for.
#[derive(Debug, Clone)]
pub enum TaskTokenOp {
    /// A root token for the caller.
    Mint(token::MintRequest),
    /// A narrower token for a child, from a parent the caller holds.
    Delegate {
        parent: String,
        req: token::DelegateRequest,
    },
}

/// Why no task token was issued.
#[derive(Debug, thiserror::Error)]
pub enum TaskTokenError {
    /// A rule refused it.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// A remote issuer's rule refused it.
    #[error("{detail}")]
    RefusedRemotely {
        rule: String,
        detail: String,
        invalid_request: bool,
    },
    /// The issuer could not be asked.
    #[error("issuer unavailable: {0}")]
    Unavailable(IssueError),
}

/// Trust material the node distributes: its own trust domain's bundle and federated ones.
#[derive(Debug, Clone, PartialEq)]
pub struct TrustBundles {
    pub trust_domain: TrustDomain,
    pub own: Arc<SpiffeBundle>,
    /// Foreign trust domains only (never the own one, X-08).
    pub federated: BTreeMap<TrustDomain, Arc<SpiffeBundle>>,
}

impl TrustBundles {
    /// The bundle of `td`, own or federated.
    pub fn get(&self, td: &TrustDomain) -> Option<&SpiffeBundle> {
        if td == &self.trust_domain {
            Some(&self.own)
        } else {
            self.federated.get(td).map(|b| &**b)
        }
    }

    /// The federated trust domains' X.509 authorities as the Workload API's bundle maps carry
    /// them: keyed `spiffe://<td>`, DER certificates concatenated; a domain with none is left
    /// out.
    pub fn federated_x509_ders(&self) -> impl Iterator<Item = (String, Vec<u8>)> + '_ {
        self.federated
            .iter()
            .map(|(td, b)| (td.id_string(), b.x509_der()))
            .filter(|(_, der)| !der.is_empty())
    }
}

/// Signs SVIDs for the node daemon.
#[async_trait::async_trait]
pub trait SvidIssuer: Send + Sync + 'static {
    /// Signs an X509-SVID; returns the chain, leaf first.
    async fn sign_x509(&self, req: X509Request) -> Result<Vec<Vec<u8>>, IssueError>;
    /// Signs a JWT-SVID.
    async fn sign_jwt(&self, req: JwtRequest) -> Result<String, IssueError>;
    /// The trust bundles, updated on every change. A credential signed by a key that is new
    /// to the bundle is returned only once this channel carries that key: streams read the
    /// bundle after the SVIDs, so none is sent with a bundle that cannot verify it.
    fn bundles(&self) -> watch::Receiver<Arc<TrustBundles>>;
    /// Changes when every SVID held should be signed again at once (an emergency rotation
    /// replaced the signing key), after the bundle carrying the new key. The default never
    /// changes.
    fn reissue(&self) -> watch::Receiver<u64> {
        watch::channel(0).1
    }
    /// Checks a task-token request against its rules and signs the token. An issuer that
    /// signs no task tokens keeps this default, and every request is `Unavailable`.
    async fn task_token(&self, req: TaskTokenRequest) -> Result<Issued, TaskTokenError> {
        let _ = req;
        Err(TaskTokenError::Unavailable(IssueError(
            "this issuer signs no task tokens".into(),
        )))
    }
}
