//! X.509: the trust domain's self-signed CA and leaf X509-SVIDs, plus the parsing used to
//! inspect what was issued.
//!
//! Every field follows the X509-SVID standard rows X5-01..X5-27 of SPIFFE-CONFORMANCE.md.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use super::keys::{PrivateKey, sha256_hex};
use crate::spiffe::{SpiffeId, TrustDomain};

/// Clock-skew cushion: certificates start this long before they are issued (SPIRE uses 10 s).
pub const NOT_BEFORE_CUSHION: Duration = Duration::from_secs(10);

/// Why a certificate could not be built or read.
#[derive(Debug, thiserror::Error)]
pub enum X509Error {
    #[error("building certificate: {0}")]
    Build(#[from] rcgen::Error),
    #[error("parsing certificate: {0}")]
    Parse(String),
    #[error("an X509-SVID cannot carry the trust domain's root ID {0}")]
    RootId(SpiffeId),
    #[error("the CA expires at {ca_not_after:?}, before the SVID could start")]
    CaExpired { ca_not_after: SystemTime },
    #[error("certificate has {0} URI SANs; an X509-SVID has exactly one")]
    UriSanCount(usize),
    #[error("URI SAN is not a SPIFFE ID: {0}")]
    BadUri(String),
    #[error("extension OID {0}: not a DER OID whose arcs fit in 64 bits")]
    ExtensionOid(String),
    #[error("public key is not an EC P-256 SubjectPublicKeyInfo: {0}")]
    PublicKey(String),
}

/// Checks that `spki_der` is exactly one DER SubjectPublicKeyInfo of an EC P-256 key, the
/// only key type SVIDs are issued for; a remote node's request is refused otherwise.
pub fn check_p256_spki(spki_der: &[u8]) -> Result<(), X509Error> {
    use x509_parser::public_key::PublicKey;
    use x509_parser::x509::SubjectPublicKeyInfo as Spki;
    let bad = |m: &str| X509Error::PublicKey(m.to_owned());
    let (rest, spki) = Spki::from_der(spki_der).map_err(|e| bad(&e.to_string()))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes"));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if curve != Some(x509_parser::oid_registry::OID_EC_P256) {
        return Err(bad("not the P-256 curve"));
    }
    match spki.parsed() {
        Ok(PublicKey::EC(point)) if point.data().len() == 65 && point.data()[0] == 4 => Ok(()),
        _ => Err(bad("not an uncompressed EC point")),
    }
}

/// One non-critical extension to add to a leaf (composite identity claims).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Extension {
    /// The OID as a full DER TLV (`0x06`, length, content): the form certificates carry and
    /// parsers hand back, so decoding compares bytes.
    pub oid_der: Vec<u8>,
    /// DER-encoded extension value (inside the OCTET STRING).
    pub value: Vec<u8>,
}

/// A CA certificate with its signing key, ready to sign leaves.
pub struct CaSigner {
    key: PrivateKey,
    der: Vec<u8>,
    not_after: SystemTime,
    issuer: Issuer<'static, rcgen::KeyPair>,
}

impl CaSigner {
    /// Creates a new self-signed CA for `td`, valid for `ttl`.
    pub fn generate(td: &TrustDomain, ttl: Duration) -> Result<Self, X509Error> {
        Self::generate_at(td, SystemTime::now(), ttl)
    }

    /// Creates a new self-signed CA for `td`, issued at `now` and valid for `ttl` from then
    /// (the authority's rotation passes its own clock, so tests can move it).
    pub fn generate_at(
        td: &TrustDomain,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Self, X509Error> {
        let key = PrivateKey::generate().map_err(|e| X509Error::Parse(e.to_string()))?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "agentid");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("agentid CA {td}"));
        params.subject_alt_names = vec![SanType::URI(td.id_string().try_into()?)];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.key_identifier_method = KeyIdMethod::Sha256;
        params.serial_number = Some(random_serial());
        params.not_before = (now - NOT_BEFORE_CUSHION).into();
        params.not_after = (now + ttl).into();
        let cert = params.self_signed(key.rcgen())?;
        Self::from_parts(key, cert.der().to_vec())
    }

    /// Rebuilds a signer from a stored key and certificate, checking that they belong together.
    pub fn from_parts(key: PrivateKey, der: Vec<u8>) -> Result<Self, X509Error> {
        let info = CertInfo::parse(&der)?;
        if info.spki_der != key.spki_der() {
            return Err(X509Error::Parse(
                "CA certificate does not match its private key".into(),
            ));
        }
        let signing = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls_pki_types::PrivatePkcs8KeyDer::from(key.pkcs8_der()),
            &rcgen::PKCS_ECDSA_P256_SHA256,
        )?;
        let issuer = Issuer::from_ca_cert_der(&der.clone().into(), signing)?;
        Ok(Self {
            issuer,
            key,
            der,
            not_after: info.not_after,
        })
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.der
    }

    /// The CA private key.
    pub fn key(&self) -> &PrivateKey {
        &self.key
    }

    /// End of the CA's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Signs an X509-SVID for `id` over the public key `spki_der`.
    ///
    /// `notAfter` is capped at the CA's own `notAfter` (X5-14).
    pub fn sign_leaf(
        &self,
        id: &SpiffeId,
        spki_der: &[u8],
        ttl: Duration,
        extensions: &[Extension],
    ) -> Result<Vec<u8>, X509Error> {
        if id.is_root() {
            return Err(X509Error::RootId(id.clone()));
        }
        let now = SystemTime::now();
        let not_after = (now + ttl).min(self.not_after);
        if not_after <= now {
            return Err(X509Error::CaExpired {
                ca_not_after: self.not_after,
            });
        }
        let mut params = CertificateParams::default();
        // Empty subject, so the SAN is marked critical (X5-04).
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::Sha256;
        params.serial_number = Some(random_serial());
        params.not_before = (now - NOT_BEFORE_CUSHION).into();
        params.not_after = not_after.into();
        params.custom_extensions = extensions
            .iter()
            .map(|e| {
                Ok(CustomExtension::from_oid_content(
                    &oid_arcs(&e.oid_der)?,
                    e.value.clone(),
                ))
            })
            .collect::<Result<_, X509Error>>()?;
        let public = SubjectPublicKeyInfo::from_der(spki_der)?;
        Ok(params.signed_by(&public, &self.issuer)?.der().to_vec())
    }
}

/// The arcs of a DER OID, for rcgen (which takes OIDs as `u64` arcs).
fn oid_arcs(oid_der: &[u8]) -> Result<Vec<u64>, X509Error> {
    let bad = || X509Error::ExtensionOid(hex::encode(oid_der));
    let content = match oid_der {
        [0x06, len, rest @ ..] if usize::from(*len) == rest.len() && *len < 0x80 => rest,
        _ => return Err(bad()),
    };
    let oid = x509_parser::der_parser::oid::Oid::new(std::borrow::Cow::Borrowed(content));
    oid.iter().map(Iterator::collect).ok_or_else(bad)
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).expect("system RNG");
    bytes[0] &= 0x7f; // positive INTEGER
    bytes[0] |= 0x01; // never a leading zero byte, so the encoding is always 16 bytes
    SerialNumber::from_slice(&bytes)
}

/// What agentid reads back out of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub spiffe_id: Option<SpiffeId>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial_hex: String,
    pub fingerprint: String,
    pub spki_der: Vec<u8>,
    pub is_ca: bool,
}

impl CertInfo {
    /// Parses one DER certificate. A URI SAN, if any, must be the only one and a SPIFFE ID.
    pub fn parse(der: &[u8]) -> Result<Self, X509Error> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| X509Error::Parse(e.to_string()))?;
        let mut uris = Vec::new();
        let mut is_ca = false;
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        if let GeneralName::URI(u) = name {
                            uris.push(u.to_string());
                        }
                    }
                }
                ParsedExtension::BasicConstraints(bc) => is_ca = bc.ca,
                _ => {}
            }
        }
        let spiffe_id = match uris.as_slice() {
            [] => None,
            [one] => Some(one.parse().map_err(|_| X509Error::BadUri(one.clone()))?),
            many => return Err(X509Error::UriSanCount(many.len())),
        };
        let ts = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
        };
        Ok(Self {
            spiffe_id,
            not_before: ts(cert.validity().not_before),
            not_after: ts(cert.validity().not_after),
            serial_hex: cert.tbs_certificate.raw_serial_as_string().replace(':', ""),
            fingerprint: sha256_hex(der),
            spki_der: cert.public_key().raw.to_vec(),
            is_ca,
        })
    }
}

/// Splits concatenated DER certificates (the Workload API's chain and bundle encoding).
pub fn split_der_chain(mut data: &[u8]) -> Result<Vec<Vec<u8>>, X509Error> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let (rest, _) =
            X509Certificate::from_der(data).map_err(|e| X509Error::Parse(e.to_string()))?;
        let used = data.len() - rest.len();
        out.push(data[..used].to_vec());
        data = rest;
    }
    Ok(out)
}

/// PEM `CERTIFICATE` blocks for each DER certificate.
pub fn to_pem(ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn leaf_is_capped_at_ca_expiry_and_backdated() {
        let ca = CaSigner::generate(&td(), Duration::from_secs(120)).unwrap();
        let leaf_key = PrivateKey::generate().unwrap();
        let id = td().id("/w").unwrap();
        let der = ca
            .sign_leaf(&id, &leaf_key.spki_der(), Duration::from_secs(3600), &[])
            .unwrap();
        let info = CertInfo::parse(&der).unwrap();
        assert_eq!(info.spiffe_id, Some(id));
        assert!(info.not_after <= ca.not_after(), "X5-14 cap");
        assert!(
            info.not_before < SystemTime::now() - Duration::from_secs(5),
            "X5-14 cushion"
        );
        assert!(!info.is_ca);
        assert_eq!(info.spki_der, leaf_key.spki_der());
    }

    #[test]
    fn refuses_root_id_and_expired_ca() {
        let ca = CaSigner::generate(&td(), Duration::from_secs(1)).unwrap();
        let k = PrivateKey::generate().unwrap();
        assert!(matches!(
            ca.sign_leaf(&td().root_id(), &k.spki_der(), Duration::from_secs(5), &[]),
            Err(X509Error::RootId(_))
        ));
        std::thread::sleep(Duration::from_millis(1100));
        assert!(matches!(
            ca.sign_leaf(
                &td().id("/w").unwrap(),
                &k.spki_der(),
                Duration::from_secs(5),
                &[]
            ),
            Err(X509Error::CaExpired { .. })
        ));
    }

    #[test]
    fn from_parts_rejects_a_foreign_key() {
        let ca = CaSigner::generate(&td(), Duration::from_secs(60)).unwrap();
        let other = PrivateKey::generate().unwrap();
        assert!(CaSigner::from_parts(other, ca.cert_der().to_vec()).is_err());
        let same = PrivateKey::from_pkcs8_der(&ca.key().pkcs8_der()).unwrap();
        assert!(CaSigner::from_parts(same, ca.cert_der().to_vec()).is_ok());
    }

    #[test]
    fn chain_split_round_trips() {
        let a = CaSigner::generate(&td(), Duration::from_secs(60)).unwrap();
        let b = CaSigner::generate(&td(), Duration::from_secs(60)).unwrap();
        let joined = [a.cert_der(), b.cert_der()].concat();
        let parts = split_der_chain(&joined).unwrap();
        assert_eq!(parts, vec![a.cert_der().to_vec(), b.cert_der().to_vec()]);
        assert!(split_der_chain(&joined[..joined.len() - 1]).is_err());
    }
}
