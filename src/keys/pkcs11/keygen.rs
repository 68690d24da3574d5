//! Key generation inside the token and key lookup.

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState};

use super::super::{KeyError, KeyInfo, parse_ec_point};
use super::{Pkcs11Backend, Pkcs11Uri};

/// DER of OID 1.2.840.10045.3.1.7 (prime256v1 / secp256r1): `CKA_EC_PARAMS` for P-256.
pub(super) const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Length of the random `CKA_ID` given to each key.
const ID_LEN: usize = 16;

impl Pkcs11Backend {
    fn uri_for(&self, label: &str, id: &[u8]) -> String {
        Pkcs11Uri {
            token: Some(self.token_label.clone()),
            object: Some(label.to_owned()),
            id: Some(id.to_vec()),
            kind: Some("private".into()),
            ..Default::default()
        }
        .to_string()
    }

    /// Generates a P-256 key pair in the token: the private key is a token object, private,
    /// sensitive, never extractable and may only sign.
    pub(super) fn generate(&self, label: &str) -> Result<KeyInfo, KeyError> {
        let mut id = [0u8; ID_LEN];
        getrandom::fill(&mut id).map_err(|e| KeyError::Config(format!("OS random source: {e}")))?;
        let public_template = vec![
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::Encrypt(false),
            Attribute::Wrap(false),
            Attribute::Derive(false),
            Attribute::EcParams(P256_PARAMS.to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
        ];
        let private_template = vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
        ];
        let (public, private) = self
            .pool
            .run(|s| s.generate_key_pair(&Mechanism::EccKeyPairGen, &public_template, &private_template))?;
        let point = self.pool.run(|s| ec_point(s, public))?;
        let public_key = parse_ec_point(&point)?;
        let uri = self.uri_for(label, &id);
        if let Ok(mut h) = self.handles.lock() {
            h.insert(uri.clone(), private);
        }
        tracing::info!(uri = %uri, "generated P-256 signing key inside the token");
        Ok(KeyInfo {
            uri,
            label: label.to_owned(),
            public_key,
        })
    }

    /// Every EC private key on the token that can sign, with its public key.
    pub(super) fn list(&self) -> Result<Vec<KeyInfo>, KeyError> {
        let ids = self.pool.run(|s| {
            let template = [
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::EC),
                Attribute::Sign(true),
            ];
            let mut out = Vec::new();
            for h in find_private(s, &template)? {
                let attrs = s.get_attributes(h, &[AttributeType::Id, AttributeType::Label])?;
                let (mut id, mut label) = (None, None);
                for a in attrs {
                    match a {
                        Attribute::Id(v) => id = Some(v),
                        Attribute::Label(v) => label = Some(String::from_utf8_lossy(&v).into_owned()),
                        _ => {}
                    }
                }
                if let (Some(id), Some(label)) = (id, label) {
                    out.push((id, label));
                }
            }
            Ok(out)
        })?;
        let mut keys = Vec::new();
        for (id, label) in ids {
            let uri = self.uri_for(&label, &id);
            match self.find(&uri) {
                Ok(k) => keys.push(k),
                Err(KeyError::KeyNotFound(_) | KeyError::BadPublicKey(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(keys)
    }

    /// Finds the key named by `uri` and reads its public key from the public-key object.
    pub(super) fn find(&self, uri: &str) -> Result<KeyInfo, KeyError> {
        let parsed: Pkcs11Uri = uri.parse()?;
        let id = parsed
            .id
            .clone()
            .ok_or_else(|| KeyError::Config(format!("{uri} has no id")))?;
        let point = self.pool.run(|s| {
            let template = [
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::Id(id.clone()),
            ];
            match s.find_objects(&template)?.first() {
                Some(h) => ec_point(s, *h).map(Some),
                None => Ok(None),
            }
        })?;
        let point = point.ok_or_else(|| KeyError::KeyNotFound(uri.to_owned()))?;
        // The private key must be there too, or the key cannot sign.
        self.handle_for(uri)?;
        Ok(KeyInfo {
            uri: uri.to_owned(),
            label: parsed.object.unwrap_or_default(),
            public_key: parse_ec_point(&point)?,
        })
    }

    /// The cached private-key handle for `uri`, looked up on first use.
    pub(super) fn handle_for(&self, uri: &str) -> Result<ObjectHandle, KeyError> {
        if let Some(h) = self.handles.lock().ok().and_then(|m| m.get(uri).copied()) {
            return Ok(h);
        }
        let parsed: Pkcs11Uri = uri.parse()?;
        let id = parsed
            .id
            .ok_or_else(|| KeyError::Config(format!("{uri} has no id")))?;
        let found = self.pool.run(|s| {
            find_private(
                s,
                &[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::Id(id.clone()),
                ],
            )
        })?;
        let h = *found
            .first()
            .ok_or_else(|| KeyError::KeyNotFound(uri.to_owned()))?;
        if let Ok(mut m) = self.handles.lock() {
            m.insert(uri.to_owned(), h);
        }
        Ok(h)
    }
}

impl Pkcs11Backend {
    /// `C_DestroyObject` on the private and the public key object with the id of `uri`.
    pub(super) fn destroy(&self, uri: &str) -> Result<(), KeyError> {
        let parsed: Pkcs11Uri = uri.parse()?;
        let id = parsed
            .id
            .ok_or_else(|| KeyError::Config(format!("{uri} has no id")))?;
        self.pool.run(|s| {
            let mut objects = find_private(
                s,
                &[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::Id(id.clone()),
                ],
            )?;
            objects.extend(s.find_objects(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::Id(id.clone()),
            ])?);
            for h in objects {
                s.destroy_object(h)?;
            }
            Ok(())
        })?;
        if let Ok(mut m) = self.handles.lock() {
            m.remove(uri);
        }
        Ok(())
    }
}

/// `C_FindObjects` for private objects. A logged-out session cannot see them and the search
/// just comes back empty, so an empty answer on a session that is not logged in is reported
/// as `CKR_USER_NOT_LOGGED_IN`, which makes the pool log in again and retry.
impl Pkcs11Backend {
    /// The private key's attributes that say where it was made and whether it can leave
    /// the token, as the module answers them (`None`: it would not say).
    pub(super) fn protection_attributes(
        &self,
        uri: &str,
    ) -> Result<Vec<(&'static str, Option<bool>)>, KeyError> {
        let h = self.handle_for(uri)?;
        let asked = [
            ("CKA_LOCAL", AttributeType::Local),
            ("CKA_NEVER_EXTRACTABLE", AttributeType::NeverExtractable),
            ("CKA_ALWAYS_SENSITIVE", AttributeType::AlwaysSensitive),
            ("CKA_EXTRACTABLE", AttributeType::Extractable),
            ("CKA_SENSITIVE", AttributeType::Sensitive),
        ];
        let types: Vec<AttributeType> = asked.iter().map(|(_, t)| *t).collect();
        let got = self.with_session(|s| s.get_attributes(h, &types))?;
        Ok(asked
            .iter()
            .map(|(name, t)| {
                let v = got.iter().find_map(|a| match (t, a) {
                    (AttributeType::Local, Attribute::Local(b))
                    | (AttributeType::NeverExtractable, Attribute::NeverExtractable(b))
                    | (AttributeType::AlwaysSensitive, Attribute::AlwaysSensitive(b))
                    | (AttributeType::Extractable, Attribute::Extractable(b))
                    | (AttributeType::Sensitive, Attribute::Sensitive(b)) => Some(*b),
                    _ => None,
                });
                (*name, v)
            })
            .collect())
    }
}

fn find_private(s: &Session, template: &[Attribute]) -> Result<Vec<ObjectHandle>, CkError> {
    let found = s.find_objects(template)?;
    if found.is_empty() {
        let state = s.get_session_info()?.session_state();
        if !matches!(state, SessionState::RwUser | SessionState::RoUser) {
            return Err(CkError::Pkcs11(RvError::UserNotLoggedIn, Function::FindObjects));
        }
    }
    Ok(found)
}

fn ec_point(s: &Session, public: ObjectHandle) -> Result<Vec<u8>, CkError> {
    for a in s.get_attributes(public, &[AttributeType::EcPoint])? {
        if let Attribute::EcPoint(p) = a {
            return Ok(p);
        }
    }
    Ok(Vec::new())
}
