//! EC P-256 JSON Web Keys (RFC 7517/7518 §6.2) and RFC 7638 thumbprints.

use aws_lc_rs::digest;
use serde::{Deserialize, Serialize};

use super::b64;

/// One public JWK as keygate publishes it. Unknown members of foreign keys are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
}

/// A JWK Set (RFC 7517 §5).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwkSet {
    pub keys: Vec<Jwk>,
}

/// Why a JWK cannot be used as an ES256 verification key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwkError {
    #[error("key type {0:?} is not EC")]
    NotEc(String),
    #[error("curve is not P-256")]
    NotP256,
    #[error("coordinate {0} is missing or not 32 bytes of base64url")]
    BadCoordinate(&'static str),
    #[error("point is not on the P-256 curve")]
    NotOnCurve,
    #[error("key use {0:?} is not \"sig\"")]
    WrongUse(String),
    #[error("key algorithm {0:?} is not ES256")]
    WrongAlg(String),
    #[error("kid {kid:?} is not the RFC 7638 thumbprint {thumbprint:?}")]
    KidMismatch { kid: String, thumbprint: String },
}

impl Jwk {
    /// Builds the published JWK of a P-256 public key; `kid` is its RFC 7638 thumbprint.
    pub fn from_public_key(key: &p256::PublicKey) -> Jwk {
        // Uncompressed SEC1 (P-256 does not compress by default): 0x04 || X || Y.
        let point = key.to_sec1_bytes();
        let (x, y) = (b64::encode(&point[1..33]), b64::encode(&point[33..65]));
        let kid = ec_thumbprint(&x, &y);
        Jwk {
            kty: "EC".into(),
            crv: Some("P-256".into()),
            x: Some(x),
            y: Some(y),
            use_: Some("sig".into()),
            alg: Some(super::ALG_ES256.into()),
            kid: Some(kid),
        }
    }

    /// Checks that this is an ES256 signing key whose `kid` (if any) is its thumbprint, and
    /// returns the uncompressed SEC1 point (65 bytes) and the thumbprint.
    pub fn es256_point(&self) -> Result<(Vec<u8>, String), JwkError> {
        if self.kty != "EC" {
            return Err(JwkError::NotEc(self.kty.clone()));
        }
        if self.crv.as_deref() != Some("P-256") {
            return Err(JwkError::NotP256);
        }
        if let Some(u) = &self.use_
            && u != "sig"
        {
            return Err(JwkError::WrongUse(u.clone()));
        }
        if let Some(a) = &self.alg
            && a != super::ALG_ES256
        {
            return Err(JwkError::WrongAlg(a.clone()));
        }
        let coord = |v: &Option<String>, name| {
            v.as_deref()
                .and_then(b64::decode)
                .filter(|b| b.len() == 32)
                .ok_or(JwkError::BadCoordinate(name))
        };
        let (x, y) = (coord(&self.x, "x")?, coord(&self.y, "y")?);
        let mut point = Vec::with_capacity(65);
        point.push(4);
        point.extend_from_slice(&x);
        point.extend_from_slice(&y);
        p256::PublicKey::from_sec1_bytes(&point).map_err(|_| JwkError::NotOnCurve)?;
        let (xs, ys) = (self.x.as_deref().unwrap_or(""), self.y.as_deref().unwrap_or(""));
        let tp = ec_thumbprint(xs, ys);
        if let Some(kid) = &self.kid
            && *kid != tp
        {
            return Err(JwkError::KidMismatch {
                kid: kid.clone(),
                thumbprint: tp,
            });
        }
        Ok((point, tp))
    }
}

/// RFC 7638 thumbprint of an EC key from its base64url coordinates.
fn ec_thumbprint(x: &str, y: &str) -> String {
    thumbprint(&[("crv", "P-256"), ("kty", "EC"), ("x", x), ("y", y)])
}

/// RFC 7638 §3: SHA-256 over the JSON object of the required members, in lexicographic
/// order, without whitespace; base64url. `members` are (name, string value) pairs.
pub fn thumbprint(members: &[(&str, &str)]) -> String {
    let mut sorted: Vec<_> = members.to_vec();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut json = String::from("{");
    for (i, (k, v)) in sorted.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        // serde_json escapes exactly as RFC 7638 §3.3 requires for these string values.
        json.push_str(&serde_json::Value::from(*k).to_string());
        json.push(':');
        json.push_str(&serde_json::Value::from(*v).to_string());
    }
    json.push('}');
    b64::encode(digest::digest(&digest::SHA256, json.as_bytes()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// RFC 7638 §3.1: the RSA key example and its thumbprint.
    #[test]
    fn rfc7638_section_3_1_example() {
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        let tp = thumbprint(&[("kty", "RSA"), ("n", n), ("e", "AQAB")]);
        assert_eq!(tp, "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
    }

    /// The ES256 key of RFC 7515 appendix A.3 (public part), with a wrong `use` and `kid`.
    pub(crate) fn rfc7515_a3_key() -> Jwk {
        serde_json::from_str(
            r#"{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0","use":"enc","kid":"1"}"#,
        )
        .unwrap()
    }

    #[test]
    fn checks_use_and_kid() {
        let mut jwk = rfc7515_a3_key();
        assert_eq!(jwk.es256_point(), Err(JwkError::WrongUse("enc".into())));
        jwk.use_ = Some("sig".into());
        assert!(matches!(jwk.es256_point(), Err(JwkError::KidMismatch { .. })));
        jwk.kid = None;
        let (point, tp) = jwk.es256_point().unwrap();
        assert_eq!(point.len(), 65);
        jwk.kid = Some(tp);
        assert!(jwk.es256_point().is_ok());
        jwk.alg = Some("HS256".into());
        assert_eq!(jwk.es256_point(), Err(JwkError::WrongAlg("HS256".into())));
    }

    #[test]
    fn refuses_points_off_the_curve() {
        let mut jwk = rfc7515_a3_key();
        jwk.use_ = None;
        jwk.kid = None;
        jwk.y = Some(b64::encode([7u8; 32]));
        assert_eq!(jwk.es256_point(), Err(JwkError::NotOnCurve));
        jwk.y = Some("AAAA".into());
        assert_eq!(jwk.es256_point(), Err(JwkError::BadCoordinate("y")));
    }

    #[test]
    fn published_jwk_round_trips() {
        let jwk = rfc7515_a3_key();
        let (point, _) = Jwk {
            use_: None,
            kid: None,
            ..jwk
        }
        .es256_point()
        .unwrap();
        let key = p256::PublicKey::from_sec1_bytes(&point).unwrap();
        let published = Jwk::from_public_key(&key);
        let (p2, tp) = published.es256_point().unwrap();
        assert_eq!(p2, point);
        assert_eq!(published.kid.as_deref(), Some(tp.as_str()));
    }
}
