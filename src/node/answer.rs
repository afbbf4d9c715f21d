//! The FetchX509SVID answer as the daemon sends it.
//!
//! An `X509SVIDResponse` is made of parts the daemon already holds in shared buffers: the
//! cached SVIDs, the hints of the policies that grant them, and the bundles. [`X509Answer`]
//! keeps references to those parts and writes the message's wire form straight from them, so
//! no message is built, copied for the stream's record of what it last sent, and taken apart
//! again on every call. The daemon's server is generated with this type in place of the
//! generated message (see `build.rs`); on the wire nothing changes, and clients decode it as
//! the plain `X509SVIDResponse`.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use prost::Message;
use prost::bytes::{Buf, BufMut, Bytes};
// The wire-format primitives prost's generated code uses; a hand-written `Message` needs
// them as much (its trait names `WireType` and `DecodeContext`).
use prost::encoding::{
    DecodeContext, WireType, encode_key, encode_varint, encoded_len_varint, key_len,
};

use super::cache::X509Svid;
use super::issuer::TrustBundles;
use crate::api::workload as pb;
use crate::policy::Entitlement;

/// The Workload API server as the daemon serves it (generated; see `build.rs`).
#[allow(clippy::all, missing_docs)]
pub mod server {
    include!(concat!(env!("OUT_DIR"), "/workload_server/_.rs"));
}

/// Field numbers of `X509SVIDResponse` and `X509SVID` (proto/workload.proto).
mod field {
    pub const SVIDS: u32 = 1;
    pub const SPIFFE_ID: u32 = 1;
    pub const X509_SVID: u32 = 2;
    pub const X509_SVID_KEY: u32 = 3;
    pub const BUNDLE: u32 = 4;
    pub const HINT: u32 = 5;
}

/// The X.509 bundles as every answer carries them, made once per set of bundles: the own
/// trust domain's CA certificates (DER, concatenated) and the `federated_bundles` map already
/// in its wire form.
#[derive(Debug, PartialEq)]
pub struct AnswerBundles {
    own: Bytes,
    federated: Bytes,
}

impl AnswerBundles {
    pub fn new(bundles: &TrustBundles) -> Self {
        let federated: HashMap<String, Bytes> = bundles
            .federated_x509_ders()
            .map(|(td, der)| (td, der.into()))
            .collect();
        // prost writes the map: its entries are the message's field 3, and a message's wire
        // form is the concatenation of its fields', so they are spliced in as they are.
        let federated = pb::X509svidResponse {
            federated_bundles: federated,
            ..Default::default()
        }
        .encode_to_vec();
        Self {
            own: bundles.own.x509_der().into(),
            federated: federated.into(),
        }
    }
}

/// One SVID of an answer, with the policy that grants it (for its hint).
#[derive(Clone)]
pub struct AnswerSvid {
    pub svid: Arc<X509Svid>,
    pub granted_by: Arc<Entitlement>,
}

impl AnswerSvid {
    fn hint(&self) -> &str {
        &self.granted_by.hint
    }

    /// Its `X509SVID` message's fields, in field order, each as the parts its value is
    /// written from (the SPIFFE ID is never one string in memory), `bundle` being the own
    /// bundle.
    fn fields<'a>(&'a self, bundle: &'a [u8]) -> [(u32, [&'a [u8]; 3]); 5] {
        let s = &self.svid;
        let [scheme, td, path] = s.spiffe_id.uri_parts().map(str::as_bytes);
        let one = |v: &'a [u8]| [v, &[][..], &[][..]];
        [
            (field::SPIFFE_ID, [scheme, td, path]),
            (field::X509_SVID, one(&s.chain_der)),
            (field::X509_SVID_KEY, one(&s.key_pkcs8)),
            (field::BUNDLE, one(bundle)),
            (field::HINT, one(self.hint().as_bytes())),
        ]
    }

    /// Length of its `X509SVID` message.
    fn body_len(&self, bundle: &[u8]) -> usize {
        self.fields(bundle)
            .iter()
            .map(|(tag, parts)| field_len(*tag, parts))
            .sum()
    }

    fn encode(&self, bundle: &[u8], buf: &mut impl BufMut) {
        encode_key(field::SVIDS, WireType::LengthDelimited, buf);
        encode_varint(self.body_len(bundle) as u64, buf);
        for (tag, parts) in self.fields(bundle) {
            put_field(tag, &parts, buf);
        }
    }
}

impl PartialEq for AnswerSvid {
    /// Equal when they encode the same: the same SVID (a renewed one is a new `Arc`, and so is
    /// an unchanged one seen through a different cache entry, hence the content comparison)
    /// under the same hint.
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (&self.svid, &other.svid);
        (Arc::ptr_eq(a, b)
            || (a.spiffe_id == b.spiffe_id
                && a.chain_der == b.chain_der
                && a.key_pkcs8 == b.key_pkcs8))
            && self.hint() == other.hint()
    }
}

impl fmt::Debug for AnswerSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnswerSvid")
            .field("svid", &self.svid)
            .field("hint", &self.hint())
            .finish()
    }
}

/// A full-state `X509SVIDResponse`: the caller's SVIDs in order, each with the own bundle, and
/// the federated bundles. `crl` is always empty.
#[derive(Clone, Debug, PartialEq)]
pub struct X509Answer {
    svids: Vec<AnswerSvid>,
    bundles: Arc<AnswerBundles>,
}

impl X509Answer {
    pub fn new(svids: Vec<AnswerSvid>, bundles: Arc<AnswerBundles>) -> Self {
        Self { svids, bundles }
    }
}

impl Message for X509Answer {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for s in &self.svids {
            s.encode(&self.bundles.own, buf);
        }
        buf.put_slice(&self.bundles.federated);
    }

    /// Never called: the daemon only sends answers (its server decodes requests alone). Were
    /// one decoded, its fields would be skipped, not misread.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        let own = &self.bundles.own;
        self.svids
            .iter()
            .map(|s| {
                let len = s.body_len(own);
                key_len(field::SVIDS) + encoded_len_varint(len as u64) + len
            })
            .sum::<usize>()
            + self.bundles.federated.len()
    }

    fn clear(&mut self) {
        self.svids.clear();
    }
}

/// A string or bytes field whose value is `parts` concatenated, left out when empty (proto3
/// default), as prost writes it.
fn put_field(tag: u32, parts: &[&[u8]], buf: &mut impl BufMut) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > 0 {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(len as u64, buf);
        parts.iter().for_each(|p| buf.put_slice(p));
    }
}

/// The length [`put_field`] writes.
fn field_len(tag: u32, parts: &[&[u8]]) -> usize {
    match parts.iter().map(|p| p.len()).sum() {
        0 => 0,
        len => key_len(tag) + encoded_len_varint(len as u64) + len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::{Duration, SystemTime};

    use crate::spiffe::{SpiffeBundle, TrustDomain};

    fn svid(id: &str, chain: &[u8], key: &[u8]) -> Arc<X509Svid> {
        Arc::new(X509Svid {
            spiffe_id: id.parse().unwrap(),
            chain_der: Bytes::copy_from_slice(chain),
            key_pkcs8: Bytes::copy_from_slice(key),
            not_after: SystemTime::now() + Duration::from_secs(3600),
            serial: "01".into(),
        })
    }

    fn granted(id: &str, hint: &str) -> Arc<Entitlement> {
        Arc::new(Entitlement {
            policy: "test".into(),
            composite: None,
            spiffe_id: id.parse().unwrap(),
            hint: hint.to_owned(),
            x509_ttl: Duration::from_secs(3600),
            jwt_ttl: Duration::from_secs(300),
            token_rules: Arc::default(),
        })
    }

    fn bundles(own: &[&[u8]], federated: &[(&str, &[&[u8]])]) -> TrustBundles {
        let bundle = |certs: &[&[u8]]| {
            Arc::new(SpiffeBundle {
                x509_authorities: certs.iter().map(|c| c.to_vec()).collect(),
                jwt_authorities: Vec::new(),
                sequence: 1,
                refresh_hint_secs: 300,
            })
        };
        let td: TrustDomain = "agentid.local".parse().unwrap();
        TrustBundles {
            own: bundle(own),
            federated: federated
                .iter()
                .map(|(name, certs)| {
                    let td: TrustDomain = name.parse().unwrap();
                    (td, bundle(certs))
                })
                .collect::<BTreeMap<_, _>>(),
            trust_domain: td,
        }
    }

    /// The message the generated type would send for the same parts.
    fn expected(svids: &[AnswerSvid], b: &TrustBundles) -> pb::X509svidResponse {
        pb::X509svidResponse {
            svids: svids
                .iter()
                .map(|s| pb::X509svid {
                    spiffe_id: String::from(&s.svid.spiffe_id),
                    x509_svid: s.svid.chain_der.clone(),
                    x509_svid_key: s.svid.key_pkcs8.clone(),
                    bundle: b.own.x509_der().into(),
                    hint: s.hint().to_owned(),
                })
                .collect(),
            crl: Vec::new(),
            federated_bundles: b
                .federated
                .iter()
                .map(|(td, f)| (td.id_string(), Bytes::from(f.x509_der())))
                .filter(|(_, der)| !der.is_empty())
                .collect(),
        }
    }

    fn check(svids: Vec<AnswerSvid>, b: &TrustBundles) {
        let want = expected(&svids, b);
        let answer = X509Answer::new(svids, Arc::new(AnswerBundles::new(b)));
        let wire = answer.encode_to_vec();
        assert_eq!(answer.encoded_len(), wire.len());
        let got = pb::X509svidResponse::decode(wire.as_slice()).expect("decodes");
        assert_eq!(got, want);
        // Byte for byte what prost writes, where the map's order cannot differ.
        if want.federated_bundles.len() <= 1 {
            assert_eq!(wire, want.encode_to_vec());
        }
    }

    #[test]
    fn it_encodes_as_the_generated_message_would() {
        let long = vec![0xab; 70_000]; // three-byte lengths
        let a = AnswerSvid {
            svid: svid("spiffe://agentid.local/a", b"chain-a", b"key-a"),
            granted_by: granted("spiffe://agentid.local/a", "a"),
        };
        let b = AnswerSvid {
            svid: svid("spiffe://agentid.local/b", &long, b"key-b"),
            granted_by: granted("spiffe://agentid.local/b", ""),
        };
        let ca: &[u8] = b"ca-1";
        check(vec![a.clone()], &bundles(&[ca], &[]));
        check(vec![a.clone(), b.clone()], &bundles(&[ca, &long], &[]));
        check(
            vec![b.clone()],
            &bundles(&[ca], &[("other.example", &[b"fed-1", b"fed-2"])]),
        );
        check(
            vec![a, b],
            &bundles(
                &[ca],
                &[
                    ("one.example", &[b"fed-1"]),
                    ("two.example", &[&long]),
                    ("empty.example", &[]),
                ],
            ),
        );
        // No SVIDs, no bundles: the empty message.
        check(Vec::new(), &bundles(&[], &[]));
    }

    #[test]
    fn answers_are_equal_when_they_would_encode_the_same() {
        let b = Arc::new(AnswerBundles::new(&bundles(&[b"ca"], &[])));
        let s = svid("spiffe://agentid.local/a", b"chain", b"key");
        let same = svid("spiffe://agentid.local/a", b"chain", b"key");
        let renewed = svid("spiffe://agentid.local/a", b"chain-2", b"key-2");
        let e = granted("spiffe://agentid.local/a", "a");
        let answer = |svid: &Arc<X509Svid>, e: &Arc<Entitlement>, b: &Arc<AnswerBundles>| {
            X509Answer::new(
                vec![AnswerSvid {
                    svid: svid.clone(),
                    granted_by: e.clone(),
                }],
                b.clone(),
            )
        };
        let first = answer(&s, &e, &b);
        assert_eq!(first, answer(&s, &e, &b));
        assert_eq!(first, answer(&same, &e, &b));
        assert_ne!(first, answer(&renewed, &e, &b));
        assert_ne!(
            first,
            answer(&s, &granted("spiffe://agentid.local/a", "other"), &b)
        );
        let rotated = Arc::new(AnswerBundles::new(&bundles(&[b"ca", b"ca-next"], &[])));
        assert_ne!(first, answer(&s, &e, &rotated));
        let federated = Arc::new(AnswerBundles::new(&bundles(
            &[b"ca"],
            &[("other.example", &[b"fed"])],
        )));
        assert_ne!(first, answer(&s, &e, &federated));
    }
}
