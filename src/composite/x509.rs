//! The X.509 encoding: one non-critical extension per attribute under [`ARC`] (table in the
//! module docs), each value a DER UTF8String, and the strict decoder that rebuilds the object.

use std::collections::BTreeMap;

use x509_parser::prelude::{FromDer, X509Certificate};

use super::CompositeError;
use super::der;
use super::identity::{Agent, CompositeIdentity, K8s, Model, Pod, Unix, VERSION};
use crate::crypto::x509::Extension;

/// The profile's OID arc: UUID 4ca15a8b-3edf-48d2-9813-9b2574449053 under Microsoft's arc for
/// GUID-derived OIDs (1.2.840.113556.1.8000.2554), which needs no registration.
///
/// The same UUID as `2.25.<128-bit integer>` would be the textbook form, but Go's x509
/// parser refuses OID arcs of 2^31 and above (golang/go#30757), so every go-spiffe peer would
/// reject the whole SVID. Every arc here is below 2^31.
pub const ARC: &[u128] = &[
    1, 2, 840, 113_556, 1, 8000, 2554, 19617, 23179, 16095, 18642, 38931, 10_167_668, 4_493_395,
];

const NAMES: [&str; 20] = [
    "profile version",
    "cid",
    "model.provider",
    "model.id",
    "config_digest",
    "tools_digest",
    "image_digest",
    "k8s.namespace",
    "k8s.serviceaccount",
    "k8s.pod.name",
    "k8s.pod.uid",
    "k8s.node",
    "k8s.cluster",
    "agent.name",
    "agent.version",
    "unix.uid",
    "unix.gid",
    "unix.path",
    "unix.sha256",
    "k8s.container",
];

/// The attribute that arc number `n` carries, for messages.
pub fn attribute_name(n: u64) -> &'static str {
    usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_sub(1))
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("unknown")
}

/// The identity as extensions, ordered by arc number. Call [`CompositeIdentity::validate`]
/// first: this encodes whatever it is given.
pub fn to_extensions(id: &CompositeIdentity) -> Vec<Extension> {
    encode(&der::oid_content(ARC), id)
}

/// Rebuilds the identity from a leaf's extensions; `Ok(None)` when none is under [`ARC`].
pub fn from_extensions(
    extensions: &[Extension],
) -> Result<Option<CompositeIdentity>, CompositeError> {
    decode(
        &der::oid_content(ARC),
        extensions.iter().filter_map(|e| {
            // An OID that is not even DER cannot be under our arc; it is someone else's problem.
            der::read_tlv(der::TAG_OID, &e.oid_der)
                .ok()
                .map(|oid| (oid, e.value.as_slice()))
        }),
    )
}

/// Rebuilds the identity carried by one DER certificate; `Ok(None)` when it carries none.
/// The certificate's signature and chain are not checked here.
pub fn from_certificate(der: &[u8]) -> Result<Option<CompositeIdentity>, CompositeError> {
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| CompositeError::BadCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CompositeError::BadCertificate(
            "trailing bytes after the certificate".into(),
        ));
    }
    decode(
        &der::oid_content(ARC),
        cert.extensions()
            .iter()
            .map(|e| (e.oid.as_bytes(), e.value)),
    )
}

fn encode(arc: &[u8], id: &CompositeIdentity) -> Vec<Extension> {
    let mut attrs: Vec<(u64, String)> = vec![(1, id.v.to_string()), (2, id.cid())];
    let mut put = |n: u64, v: &str| attrs.push((n, v.to_owned()));
    if let Some(m) = &id.model {
        put(3, &m.provider);
        put(4, &m.id);
    }
    for (n, d) in [
        (5, &id.config_digest),
        (6, &id.tools_digest),
        (7, &id.image_digest),
    ] {
        if let Some(d) = d {
            put(n, d);
        }
    }
    if let Some(k) = &id.k8s {
        put(8, &k.namespace);
        put(9, &k.serviceaccount);
        put(10, &k.pod.name);
        put(11, &k.pod.uid);
        put(12, &k.node);
        put(13, &k.cluster);
        if let Some(c) = &k.container {
            put(20, c);
        }
    }
    if let Some(a) = &id.agent {
        put(14, &a.name);
        if let Some(v) = &a.version {
            put(15, v);
        }
    }
    if let Some(u) = &id.unix {
        put(16, &u.uid.to_string());
        put(17, &u.gid.to_string());
        put(18, &u.path);
        put(19, &u.sha256);
    }
    attrs.sort_by_key(|(n, _)| *n);
    attrs
        .into_iter()
        .map(|(n, v)| {
            let mut oid = arc.to_vec();
            der::push_subidentifier(&mut oid, u128::from(n));
            Extension {
                oid_der: der::tlv(der::TAG_OID, &oid),
                value: der::utf8_string(&v),
            }
        })
        .collect()
}

/// `items` are (OID content, extension value) pairs; those whose OID starts with `arc` are ours.
fn decode<'a>(
    arc: &[u8],
    items: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<Option<CompositeIdentity>, CompositeError> {
    let mut found = BTreeMap::new();
    let mut unknown = None;
    for (oid, value) in items {
        // `arc` ends with a complete subidentifier, so a prefix match is an arc match.
        let Some(rest) = oid.strip_prefix(arc) else {
            continue;
        };
        let n = match der::read_subidentifier(rest) {
            Ok((n, [])) if (1..=NAMES.len() as u64).contains(&n) => n,
            Ok((n, _)) => {
                unknown.get_or_insert_with(|| format!(".{n}…"));
                continue;
            }
            Err(_) => {
                unknown.get_or_insert_with(|| format!("with OID suffix {}", hex::encode(rest)));
                continue;
            }
        };
        let text = der::read_utf8_string(value)
            .map_err(|reason| CompositeError::BadExtension { attr: n, reason })?;
        if found.insert(n, text.to_owned()).is_some() {
            return Err(CompositeError::DuplicateExtension(n));
        }
    }
    if found.is_empty() && unknown.is_none() {
        return Ok(None);
    }
    // The version decides what else may appear, so check it before anything else.
    let v = found
        .remove(&1)
        .ok_or(CompositeError::MissingExtension(1))?;
    if v != VERSION.to_string() {
        return Err(CompositeError::UnknownVersion(v));
    }
    if let Some(what) = unknown {
        return Err(CompositeError::UnknownAttribute(what));
    }
    let cid = found
        .remove(&2)
        .ok_or(CompositeError::MissingExtension(2))?;
    let id = rebuild(found)?;
    id.validate()?;
    let computed = id.cid();
    if computed != cid {
        return Err(CompositeError::CidMismatch {
            carried: cid,
            computed,
        });
    }
    Ok(Some(id))
}

/// Assembles the object from attributes 3..=20, requiring each group to be complete.
fn rebuild(mut found: BTreeMap<u64, String>) -> Result<CompositeIdentity, CompositeError> {
    let mut take = |n: u64| found.remove(&n);
    let model = match (take(3), take(4)) {
        (None, None) => None,
        (provider, id) => Some(Model {
            provider: need(3, provider)?,
            id: need(4, id)?,
        }),
    };
    let agent = match (take(14), take(15)) {
        (None, None) => None,
        (name, version) => Some(Agent {
            name: need(14, name)?,
            version,
        }),
    };
    let [ns, sa, pod_name, pod_uid, node, cluster, container] =
        [8, 9, 10, 11, 12, 13, 20].map(&mut take);
    let k8s = if [&ns, &sa, &pod_name, &pod_uid, &node, &cluster, &container]
        .iter()
        .all(|v| v.is_none())
    {
        None
    } else {
        Some(K8s {
            cluster: need(13, cluster)?,
            namespace: need(8, ns)?,
            serviceaccount: need(9, sa)?,
            pod: Pod {
                name: need(10, pod_name)?,
                uid: need(11, pod_uid)?,
            },
            node: need(12, node)?,
            container,
        })
    };
    let [uid, gid, path, sha256] = [16, 17, 18, 19].map(&mut take);
    let unix = if [&uid, &gid, &path, &sha256].iter().all(|v| v.is_none()) {
        None
    } else {
        Some(Unix {
            uid: decimal(16, need(16, uid)?)?,
            gid: decimal(17, need(17, gid)?)?,
            path: need(18, path)?,
            sha256: need(19, sha256)?,
        })
    };
    Ok(CompositeIdentity {
        v: VERSION,
        agent,
        model,
        config_digest: take(5),
        tools_digest: take(6),
        image_digest: take(7),
        k8s,
        unix,
    })
}

fn need(n: u64, v: Option<String>) -> Result<String, CompositeError> {
    v.ok_or(CompositeError::MissingExtension(n))
}

/// A u32 written the one canonical way (no sign, no leading zeros), so each value has one encoding.
fn decimal(n: u64, s: String) -> Result<u32, CompositeError> {
    match s.parse::<u32>() {
        Ok(v) if v.to_string() == s => Ok(v),
        _ => Err(CompositeError::BadExtension {
            attr: n,
            reason: "not a canonical decimal u32",
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::composite::identity::tests::{k8s_sample, unix_sample};
    use crate::crypto::PrivateKey;
    use crate::crypto::x509::{CaSigner, CertInfo};
    use crate::spiffe::TrustDomain;

    /// A real X509-SVID signed by a fresh CA, carrying `extensions`.
    fn leaf(extensions: &[Extension]) -> Vec<u8> {
        let td = TrustDomain::new("example.org").unwrap();
        let ca = CaSigner::generate(&td, Duration::from_secs(600)).unwrap();
        let key = PrivateKey::generate().unwrap();
        let id = td.id("/ns/payments/sa/refund-agent/agent/refund").unwrap();
        ca.sign_leaf(&id, &key.spki_der(), Duration::from_secs(60), extensions)
            .unwrap()
    }

    fn ext(n: u64, value: Vec<u8>) -> Extension {
        let mut oid = der::oid_content(ARC);
        der::push_subidentifier(&mut oid, u128::from(n));
        Extension {
            oid_der: der::tlv(der::TAG_OID, &oid),
            value,
        }
    }

    fn replace(exts: &mut [Extension], n: u64, value: &str) {
        let target = ext(n, vec![]).oid_der;
        let e = exts.iter_mut().find(|e| e.oid_der == target).unwrap();
        e.value = der::utf8_string(value);
    }

    #[test]
    fn oids_are_under_the_profile_arc() {
        let numbered = |id: &CompositeIdentity| -> Vec<u64> {
            to_extensions(id)
                .iter()
                .map(|e| {
                    (1..=20)
                        .find(|n| ext(*n, vec![]).oid_der == e.oid_der)
                        .expect("every OID is <ARC>.<n>")
                })
                .collect()
        };
        assert_eq!(
            numbered(&k8s_sample()),
            (1..=15).chain([20]).collect::<Vec<u64>>()
        );
        assert_eq!(numbered(&unix_sample()), [1, 2, 5, 14, 16, 17, 18, 19]);
        let exts = to_extensions(&k8s_sample());
        assert_eq!(exts[0].value, der::utf8_string("1"));
        assert_eq!(exts[1].value, der::utf8_string(&k8s_sample().cid()));
        assert_eq!(exts[2].value, der::utf8_string("anthropic"));
        // 1.2.840.113556.1.8000.2554.19617... as DER: 06 len 2a 86 48 86 f7 14 01 ...
        assert!(
            exts[0]
                .oid_der
                .starts_with(&[0x06, 0x22, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x14, 0x01])
        );
    }

    #[test]
    fn every_arc_fits_go_parsers() {
        // Go's encoding/asn1 and x509 reject OID arcs >= 2^31.
        assert!(ARC.iter().all(|a| *a < (1 << 31)));
    }

    #[test]
    fn round_trips_through_extensions() {
        for id in [k8s_sample(), unix_sample(), CompositeIdentity::new()] {
            let back = from_extensions(&to_extensions(&id)).unwrap().unwrap();
            assert_eq!(back, id);
            assert_eq!(back.cid(), id.cid());
        }
        assert_eq!(from_extensions(&[]), Ok(None));
    }

    #[test]
    fn round_trips_through_a_signed_certificate() {
        for id in [k8s_sample(), unix_sample()] {
            let der = leaf(&to_extensions(&id));
            let back = from_certificate(&der).unwrap().unwrap();
            assert_eq!(back, id);
            assert_eq!(back.cid(), id.cid());
            // Still an ordinary SVID, and the extensions are non-critical.
            let info = CertInfo::parse(&der).unwrap();
            assert_eq!(
                info.spiffe_id.unwrap().to_string(),
                "spiffe://example.org/ns/payments/sa/refund-agent/agent/refund"
            );
            let (_, cert) = X509Certificate::from_der(&der).unwrap();
            let arc = der::oid_content(ARC);
            let ours: Vec<_> = cert
                .extensions()
                .iter()
                .filter(|e| e.oid.as_bytes().starts_with(&arc))
                .collect();
            assert_eq!(ours.len(), to_extensions(&id).len());
            assert!(ours.iter().all(|e| !e.critical));
        }
        assert_eq!(from_certificate(&leaf(&[])), Ok(None));
    }

    #[test]
    fn long_values_use_long_form_lengths() {
        let mut id = k8s_sample();
        id.k8s.as_mut().unwrap().pod.name = "p".repeat(300);
        let der = leaf(&to_extensions(&id));
        assert_eq!(from_certificate(&der).unwrap(), Some(id));
    }

    #[test]
    fn tampering_and_gaps_are_named() {
        let good = to_extensions(&k8s_sample());

        let mut exts = good.clone();
        replace(&mut exts, 4, "other-model");
        assert!(matches!(
            from_extensions(&exts),
            Err(CompositeError::CidMismatch { .. })
        ));

        let mut exts = good.clone();
        replace(&mut exts, 1, "2");
        assert_eq!(
            from_extensions(&exts),
            Err(CompositeError::UnknownVersion("2".into()))
        );

        let mut exts = good.clone();
        replace(&mut exts, 6, "sha256:XYZ");
        assert!(matches!(
            from_extensions(&exts),
            Err(CompositeError::BadDigest { field, .. }) if field == "tools_digest"
        ));

        let mut exts = good.clone();
        exts.retain(|e| e.oid_der != ext(11, vec![]).oid_der);
        assert_eq!(
            from_extensions(&exts),
            Err(CompositeError::MissingExtension(11))
        );
        let mut exts = good.clone();
        exts.retain(|e| e.oid_der != ext(2, vec![]).oid_der);
        assert_eq!(
            from_extensions(&exts),
            Err(CompositeError::MissingExtension(2))
        );
        let mut exts = good.clone();
        exts.retain(|e| e.oid_der != ext(1, vec![]).oid_der);
        assert_eq!(
            from_extensions(&exts),
            Err(CompositeError::MissingExtension(1))
        );

        let mut exts = good.clone();
        exts.push(exts[3].clone());
        assert_eq!(
            from_extensions(&exts),
            Err(CompositeError::DuplicateExtension(4))
        );

        let mut exts = good.clone();
        exts.push(ext(21, der::utf8_string("x")));
        assert_eq!(
            from_extensions(&exts),
            Err(CompositeError::UnknownAttribute(".21…".into()))
        );

        let mut exts = good.clone();
        exts[4].value = vec![0x13, 0x01, b'a']; // PrintableString, not UTF8String
        assert_eq!(
            from_extensions(&exts),
            Err(CompositeError::BadExtension {
                attr: 5,
                reason: "wrong tag"
            })
        );

        let mut exts = to_extensions(&unix_sample());
        replace(&mut exts, 16, "01000");
        assert_eq!(
            from_extensions(&exts),
            Err(CompositeError::BadExtension {
                attr: 16,
                reason: "not a canonical decimal u32"
            })
        );

        let mut exts = good.clone();
        exts.extend(
            to_extensions(&unix_sample())
                .into_iter()
                .skip(2)
                .filter(|e| {
                    [16, 17, 18, 19]
                        .map(|n| ext(n, vec![]).oid_der)
                        .contains(&e.oid_der)
                }),
        );
        assert!(from_extensions(&exts).is_err());

        // Extensions of others are ignored.
        let mut exts = good.clone();
        exts.push(Extension {
            oid_der: vec![0x06, 0x03, 0x55, 0x1d, 0x0e],
            value: vec![0x04, 0x00],
        });
        exts.push(Extension {
            oid_der: b"garbage".to_vec(),
            value: vec![],
        });
        assert_eq!(from_extensions(&exts), Ok(Some(k8s_sample())));
    }

    #[test]
    fn error_messages_say_what_is_wrong() {
        assert_eq!(
            CompositeError::BadExtension {
                attr: 10,
                reason: "truncated"
            }
            .to_string(),
            "bad value in extension .10 (k8s.pod.name): truncated"
        );
        assert_eq!(
            CompositeError::MissingExtension(2).to_string(),
            "extension .2 (cid) is missing"
        );
        assert_eq!(attribute_name(0), "unknown");
        assert_eq!(attribute_name(u64::MAX), "unknown");
    }

    /// Deterministic xorshift so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn bytes(&mut self, max: usize) -> Vec<u8> {
            let n = (self.next() as usize) % (max + 1);
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    #[test]
    fn random_input_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let good = to_extensions(&k8s_sample());
        for round in 0..4_000 {
            let mut exts = good.clone();
            let i = (rng.next() as usize) % exts.len();
            match round % 4 {
                0 => exts[i].value = rng.bytes(40),
                1 => {
                    // A valid header with a random body.
                    let body = rng.bytes(300);
                    exts[i].value = der::tlv(der::TAG_UTF8_STRING, &body);
                }
                2 => {
                    let mut oid = der::oid_content(ARC);
                    oid.extend(rng.bytes(12));
                    exts[i].oid_der = der::tlv(der::TAG_OID, &oid);
                }
                _ => {
                    let keep = (rng.next() as usize) % (exts[i].value.len() + 1);
                    exts[i].value.truncate(keep);
                }
            }
            let _ = from_extensions(&exts);
        }
        // Truncated and bit-flipped certificates.
        let der = leaf(&good);
        for cut in 0..der.len() {
            let _ = from_certificate(&der[..cut]);
        }
        for _ in 0..2_000 {
            let mut d = der.clone();
            let i = (rng.next() as usize) % d.len();
            d[i] ^= 1 << (rng.next() % 8);
            let _ = from_certificate(&d);
        }
        assert!(matches!(
            from_certificate(b"not a certificate"),
            Err(CompositeError::BadCertificate(_))
        ));
        let mut trailing = der.clone();
        trailing.push(0);
        assert!(matches!(
            from_certificate(&trailing),
            Err(CompositeError::BadCertificate(_))
        ));
    }
}
