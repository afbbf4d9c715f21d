//! The trust-domain authority: keys, signing, and (later) node attestation and federation.
mod authority;
mod store;

pub use authority::{Authority, AuthorityConfig, AuthorityError};
