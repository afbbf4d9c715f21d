//! SPIFFE domain types (pure, no I/O): IDs, trust domains and bundle documents.
mod bundle;
mod id;

pub use bundle::{Jwk, JwkSet, JwtKey, SpiffeBundle};
pub use id::{IdError, MAX_ID_LEN, MAX_TRUST_DOMAIN_LEN, SpiffeId, TrustDomain};
