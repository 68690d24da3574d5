//! base64url without padding (RFC 7515 §2), strict: padding, whitespace and non-canonical
//! trailing bits are refused, so one changed character always changes the decoded bytes.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Encodes bytes as base64url without padding.
pub fn encode(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes strict base64url without padding; `None` when the text is not canonical.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_strictness() {
        assert_eq!(encode(b"\xfb\xff"), "-_8");
        assert_eq!(decode("-_8").as_deref(), Some(&b"\xfb\xff"[..]));
        assert!(decode("-_8=").is_none(), "padding refused");
        assert!(decode("-_9").is_none(), "non-canonical trailing bits refused");
        assert!(decode("+/8").is_none(), "standard alphabet refused");
        assert!(decode("-_ 8").is_none(), "whitespace refused");
    }
}
