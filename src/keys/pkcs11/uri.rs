//! RFC 7512 PKCS#11 URIs for keygate's keys: `pkcs11:token=..;object=..;id=%..;type=private`.
//! Query attributes are not accepted: a URI never carries a PIN.

use super::super::KeyError;

/// The path attributes keygate writes and reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pkcs11Uri {
    pub token: Option<String>,
    pub serial: Option<String>,
    pub object: Option<String>,
    pub id: Option<Vec<u8>>,
    pub kind: Option<String>,
}

/// RFC 7512 §2.3 `pk11-pchar` without percent-encoding: unreserved and the few sub-delims
/// allowed in a path attribute value.
fn is_pchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b':'
                | b'['
                | b']'
                | b'@'
                | b'!'
                | b'$'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b'='
                | b'&'
        )
}

fn encode_into(out: &mut String, bytes: &[u8], force: bool) {
    for &b in bytes {
        if !force && is_pchar(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
}

fn decode(value: &str) -> Result<Vec<u8>, KeyError> {
    let bad = || KeyError::Config(format!("bad percent-encoding in PKCS#11 URI value {value:?}"));
    let b = value.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = value.get(i + 1..i + 3).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else if is_pchar(b[i]) {
            out.push(b[i]);
            i += 1;
        } else {
            return Err(bad());
        }
    }
    Ok(out)
}

impl std::fmt::Display for Pkcs11Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::from("pkcs11:");
        let mut first = true;
        let mut attr = |s: &mut String, name: &str, v: &[u8], force: bool| {
            if !first {
                s.push(';');
            }
            first = false;
            s.push_str(name);
            s.push('=');
            encode_into(s, v, force);
        };
        if let Some(t) = &self.token {
            attr(&mut s, "token", t.as_bytes(), false);
        }
        if let Some(t) = &self.serial {
            attr(&mut s, "serial", t.as_bytes(), false);
        }
        if let Some(o) = &self.object {
            attr(&mut s, "object", o.as_bytes(), false);
        }
        if let Some(id) = &self.id {
            attr(&mut s, "id", id, true);
        }
        if let Some(k) = &self.kind {
            attr(&mut s, "type", k.as_bytes(), false);
        }
        f.write_str(&s)
    }
}

impl std::str::FromStr for Pkcs11Uri {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        let rest = s
            .strip_prefix("pkcs11:")
            .ok_or_else(|| KeyError::Config("PKCS#11 URI must start with \"pkcs11:\"".into()))?;
        if rest.contains('?') {
            return Err(KeyError::Config(
                "PKCS#11 URI query attributes (pin-value, pin-source, module-path) are not accepted".into(),
            ));
        }
        let mut uri = Pkcs11Uri::default();
        for part in rest.split(';').filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| KeyError::Config(format!("PKCS#11 URI attribute {part:?} has no '='")))?;
            let raw = decode(value)?;
            let text = || {
                String::from_utf8(raw.clone())
                    .map_err(|_| KeyError::Config(format!("PKCS#11 URI {name} is not UTF-8")))
            };
            match name {
                "token" => uri.token = Some(text()?),
                "serial" => uri.serial = Some(text()?),
                "object" => uri.object = Some(text()?),
                "id" => uri.id = Some(raw),
                "type" => uri.kind = Some(text()?),
                // RFC 7512 allows more path attributes; they narrow nothing keygate relies on.
                "manufacturer"
                | "model"
                | "library-manufacturer"
                | "library-description"
                | "library-version"
                | "slot-description"
                | "slot-manufacturer"
                | "slot-id" => {}
                other => {
                    return Err(KeyError::Config(format!(
                        "unknown PKCS#11 URI attribute {other:?}"
                    )));
                }
            }
        }
        Ok(uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_api_md() {
        let u = Pkcs11Uri {
            token: Some("keygate".into()),
            object: Some("root-20261123".into()),
            id: Some(vec![1]),
            ..Default::default()
        };
        assert_eq!(u.to_string(), "pkcs11:token=keygate;object=root-20261123;id=%01");
        assert_eq!(u.to_string().parse::<Pkcs11Uri>().unwrap(), u);
    }

    #[test]
    fn round_trips_awkward_values() {
        let u = Pkcs11Uri {
            token: Some("my token;é/x".into()),
            object: Some("a%b".into()),
            id: Some(vec![0xde, 0xad, 0x00]),
            kind: Some("private".into()),
            ..Default::default()
        };
        let s = u.to_string();
        assert!(!s.contains(' ') && !s[7..].contains('/'));
        assert_eq!(s.parse::<Pkcs11Uri>().unwrap(), u);
    }

    #[test]
    fn rfc7512_examples_parse() {
        let u: Pkcs11Uri =
            "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;model=1.0;object=my-certificate;type=cert;id=%69%95%3E%5C%F4%BD%EC%91;serial="
                .parse()
                .unwrap();
        assert_eq!(u.token.as_deref(), Some("The Software PKCS#11 Softtoken"));
        assert_eq!(u.id, Some(vec![0x69, 0x95, 0x3e, 0x5c, 0xf4, 0xbd, 0xec, 0x91]));
    }

    #[test]
    fn refuses_pins_and_junk() {
        assert!("pkcs11:token=a?pin-value=1234".parse::<Pkcs11Uri>().is_err());
        assert!("tpm:handle=0x81000001".parse::<Pkcs11Uri>().is_err());
        assert!("pkcs11:token=%zz".parse::<Pkcs11Uri>().is_err());
        assert!("pkcs11:bogus=1".parse::<Pkcs11Uri>().is_err());
        assert!("pkcs11:token=a b".parse::<Pkcs11Uri>().is_err());
    }
}
