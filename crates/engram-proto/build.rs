//! Compiles proto/ with protox (pure Rust, no protoc needed) and generates the tonic code.
use std::path::PathBuf;

use prost::Message;

const PROTO_ROOT: &str = "../../proto";
const PROTO_FILES: &[&str] = &[
    "engram/memory/v1/memory.proto",
    "engram/memory/v1/memory_service.proto",
    "engram/toolconfig/v1/tool.proto",
    "engram/toolconfig/v1/toolconfig_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let file_descriptors = protox::compile(PROTO_FILES, [PROTO_ROOT])?;
    // Reflection serves this set (with its imports), so grpcurl needs no local .proto files.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("engram_descriptor.bin"),
        file_descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // Written by hand (src/retrieve.rs), to send memories encoded earlier.
        .extern_path(
            ".engram.memory.v1.RetrieveMemoriesResponse",
            "crate::retrieve::RetrieveMemoriesResponse",
        )
        .compile_fds(file_descriptors)?;
    Ok(())
}
