//! Generates the gRPC code from `proto/` with protox, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = protox::compile(
        [
            "workload.proto",
            "agentid/v1/delegation.proto",
            "agentid/v1/node.proto",
        ],
        ["proto"],
    )?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("descriptor.bin"),
        prost::Message::encode_to_vec(&files),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The X.509 answer's bytes fields as shared buffers: clients decode them without a
        // copy each, and the benchmark's floor hands out its pre-made answer by reference
        // count, as the daemon's own answer type does (below), so the floor does no copying
        // the daemon is spared. (A message path covers every bytes field of the message, map
        // values included.)
        .bytes(".X509SVID.x509_svid")
        .bytes(".X509SVID.x509_svid_key")
        .bytes(".X509SVID.bundle")
        .bytes(".X509SVIDResponse")
        .file_descriptor_set_path(out.join("descriptor.bin"))
        .skip_protoc_run()
        .compile_fds(files.clone())?;
    workload_server(files, &out.join("workload_server"))
}

/// The node daemon's own Workload API server: the generated service, with every message type
/// taken from the code above except `X509SVIDResponse`, which the daemon answers with
/// `X509Answer`, a type that encodes itself from the shared parts an answer is made of rather
/// than from a message built for every call. Clients, and the benchmark's floor, keep the
/// plain generated types; the wire format is the same.
fn workload_server(
    mut files: prost_types::FileDescriptorSet,
    out: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    files
        .file
        .retain(|f| f.name() == "workload.proto" || f.name().starts_with("google/protobuf/"));
    let workload = files
        .file
        .iter()
        .find(|f| f.name() == "workload.proto")
        .ok_or("workload.proto missing from the compiled protos")?;
    let mut builder = tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .out_dir(out);
    for message in &workload.message_type {
        let name = message.name();
        let rust = match name {
            "X509SVIDResponse" => "crate::node::answer::X509Answer".to_owned(),
            _ => format!("crate::api::workload::{}", upper_camel(name)),
        };
        builder = builder.extern_path(format!(".{name}"), rust);
    }
    std::fs::create_dir_all(out)?;
    builder.skip_protoc_run().compile_fds(files)?;
    Ok(())
}

/// A message's Rust name as prost spells it (`X509SVIDResponse` → `X509svidResponse`).
fn upper_camel(name: &str) -> String {
    heck::ToUpperCamelCase::to_upper_camel_case(name)
}
