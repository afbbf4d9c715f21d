//! SPIFFE domain types (pure, no I/O): IDs, trust domains and bundle documents.
mod bundle;
mod id;

pub use bundle::{BundleError, Jwk, JwkSet, JwtKey, MAX_BUNDLE_BYTES, SpiffeBundle};
pub use id::{IdError, MAX_ID_LEN, MAX_TRUST_DOMAIN_LEN, SpiffeId, TrustDomain};
