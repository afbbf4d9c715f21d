//! Generated Workload API code.
#[allow(clippy::all, missing_docs)]
pub mod workload {
    tonic::include_proto!("_");
}
