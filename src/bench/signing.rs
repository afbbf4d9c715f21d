//! X.509 issuance against the cost it cannot go below: one ECDSA P-256 signature. Both loops
//! run on one thread of this process, alternating, so they see the same machine.

use std::path::Path;
use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use serde::Serialize;

use crate::crypto::WorkloadKey;
use crate::server::{Authority, AuthorityConfig};
use crate::spiffe::SpiffeId;

/// About the size of a leaf certificate's to-be-signed part.
const MESSAGE_LEN: usize = 300;
/// Operations between clock reads.
const BATCH: u64 = 16;

/// Issuance and raw-signing rates.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Signing {
    /// `Authority::sign_x509_svid` for a given workload key (what the authority does per SVID:
    /// build the certificate and sign it), per second on one thread.
    pub issued_per_sec: f64,
    /// Node-side key generation plus the above: what a new SVID costs end to end. Generating a
    /// P-256 key is a scalar multiplication, as is a signature, so this cannot exceed about
    /// half the raw signing rate.
    pub keyed_issued_per_sec: f64,
    /// `EcdsaKeyPair::sign` over a 300-byte message, per second on one thread.
    pub raw_signs_per_sec: f64,
    /// issued / raw.
    pub ratio: f64,
    /// keyed_issued / raw.
    pub keyed_ratio: f64,
}

/// Alternates `rounds` raw-signing and issuance windows of `window` each.
pub fn measure(
    state: &Path,
    id: &SpiffeId,
    window: Duration,
    rounds: usize,
) -> anyhow::Result<Signing> {
    let authority = Authority::open(state, id.trust_domain().clone(), AuthorityConfig::default())?;
    let rng = SystemRandom::new();
    let raw_key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)?;
    let message = [0x5a_u8; MESSAGE_LEN];
    let ttl = crate::policy::DEFAULT_X509_TTL;
    let (mut raw, mut issued, mut keyed) = (Count::default(), Count::default(), Count::default());
    let key = WorkloadKey::generate()?;
    for _ in 0..rounds.max(1) {
        raw += count_for(window, || {
            std::hint::black_box(raw_key.sign(&rng, &message)?);
            Ok(())
        })?;
        issued += count_for(window, || {
            let chain = authority.sign_x509_svid(id, key.spki_der(), ttl, &[])?;
            std::hint::black_box(chain);
            Ok(())
        })?;
        keyed += count_for(window, || {
            // What the node daemon does for a new SVID: a fresh key, signed by the authority.
            let key = WorkloadKey::generate()?;
            let chain = authority.sign_x509_svid(id, key.spki_der(), ttl, &[])?;
            std::hint::black_box((chain, key.into_pkcs8_der()));
            Ok(())
        })?;
    }
    let (issued, keyed, raw) = (issued.rate(), keyed.rate(), raw.rate());
    Ok(Signing {
        issued_per_sec: issued,
        keyed_issued_per_sec: keyed,
        raw_signs_per_sec: raw,
        ratio: issued / raw,
        keyed_ratio: keyed / raw,
    })
}

/// Operations done and the time they took.
#[derive(Default)]
pub(super) struct Count {
    ops: u64,
    time: Duration,
}

impl std::ops::AddAssign for Count {
    fn add_assign(&mut self, o: Self) {
        self.ops += o.ops;
        self.time += o.time;
    }
}

impl Count {
    pub(super) fn rate(&self) -> f64 {
        self.ops as f64 / self.time.as_secs_f64().max(1e-9)
    }
}

/// Runs `op` in batches until `window` has passed.
pub(super) fn count_for(
    window: Duration,
    mut op: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Count> {
    let start = Instant::now();
    let mut ops = 0;
    loop {
        for _ in 0..BATCH {
            op()?;
        }
        ops += BATCH;
        let time = start.elapsed();
        if time >= window {
            return Ok(Count { ops, time });
        }
    }
}
