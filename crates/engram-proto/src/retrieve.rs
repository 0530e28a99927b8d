//! `RetrieveMemoriesResponse`, written by hand rather than generated, so that a server can
//! send memories it encoded earlier: the same memories come back turn after turn, and
//! building and encoding each one again was a quarter of a retrieval's server CPU. On the
//! wire it is the message of `memory_service.proto`; a client decodes it into `memories`.

use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType, message, skip_field};

use crate::memory::v1::Memory;

/// The `memories` field's number.
pub const MEMORIES_TAG: u32 = 1;

/// Response for RetrieveMemories.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct RetrieveMemoriesResponse {
    /// The memories, most important first (equal ones newest first, then by name); their
    /// access counts include this retrieval.
    pub memories: Vec<Memory>,
    /// Further memories, sent after `memories`: each a whole `memories` field, key included.
    encoded: Vec<u8>,
}

impl RetrieveMemoriesResponse {
    /// A response of memories encoded already, each as a whole `memories` field (key,
    /// length and message). The caller vouches for the encoding; decoding checks it.
    pub fn from_encoded_memories(encoded: Vec<u8>) -> Self {
        Self {
            memories: Vec::new(),
            encoded,
        }
    }
}

impl prost::Message for RetrieveMemoriesResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        message::encode_repeated(MEMORIES_TAG, &self.memories, buf);
        buf.put_slice(&self.encoded);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        match tag {
            MEMORIES_TAG => message::merge_repeated(wire_type, &mut self.memories, buf, ctx)
                .map_err(|mut error| {
                    error.push("RetrieveMemoriesResponse", "memories");
                    error
                }),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        message::encoded_len_repeated(MEMORIES_TAG, &self.memories) + self.encoded.len()
    }

    fn clear(&mut self) {
        self.memories.clear();
        self.encoded.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn memory(content: &str, access_count: i64) -> Memory {
        Memory {
            name: format!("sessions/s/memories/{content}"),
            content: content.to_owned(),
            access_count,
            ..Memory::default()
        }
    }

    #[test]
    fn encoded_memories_follow_built_ones_and_decode_into_memories() {
        let (first, second, third) = (memory("a", 1), memory("b", 0), memory("c", 7));
        let mut encoded = Vec::new();
        message::encode(MEMORIES_TAG, &second, &mut encoded);
        message::encode(MEMORIES_TAG, &third, &mut encoded);
        let mut response = RetrieveMemoriesResponse::from_encoded_memories(encoded);
        response.memories.push(first.clone());

        let wire = response.encode_to_vec();
        assert_eq!(wire.len(), response.encoded_len());
        let decoded = RetrieveMemoriesResponse::decode(wire.as_slice()).expect("decodes");
        assert_eq!(decoded.memories, [first, second, third]);
        assert_eq!(
            decoded.encoded_len(),
            wire.len(),
            "decoded, it encodes the same size"
        );
    }

    #[test]
    fn a_broken_encoding_fails_to_decode_and_unknown_fields_are_skipped() {
        let broken = RetrieveMemoriesResponse::from_encoded_memories(vec![0x0a, 0x05, 0x0a]);
        let error = RetrieveMemoriesResponse::decode(broken.encode_to_vec().as_slice())
            .expect_err("a length past the end");
        assert!(error.to_string().contains("memories"), "{error}");

        let mut unknown = vec![0x10, 0x2a]; // field 2, a varint
        message::encode(MEMORIES_TAG, &memory("a", 3), &mut unknown);
        let decoded = RetrieveMemoriesResponse::decode(unknown.as_slice()).expect("decodes");
        assert_eq!(decoded.memories, [memory("a", 3)]);
    }
}
