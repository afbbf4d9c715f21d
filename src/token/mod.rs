//! Task tokens: short-lived JWTs that carry what an agent may do for one task, and the
//! delegation chain that got it there (AGENT-IDENTITY.md §3).
//!
//! Pure issuer and verifier logic; the gRPC service, policy loading and CLI sit elsewhere.
//! `claims` is the token format, `rules` what a caller's policy allows, `issue` minting and
//! delegation, `fan_out` the per-task delegation counter, `verify` the relying-party check.
pub mod claims;
pub mod fan_out;
pub mod issue;
pub mod rules;
pub mod verify;

pub use claims::{Actor, ScopeError, Scopes, TYP, TaskClaims, TaskContext};
pub use fan_out::FanOut;
pub use issue::{Caller, DelegateRequest, Issued, MintRequest, Refusal, delegate, mint};
pub use rules::{DEFAULT_MAX_TTL, MAX_DEPTH, MAX_TTL, RulesError, SpiffeIdPattern, TokenRules};
pub use verify::{VerifyError, unverified_holder, verify};

#[cfg(test)]
mod tests;
