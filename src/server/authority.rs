//! The authority of one trust domain: an X.509 CA and a JWT signing key, persisted in a
//! state directory so a restart keeps the bundle (and every SVID issued before) valid.
//!
//! The state has room for two keys of each kind, `current` and `next`: rotation (prepare
//! `next`, publish it in the bundle, then promote it) builds on this layout.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::watch;

use super::store::{FileStore, StoreError};
use crate::crypto::jwt::{JwtError, JwtSigner, JwtSvidClaims};
use crate::crypto::x509::{CaSigner, Extension, X509Error};
use crate::crypto::{KeyError, PrivateKey};
use crate::spiffe::{JwtKey, SpiffeBundle, SpiffeId, TrustDomain};

/// Why the authority could not start or sign.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{file}: {source}")]
    Key { file: String, source: KeyError },
    #[error("{file}: {source}")]
    Cert { file: String, source: X509Error },
    #[error(
        "state directory belongs to trust domain {found}, not {wanted}; use another --state-dir"
    )]
    TrustDomainMismatch { found: String, wanted: TrustDomain },
    #[error("signing X509-SVID: {0}")]
    SignX509(X509Error),
    #[error("signing JWT-SVID: {0}")]
    SignJwt(JwtError),
    #[error("refusing to sign for {0}: it is not in trust domain {1}")]
    ForeignId(SpiffeId, TrustDomain),
}

/// Tunables of the authority.
#[derive(Debug, Clone)]
pub struct AuthorityConfig {
    /// Lifetime of a newly created CA certificate.
    pub ca_ttl: Duration,
    /// Suggested bundle refresh interval for federation peers.
    pub refresh_hint: Duration,
}

impl Default for AuthorityConfig {
    fn default() -> Self {
        Self {
            ca_ttl: Duration::from_secs(365 * 24 * 3600),
            refresh_hint: Duration::from_secs(300),
        }
    }
}

struct Keys {
    ca_current: CaSigner,
    ca_next: Option<CaSigner>,
    jwt_current: JwtSigner,
    jwt_next: Option<JwtSigner>,
}

/// The trust-domain authority.
pub struct Authority {
    td: TrustDomain,
    keys: RwLock<Keys>,
    bundle: watch::Sender<Arc<SpiffeBundle>>,
    config: AuthorityConfig,
}

const TD_FILE: &str = "trust-domain";
const CA_CERT: [&str; 2] = ["x509-ca.current.crt", "x509-ca.next.crt"];
const CA_KEY: [&str; 2] = ["x509-ca.current.key", "x509-ca.next.key"];
const JWT_KEY: [&str; 2] = ["jwt.current.key", "jwt.next.key"];

impl Authority {
    /// Loads the authority from `dir`, creating keys on first start.
    pub fn open(
        dir: &Path,
        td: TrustDomain,
        config: AuthorityConfig,
    ) -> Result<Self, AuthorityError> {
        let store = FileStore::open(dir)?;
        match store.read(TD_FILE)? {
            Some(found) if found.trim() != td.as_str() => {
                return Err(AuthorityError::TrustDomainMismatch {
                    found: found.trim().into(),
                    wanted: td,
                });
            }
            Some(_) => {}
            None => store.write(TD_FILE, td.as_str().as_bytes())?,
        }
        let ca_current = match load_ca(&store, 0)? {
            Some(ca) => ca,
            None => {
                let ca = CaSigner::generate(&td, config.ca_ttl).map_err(|source| {
                    AuthorityError::Cert {
                        file: CA_CERT[0].into(),
                        source,
                    }
                })?;
                save_ca(&store, 0, &ca)?;
                ca
            }
        };
        let jwt_current = match load_jwt(&store, 0)? {
            Some(k) => k,
            None => {
                let key = PrivateKey::generate().map_err(|source| AuthorityError::Key {
                    file: JWT_KEY[0].into(),
                    source,
                })?;
                store.write(JWT_KEY[0], key.pkcs8_pem().as_bytes())?;
                JwtSigner::new(key)
            }
        };
        let keys = Keys {
            ca_next: load_ca(&store, 1)?,
            jwt_next: load_jwt(&store, 1)?,
            ca_current,
            jwt_current,
        };
        let bundle = Arc::new(bundle_of(&keys, &config, 1));
        Ok(Self {
            td,
            keys: RwLock::new(keys),
            bundle: watch::Sender::new(bundle),
            config,
        })
    }

    /// The trust domain this authority signs for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// The current bundle.
    pub fn bundle(&self) -> Arc<SpiffeBundle> {
        self.bundle.borrow().clone()
    }

    /// A receiver that sees every bundle change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<SpiffeBundle>> {
        self.bundle.subscribe()
    }

    /// The SPIFFE bundle document (JWK Set with `x509-svid` and `jwt-svid` keys).
    pub fn bundle_document(&self) -> Vec<u8> {
        let keys = self.keys.read().expect("keys lock");
        let x509: Vec<(Vec<u8>, Vec<u8>)> = std::iter::once(&keys.ca_current)
            .chain(keys.ca_next.as_ref())
            .map(|ca| (ca.cert_der().to_vec(), ca.key().public_sec1()))
            .collect();
        self.bundle().to_spiffe_json(&x509)
    }

    /// Signs an X509-SVID for `id` over `spki_der`; returns the chain, leaf first.
    pub fn sign_x509_svid(
        &self,
        id: &SpiffeId,
        spki_der: &[u8],
        ttl: Duration,
        extensions: &[Extension],
    ) -> Result<Vec<Vec<u8>>, AuthorityError> {
        self.check_td(id)?;
        let keys = self.keys.read().expect("keys lock");
        let leaf = keys
            .ca_current
            .sign_leaf(id, spki_der, ttl, extensions)
            .map_err(AuthorityError::SignX509)?;
        // The CA signs leaves directly, so the chain is the leaf alone (SPIRE's default).
        Ok(vec![leaf])
    }

    /// Signs a JWT-SVID for `id` and `audience`, valid for `ttl`, carrying `extra` claims.
    pub fn sign_jwt_svid(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        extra: Map<String, Value>,
    ) -> Result<String, AuthorityError> {
        self.check_td(id)?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = JwtSvidClaims {
            sub: id.to_string(),
            aud: audience.to_vec(),
            exp: now + ttl.as_secs().max(1) as i64,
            iat: now,
            iss: self.td.id_string(),
            jti: uuid::Uuid::new_v4().to_string(),
            extra,
        };
        let keys = self.keys.read().expect("keys lock");
        keys.jwt_current
            .sign("JWT", &claims)
            .map_err(AuthorityError::SignJwt)
    }

    /// Runs `f` with the JWT key that signs now, for credentials whose claims another module
    /// builds and checks (task tokens: `token::mint`, `token::delegate`). The key stays here.
    pub fn with_jwt_signer<R>(&self, f: impl FnOnce(&JwtSigner) -> R) -> R {
        let keys = self.keys.read().expect("keys lock");
        f(&keys.jwt_current)
    }

    fn check_td(&self, id: &SpiffeId) -> Result<(), AuthorityError> {
        if id.trust_domain() != &self.td {
            return Err(AuthorityError::ForeignId(id.clone(), self.td.clone()));
        }
        Ok(())
    }

    /// The configuration in force.
    pub fn config(&self) -> &AuthorityConfig {
        &self.config
    }
}

fn bundle_of(keys: &Keys, config: &AuthorityConfig, sequence: u64) -> SpiffeBundle {
    let cas = std::iter::once(&keys.ca_current).chain(keys.ca_next.as_ref());
    let jwts = std::iter::once(&keys.jwt_current).chain(keys.jwt_next.as_ref());
    SpiffeBundle {
        x509_authorities: cas.map(|c| c.cert_der().to_vec()).collect(),
        jwt_authorities: jwts
            .map(|j| JwtKey {
                kid: j.kid().into(),
                public_sec1: j.key().public_sec1(),
            })
            .collect(),
        sequence,
        refresh_hint_secs: config.refresh_hint.as_secs(),
    }
}

fn load_ca(store: &FileStore, slot: usize) -> Result<Option<CaSigner>, AuthorityError> {
    let (Some(cert), Some(key)) = (store.read(CA_CERT[slot])?, store.read(CA_KEY[slot])?) else {
        return Ok(None);
    };
    let key = PrivateKey::from_pkcs8_pem(&key).map_err(|source| AuthorityError::Key {
        file: CA_KEY[slot].into(),
        source,
    })?;
    let der = pem::parse(&cert)
        .map_err(|e| AuthorityError::Cert {
            file: CA_CERT[slot].into(),
            source: X509Error::Parse(e.to_string()),
        })?
        .into_contents();
    CaSigner::from_parts(key, der)
        .map(Some)
        .map_err(|source| AuthorityError::Cert {
            file: CA_CERT[slot].into(),
            source,
        })
}

fn save_ca(store: &FileStore, slot: usize, ca: &CaSigner) -> Result<(), AuthorityError> {
    // Key first: a certificate on disk without its key would be unusable after a crash.
    store.write(CA_KEY[slot], ca.key().pkcs8_pem().as_bytes())?;
    store.write(
        CA_CERT[slot],
        crate::crypto::x509::to_pem(&[ca.cert_der().to_vec()]).as_bytes(),
    )?;
    Ok(())
}

fn load_jwt(store: &FileStore, slot: usize) -> Result<Option<JwtSigner>, AuthorityError> {
    let Some(text) = store.read(JWT_KEY[slot])? else {
        return Ok(None);
    };
    let key = PrivateKey::from_pkcs8_pem(&text).map_err(|source| AuthorityError::Key {
        file: JWT_KEY[slot].into(),
        source,
    })?;
    Ok(Some(JwtSigner::new(key)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::x509::CertInfo;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn task_tokens_signed_with_the_authority_key_verify_against_its_bundle() {
        use crate::token::{self, Caller, MintRequest, TokenRules};
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::open(dir.path(), td(), AuthorityConfig::default()).unwrap();
        let caller = Caller {
            id: "spiffe://example.org/agent/orchestrator".parse().unwrap(),
            cid: None,
        };
        let rules = TokenRules {
            audiences: vec!["ledger".into()],
            scopes: vec!["ledger:read".into()],
            ..TokenRules::default()
        };
        let req = MintRequest {
            audience: vec!["ledger".into()],
            scopes: vec!["ledger:read".into()],
            ..MintRequest::default()
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let jwt = a
            .with_jwt_signer(|s| token::mint(req, &caller, &rules, s, &td(), now))
            .unwrap()
            .token;
        let bundle = a.bundle();
        let claims = token::verify(
            &jwt,
            "ledger",
            Some(&caller.id),
            |t| (t == &td()).then_some(&*bundle),
            now,
        )
        .unwrap();
        assert_eq!(claims.act.sub, caller.id);
        // Another authority's bundle does not verify it.
        let other_dir = tempfile::tempdir().unwrap();
        let other = Authority::open(other_dir.path(), td(), AuthorityConfig::default()).unwrap();
        let other_bundle = other.bundle();
        assert!(token::verify(&jwt, "ledger", None, |_| Some(&*other_bundle), now).is_err());
    }

    #[test]
    fn restart_keeps_bundle_and_mismatched_td_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::open(dir.path(), td(), AuthorityConfig::default()).unwrap();
        let b1 = a.bundle();
        drop(a);
        let a = Authority::open(dir.path(), td(), AuthorityConfig::default()).unwrap();
        assert_eq!(*a.bundle(), *b1);
        let err = Authority::open(
            dir.path(),
            TrustDomain::new("other.org").unwrap(),
            AuthorityConfig::default(),
        )
        .err()
        .unwrap();
        assert!(
            matches!(err, AuthorityError::TrustDomainMismatch { .. }),
            "{err}"
        );
    }

    #[test]
    fn corrupt_key_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        drop(Authority::open(dir.path(), td(), AuthorityConfig::default()).unwrap());
        std::fs::write(dir.path().join("jwt.current.key"), "garbage").unwrap();
        let err = Authority::open(dir.path(), td(), AuthorityConfig::default())
            .err()
            .unwrap();
        assert!(err.to_string().starts_with("jwt.current.key:"), "{err}");
    }

    #[test]
    fn signs_only_its_own_trust_domain() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::open(dir.path(), td(), AuthorityConfig::default()).unwrap();
        let k = PrivateKey::generate().unwrap();
        let id = td().id("/w").unwrap();
        let chain = a
            .sign_x509_svid(&id, &k.spki_der(), Duration::from_secs(60), &[])
            .unwrap();
        assert_eq!(CertInfo::parse(&chain[0]).unwrap().spiffe_id, Some(id));
        let foreign: SpiffeId = "spiffe://other.org/w".parse().unwrap();
        assert!(matches!(
            a.sign_x509_svid(&foreign, &k.spki_der(), Duration::from_secs(60), &[]),
            Err(AuthorityError::ForeignId(..))
        ));
        assert!(
            a.sign_jwt_svid(&foreign, &["a".into()], Duration::from_secs(60), Map::new())
                .is_err()
        );
    }
}
