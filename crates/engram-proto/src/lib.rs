//! Engram's public gRPC contract, generated from proto/.

pub mod memory {
    pub mod v1 {
        tonic::include_proto!("engram.memory.v1");
        pub use crate::retrieve::RetrieveMemoriesResponse;
    }
}

pub mod retrieve;

pub mod toolconfig {
    pub mod v1 {
        tonic::include_proto!("engram.toolconfig.v1");
    }
}

/// Encoded descriptors of every Engram proto file and its imports, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("engram_descriptor");
