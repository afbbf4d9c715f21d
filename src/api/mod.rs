//! Generated Workload API code. Proto types stay inside this module and the services that
//! implement it; domain code never sees them.
pub mod convert;

#[allow(clippy::all, missing_docs)]
pub mod workload {
    tonic::include_proto!("_");
}

/// Generated code of agentid's own services (package `agentid.v1`).
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("agentid.v1");
}

/// The task-token and delegation API (`agentid.v1.Delegation`).
pub use v1 as delegation;
/// The node daemon ⇄ server API (`agentid.v1.Node`, `agentid.v1.ServerAdmin`).
pub use v1 as node;

/// gRPC metadata every Workload API request must carry, with the value `true` (and the
/// Delegation API's too: same socket, same rule).
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// gRPC metadata key of a Delegation refusal: the refusing rule's name (e.g. `scope_widening`).
pub const REFUSAL_RULE: &str = "agentid-refusal-rule";

/// Encoded descriptors of our protos, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("descriptor");
