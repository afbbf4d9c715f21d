//! The only module that touches key generation, certificate building and parsing, and JWS.
//!
//! One crypto provider for everything: aws-lc-rs (rcgen, jsonwebtoken and rustls all use it).
pub mod jwt;
pub mod keys;
pub mod tls;
pub mod x509;

pub use keys::{KeyError, PrivateKey, WorkloadKey, sha256_hex};
