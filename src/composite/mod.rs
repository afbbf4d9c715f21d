//! The composite identity of an agent (AGENT-IDENTITY.md §1–2): one object naming its model,
//! configuration, tools, image and placement, its content address (`cid`), and the two
//! encodings that carry it (X.509 extensions and a JWT claim). Pure: no I/O, no clock.
//!
//! # cid
//!
//! `cid = "sha256:" + hex(SHA-256(JCS(object)))`, JCS being RFC 8785 canonical JSON of the
//! object exactly as [`CompositeIdentity`] serializes it (absent members omitted, never `null`).
//! Canonicalization uses the `serde_json_canonicalizer` crate rather than `serde_jcs`: both sort
//! keys by UTF-16 code units, escape strings the RFC 8785 way and print numbers with `ryu-js`
//! (ECMAScript `Number.toString`), but `serde_json_canonicalizer` rejects duplicate keys and raw
//! JSON fragments where `serde_jcs` silently keeps the last duplicate and re-parses raw values,
//! and it ships the RFC's own test vectors. Our object only holds strings, objects and small
//! integers, so number formatting never comes into play; the RFC examples are re-checked in
//! `identity.rs`.
//!
//! # Combining several files into one digest
//!
//! [`combine_file_digests`] turns `(path, content digest)` pairs into `config_digest` or
//! `tools_digest`: sort the entries by path (byte-wise on the UTF-8 path), concatenate
//! `<path> 0x00 <content digest> 0x0A` for each, and take `sha256:` + hex of SHA-256 over the
//! result. The path is the one the container sees (e.g. `/etc/agent/prompt.md`), so moving or
//! renaming a file changes the digest. Paths must be non-empty and NUL-free, digests valid and
//! paths unique, which makes the byte string unambiguous. Use it even for one file, so a
//! `config_digest` always means "this set of named files". A shell cross-check:
//! `printf '%s\0%s\n' /a sha256:… /b sha256:… | sha256sum` (entries already sorted).
//!
//! # X.509 encoding
//!
//! One non-critical extension per attribute, each value a DER UTF8String, OID
//! [`ARC`]`.<n>`: the UUID `4ca15a8b-3edf-48d2-9813-9b2574449053` under Microsoft's arc for
//! GUID-derived OIDs, `1.2.840.113556.1.8000.2554.19617.23179.16095.18642.38931.10167668.4493395.<n>`.
//! The UUID as `2.25.<128-bit integer>` was the first choice, but Go's `crypto/x509` rejects a
//! certificate with any OID arc of 2^31 or more ("malformed extension OID field",
//! golang/go#30757), so go-spiffe, SPIRE and Istio peers could not parse such leaves at all.
//! Non-critical extensions exist so that every TLS stack accepts the certificate; this arc
//! keeps that promise.
//!
//! | n  | attribute              | n  | attribute                    |
//! |----|------------------------|----|------------------------------|
//! | 1  | profile version (`1`)  | 11 | `k8s.pod.uid`                |
//! | 2  | `cid`                  | 12 | `k8s.node`                   |
//! | 3  | `model.provider`       | 13 | `k8s.cluster`                |
//! | 4  | `model.id`             | 14 | `agent.name`                 |
//! | 5  | `config_digest`        | 15 | `agent.version`              |
//! | 6  | `tools_digest`         | 16 | `unix.uid` (decimal)         |
//! | 7  | `image_digest`         | 17 | `unix.gid` (decimal)         |
//! | 8  | `k8s.namespace`        | 18 | `unix.path` (executable)     |
//! | 9  | `k8s.serviceaccount`   | 19 | `unix.sha256` (executable)   |
//! | 10 | `k8s.pod.name`         | 20 | `k8s.container`              |
//!
//! Decoding is strict: every attribute at most once, none unknown to profile 1, groups complete
//! (model, agent, k8s, unix), and the recomputed `cid` must equal `.2`.
//!
//! # JWT encoding
//!
//! The claim [`JWT_CLAIM`] holds the object with one extra member, `cid`.
mod der;
mod digest;
mod identity;
mod jwt;
mod x509;

pub use digest::{combine_file_digests, sha256_digest, validate_digest};
pub use identity::{Agent, CompositeIdentity, K8s, Model, Pod, Unix, VERSION};
pub use jwt::{JWT_CLAIM, from_jwt_claims, to_jwt_claim};
pub use x509::{ARC, attribute_name, from_certificate, from_extensions, to_extensions};

/// Why a composite identity, or one of its encodings, is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompositeError {
    #[error(
        "bad digest in {field}: {value:?} is not \"sha256:\" followed by 64 lowercase hex digits"
    )]
    BadDigest { field: String, value: String },
    #[error("{0} is empty")]
    EmptyField(&'static str),
    #[error("k8s and unix placement facts are exclusive")]
    BothPlacements,
    #[error("unknown composite identity version {0:?} (this build reads version 1)")]
    UnknownVersion(String),
    #[error("cid mismatch: the encoding carries {carried}, the object hashes to {computed}")]
    CidMismatch { carried: String, computed: String },
    #[error("bad value in extension .{attr} ({}): {reason}", attribute_name(*attr))]
    BadExtension { attr: u64, reason: &'static str },
    #[error("extension .{0} ({name}) appears more than once", name = attribute_name(*.0))]
    DuplicateExtension(u64),
    #[error("extension .{0} ({name}) is missing", name = attribute_name(*.0))]
    MissingExtension(u64),
    #[error("extension {0} under the agentid arc is not defined by profile version 1")]
    UnknownAttribute(String),
    #[error("not a certificate: {0}")]
    BadCertificate(String),
    #[error("claim \"{JWT_CLAIM}\": {0}")]
    BadClaim(String),
    #[error("file path {0:?} is empty or contains NUL")]
    BadPath(String),
    #[error("file path {0:?} is listed more than once")]
    DuplicatePath(String),
}
