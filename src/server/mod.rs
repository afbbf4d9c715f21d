//! The trust-domain authority: keys and their rotation, signing, node attestation (join tokens
//! for hosts, service-account tokens for Kubernetes nodes), its own view of the cluster, and
//! the node API.
mod authority;
pub mod cluster;
pub mod crd;
pub mod join;
mod keys;
pub mod kube_store;
pub mod lease;
mod legacy;
pub mod listen;
pub mod node_api;
pub mod node_auth;
mod rotation;
pub mod run;
mod state;
mod store;

pub use authority::Authority;
pub use keys::{
    AuthorityConfig, AuthorityConfigError, AuthorityError, KeyChange, KeyEvent, MAX_JWT_LIFETIME,
};
pub use rotation::{always_leading, record as record_key_event, spawn_rotation};
pub use state::{KeyKind, KeyRing, KeySlot, KeyState, Lifecycle};
pub use store::{DocStore, FileStore, Revision, StateStore, StoreError};
