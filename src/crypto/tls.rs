//! TLS between node daemons and the server: TLS 1.3, X509-SVIDs on both sides, checked against
//! the trust domain's bundle and by SPIFFE ID instead of a DNS name (as SPIRE does).
//!
//! The trust roots and each side's own certificate change at run time (CA and SVID
//! rotation), so both live behind locks that verifiers and resolvers read per handshake.

use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};

use super::x509::CertInfo;
use crate::spiffe::{SpiffeBundle, SpiffeId};

/// ALPN for gRPC.
const H2: &[u8] = b"h2";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the bundle holds no usable X.509 authority: {0}")]
    Roots(String),
    #[error("certificate and key: {0}")]
    Identity(rustls::Error),
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The bundle's X.509 authorities as rustls trust anchors.
fn roots(bundle: &SpiffeBundle) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in &bundle.x509_authorities {
        roots
            .add(CertificateDer::from(ca.clone()))
            .map_err(|e| TlsError::Roots(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TlsError::Roots("no authorities".into()));
    }
    Ok(Arc::new(roots))
}

/// An X509-SVID and its key, swappable at run time: what this side presents.
#[derive(Debug, Clone)]
pub struct Identity(Arc<RwLock<Arc<CertifiedKey>>>);

impl Identity {
    /// From a DER chain (leaf first) and a PKCS#8 DER key.
    pub fn new(chain: &[Vec<u8>], key_pkcs8: &[u8]) -> Result<Self, TlsError> {
        Ok(Self(Arc::new(RwLock::new(certified(chain, key_pkcs8)?))))
    }

    /// Replaces the certificate and key (rotation); new handshakes use them.
    pub fn replace(&self, chain: &[Vec<u8>], key_pkcs8: &[u8]) -> Result<(), TlsError> {
        *self.0.write().expect("identity lock") = certified(chain, key_pkcs8)?;
        Ok(())
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.0.read().expect("identity lock").clone()
    }
}

fn certified(chain: &[Vec<u8>], key_pkcs8: &[u8]) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8.to_vec()));
    CertifiedKey::from_der(certs, key, &provider())
        .map(Arc::new)
        .map_err(TlsError::Identity)
}

impl ResolvesServerCert for Identity {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for Identity {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// The trust domain's X.509 authorities, swappable when the bundle changes.
#[derive(Debug, Clone)]
pub struct Trust(Arc<RwLock<Arc<RootCertStore>>>);

impl Trust {
    pub fn new(bundle: &SpiffeBundle) -> Result<Self, TlsError> {
        Ok(Self(Arc::new(RwLock::new(roots(bundle)?))))
    }

    /// Trusts the authorities of `bundle` from now on.
    pub fn replace(&self, bundle: &SpiffeBundle) -> Result<(), TlsError> {
        *self.0.write().expect("trust lock") = roots(bundle)?;
        Ok(())
    }

    fn current(&self) -> Arc<RootCertStore> {
        self.0.read().expect("trust lock").clone()
    }
}

/// The SPIFFE ID of a verified peer certificate's leaf (its single URI SAN).
pub fn peer_id(leaf: &[u8]) -> Option<SpiffeId> {
    CertInfo::parse(leaf).ok()?.spiffe_id
}

/// Which SPIFFE IDs a side accepts from its peer.
#[derive(Clone)]
pub struct Accept(Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>);

impl Accept {
    pub fn new(f: impl Fn(&SpiffeId) -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }
}

impl std::fmt::Debug for Accept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Accept(..)")
    }
}

fn check_id(leaf: &CertificateDer<'_>, accept: &Accept) -> Result<(), rustls::Error> {
    match peer_id(leaf) {
        Some(id) if (accept.0)(&id) => Ok(()),
        _ => Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        )),
    }
}

#[derive(Clone, Copy)]
enum Tls {
    V12,
    V13,
}

/// A handshake signature checked with the provider's algorithms (both verifiers).
fn verify_signature(
    provider: &CryptoProvider,
    version: Tls,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    let algs = &provider.signature_verification_algorithms;
    match version {
        Tls::V12 => rustls::crypto::verify_tls12_signature(message, cert, dss, algs),
        Tls::V13 => rustls::crypto::verify_tls13_signature(message, cert, dss, algs),
    }
}

/// Verifies the server: path validation to the current trust, then its SPIFFE ID.
#[derive(Debug)]
struct SpiffeServerVerifier {
    trust: Trust,
    accept: Accept,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.trust.current(),
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        check_id(end_entity, &self.accept)?;
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(&self.provider, Tls::V12, m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(&self.provider, Tls::V13, m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies a client certificate when one is sent (path to the current trust, clientAuth EKU,
/// SPIFFE ID accepted); a client may also send none, and the service then decides per call.
#[derive(Debug)]
struct SpiffeClientVerifier {
    trust: Trust,
    accept: Accept,
    /// Empty: no CA names are sent (the node knows which SVID to present).
    hints: Vec<DistinguishedName>,
    provider: Arc<CryptoProvider>,
}

impl SpiffeClientVerifier {
    fn inner(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        WebPkiClientVerifier::builder_with_provider(self.trust.current(), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner()?
            .verify_client_cert(end_entity, intermediates, now)?;
        check_id(end_entity, &self.accept)?;
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(&self.provider, Tls::V12, m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(&self.provider, Tls::V13, m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The server side: presents `identity`, verifies client SVIDs (optional) against `trust`.
pub fn server_config(
    identity: Identity,
    trust: Trust,
    accept_clients: Accept,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeClientVerifier {
        trust,
        accept: accept_clients,
        hints: Vec::new(),
        provider: provider.clone(),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(identity));
    config.alpn_protocols = vec![H2.to_vec()];
    Ok(config)
}

/// The client side: verifies the server's SVID against `trust` and `accept_server`, and
/// presents `identity` if given.
pub fn client_config(
    identity: Option<Identity>,
    trust: Trust,
    accept_server: Accept,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    // Building the stock verifier once checks that the roots are usable.
    WebPkiServerVerifier::builder_with_provider(trust.current(), provider.clone())
        .build()
        .map_err(|e| TlsError::Roots(e.to_string()))?;
    let verifier = Arc::new(SpiffeServerVerifier {
        trust,
        accept: accept_server,
        provider: provider.clone(),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(id) => builder.with_client_cert_resolver(Arc::new(id)),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![H2.to_vec()];
    Ok(config)
}
