//! The trust-domain authority: keys and signing, node attestation, and the node API.
mod authority;
pub mod join;
pub mod listen;
pub mod node_api;
pub mod run;
mod store;

pub use authority::{Authority, AuthorityConfig, AuthorityError};
pub use store::{FileStore, StoreError};
