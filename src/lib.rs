//! agentid: SPIFFE workload identity for AI agents.
//!
//! Pure modules at the bottom (`spiffe`, `policy`), the crypto boundary (`crypto`), task
//! tokens on top of it (`token`: minting, delegation, verification), Kubernetes facts both
//! sides read (`k8s`: the pod index and its API-server watch), the two trust boundaries
//! (`server`: the authority; `node`: the Workload API daemon), and `up`, the only place that
//! links both into one process.
pub mod admin;
pub mod api;
pub mod audit;
pub mod bench;
pub mod cli;
pub mod client;
pub mod commands;
pub mod composite;
pub mod crypto;
pub mod inspect;
pub mod k8s;
pub mod metrics;
pub mod node;
pub mod policy;
pub mod policy_watch;
pub mod server;
pub mod spiffe;
pub mod token;
pub mod up;
