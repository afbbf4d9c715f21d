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
        // Shared buffers for what every FetchX509SVID answer repeats: the cached SVID's
        // chain and key are handed out by reference count, not copied, and so are the own
        // and federated bundles among all answers and the copy a stream keeps. (A message
        // path covers every bytes field of the message, map values included.)
        .bytes(".X509SVID.x509_svid")
        .bytes(".X509SVID.x509_svid_key")
        .bytes(".X509SVID.bundle")
        .bytes(".X509SVIDResponse")
        .file_descriptor_set_path(out.join("descriptor.bin"))
        .skip_protoc_run()
        .compile_fds(files)?;
    Ok(())
}
