//! agentid: SPIFFE workload identity for AI agents.
pub mod api;
pub mod crypto;
pub mod policy;
pub mod server;
pub mod spiffe;
