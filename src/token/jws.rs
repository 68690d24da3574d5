//! JWS compact serialization (RFC 7515 §7.1) for ES256 tokens.

use serde::{Deserialize, Serialize};

use super::b64;

/// The protected header keygate writes and accepts. Members are serialized in the order
/// the HTTP contract shows: `alg`, `typ`, `kid`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typ: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// RFC 7515 §4.1.11: keygate understands no extension, so any `crit` is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crit: Option<serde_json::Value>,
}

impl Header {
    /// The header of a keygate-signed JWS of type `typ` under key `kid`.
    pub fn es256(typ: &str, kid: &str) -> Header {
        Header {
            alg: super::ALG_ES256.into(),
            typ: Some(typ.into()),
            kid: Some(kid.into()),
            crit: None,
        }
    }
}

/// `BASE64URL(header) || '.' || BASE64URL(payload)`: the bytes the signature covers.
pub fn signing_input(header: &Header, payload: &[u8]) -> Result<String, serde_json::Error> {
    let h = serde_json::to_vec(header)?;
    let mut s = b64::encode(h);
    s.push('.');
    s.push_str(&b64::encode(payload));
    Ok(s)
}

/// Appends the base64url signature to a signing input, giving the compact serialization.
pub fn assemble(signing_input: &str, signature: &[u8]) -> String {
    let mut s = String::with_capacity(signing_input.len() + 1 + 86);
    s.push_str(signing_input);
    s.push('.');
    s.push_str(&b64::encode(signature));
    s
}

/// The three decoded parts of a compact JWS, plus the signing input they came from.
#[derive(Debug)]
pub struct Parts<'a> {
    pub header: Header,
    pub payload: Vec<u8>,
    pub signature: Vec<u8>,
    pub signing_input: &'a str,
}

/// Why a compact JWS could not even be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not three base64url parts separated by '.'")]
    Shape,
    #[error("{0} is not valid base64url")]
    Base64(&'static str),
    #[error("header is not a JSON object with a string alg: {0}")]
    Header(String),
}

/// Splits and decodes a compact JWS. Checks nothing about keys or claims.
pub fn parse(token: &str) -> Result<Parts<'_>, ParseError> {
    let mut it = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(ParseError::Shape);
    };
    let header_bytes = b64::decode(h).ok_or(ParseError::Base64("header"))?;
    let payload = b64::decode(p).ok_or(ParseError::Base64("payload"))?;
    let signature = b64::decode(s).ok_or(ParseError::Base64("signature"))?;
    let header: Header =
        serde_json::from_slice(&header_bytes).map_err(|e| ParseError::Header(e.to_string()))?;
    Ok(Parts {
        header,
        payload,
        signature,
        signing_input: &token[..h.len() + 1 + p.len()],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_serializes_in_api_order() {
        let h = Header::es256("provisioning+jwt", "abc");
        assert_eq!(
            serde_json::to_string(&h).unwrap(),
            r#"{"alg":"ES256","typ":"provisioning+jwt","kid":"abc"}"#
        );
    }

    #[test]
    fn parse_refuses_bad_shapes() {
        assert_eq!(parse("a.b").unwrap_err(), ParseError::Shape);
        assert_eq!(parse("a.b.c.d").unwrap_err(), ParseError::Shape);
        assert_eq!(parse("!!.e30.AA").unwrap_err(), ParseError::Base64("header"));
        assert!(matches!(parse("e30.e30.").unwrap_err(), ParseError::Header(_)));
    }

    /// RFC 7515 appendix A.3: the ES256 example parses and its signing input is exact.
    #[test]
    fn rfc7515_a3_parses() {
        let t = "eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSApmWQxfKTUJqPP3-Kg6NU1Q";
        let parts = parse(t).unwrap();
        assert_eq!(parts.header.alg, "ES256");
        assert_eq!(parts.signature.len(), 64);
        assert!(t.starts_with(parts.signing_input));
    }
}
