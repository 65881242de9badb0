//! Generates the `spin.v1` gRPC code from `proto/` with the pure-Rust `protox` compiler, so
//! neither a developer nor CI needs a system `protoc`.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("..");
    let include = root.join("proto");
    let files = ["common", "job", "control", "collective"].map(|name| {
        include
            .join("spin")
            .join("v1")
            .join(format!("{name}.proto"))
    });
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let descriptors = protox::compile(&files, [&include])?;
    tonic_prost_build::configure()
        // Chunk payloads are handed on without a copy.
        .bytes(".spin.v1.ChunkMessage.payload")
        .compile_fds(descriptors)?;
    Ok(())
}
