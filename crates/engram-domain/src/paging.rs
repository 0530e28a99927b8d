//! Opaque page tokens (AIP-158): where the last page ended, bound to the request it came from.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

const TOKEN_VERSION: u8 = 1;
const CHECKSUM_LEN: usize = 8;

/// The last memory of a page, in ListMemories order (create time, then id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageCursor {
    pub created_at: DateTime<Utc>,
    pub id: String,
}

/// Why a page token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageTokenError {
    Malformed,
    /// The token came from a request with other parent, filter or show_deleted.
    RequestChanged,
}

/// A fingerprint of the request fields that must not change between pages.
pub fn request_fingerprint(parts: &[&str]) -> [u8; 8] {
    let mut digest = Sha256::new();
    for part in parts {
        digest.update((part.len() as u64).to_be_bytes());
        digest.update(part.as_bytes());
    }
    digest.finalize()[..8].try_into().expect("8 bytes")
}

/// Binary, checksummed and masked, then base64url: opaque to clients, tamper-evident.
pub fn encode_page_token(cursor: &PageCursor, fingerprint: [u8; 8]) -> String {
    let mut payload = vec![TOKEN_VERSION];
    payload.extend(fingerprint);
    payload.extend(cursor.created_at.timestamp_micros().to_be_bytes());
    payload.extend(cursor.id.as_bytes());
    let checksum = checksum(&payload);
    mask(&mut payload, &checksum);
    payload.extend(checksum);
    URL_SAFE_NO_PAD.encode(payload)
}

pub fn decode_page_token(token: &str, fingerprint: [u8; 8]) -> Result<PageCursor, PageTokenError> {
    let mut payload = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| PageTokenError::Malformed)?;
    if payload.len() < 1 + 8 + 8 + CHECKSUM_LEN {
        return Err(PageTokenError::Malformed);
    }
    let expected: [u8; CHECKSUM_LEN] = payload
        .split_off(payload.len() - CHECKSUM_LEN)
        .try_into()
        .expect("checksum length");
    mask(&mut payload, &expected);
    if checksum(&payload) != expected || payload[0] != TOKEN_VERSION {
        return Err(PageTokenError::Malformed);
    }
    if payload[1..9] != fingerprint {
        return Err(PageTokenError::RequestChanged);
    }
    let micros = i64::from_be_bytes(payload[9..17].try_into().expect("8 bytes"));
    let created_at = DateTime::from_timestamp_micros(micros).ok_or(PageTokenError::Malformed)?;
    let id = String::from_utf8(payload[17..].to_vec()).map_err(|_| PageTokenError::Malformed)?;
    Ok(PageCursor { created_at, id })
}

fn checksum(payload: &[u8]) -> [u8; CHECKSUM_LEN] {
    Sha256::digest(payload)[..CHECKSUM_LEN]
        .try_into()
        .expect("checksum length")
}

/// XOR with a keystream derived from the checksum, so the token shows no readable id.
fn mask(payload: &mut [u8], checksum: &[u8; CHECKSUM_LEN]) {
    let keystream = Sha256::digest(checksum);
    for (byte, key) in payload.iter_mut().zip(keystream.iter().cycle()) {
        *byte ^= key;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor() -> PageCursor {
        PageCursor {
            created_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            id: "0a1b2c3d-0000-4000-8000-000000000000".to_owned(),
        }
    }

    #[test]
    fn round_trips_and_hides_the_id() {
        let fingerprint = request_fingerprint(&["sessions/a", "", "false"]);
        let token = encode_page_token(&cursor(), fingerprint);
        assert_eq!(decode_page_token(&token, fingerprint), Ok(cursor()));
        let raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
        assert!(!raw.windows(8).any(|w| w == b"0a1b2c3d"));
    }

    #[test]
    fn refuses_tampering_and_changed_requests() {
        let fingerprint = request_fingerprint(&["sessions/a"]);
        let token = encode_page_token(&cursor(), fingerprint);
        assert_eq!(
            decode_page_token(&token, request_fingerprint(&["sessions/b"])),
            Err(PageTokenError::RequestChanged)
        );
        let mut bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
        bytes[5] ^= 1;
        assert_eq!(
            decode_page_token(&URL_SAFE_NO_PAD.encode(bytes), fingerprint),
            Err(PageTokenError::Malformed)
        );
        for junk in [
            "",
            "!!!",
            "AAAA",
            &URL_SAFE_NO_PAD.encode(b"{\"id\":\"x\"}"),
        ] {
            assert_eq!(
                decode_page_token(junk, fingerprint),
                Err(PageTokenError::Malformed),
                "{junk}"
            );
        }
    }

    #[test]
    fn fingerprint_separates_fields() {
        assert_ne!(
            request_fingerprint(&["ab", "c"]),
            request_fingerprint(&["a", "bc"])
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_tokens_never_panic(token in "\\PC{0,64}") {
            let _ = decode_page_token(&token, [0; 8]);
        }
    }
}
