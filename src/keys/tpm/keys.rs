//! Key templates, creation under the storage primary, persistence, lookup and signing.

use std::convert::TryFrom;

use secrecy::ExposeSecret;
use tss_esapi::Context;
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::CapabilityType;
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::handles::{KeyHandle, ObjectHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Auth, CapabilityData, Digest, EccPoint, EccScheme, HashScheme, Public, PublicBuilder,
    PublicEccParametersBuilder, Signature, SignatureScheme, SymmetricDefinitionObject,
};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;

use super::{TpmBackend, parse_uri, tss_error, uri_for};
use crate::keys::{KeyError, KeyInfo, parse_ec_point};

/// The attributes of every object keygate makes in the TPM: generated there
/// (sensitiveDataOrigin), bound to it and to its parent (fixedTPM, fixedParent), used with
/// its auth value.
pub(super) fn bound_attributes() -> ObjectAttributesBuilder {
    ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
}

/// An ECC P-256 public template with SHA-256 names and the TPM's own unique value.
pub(super) fn p256_template(
    attributes: ObjectAttributesBuilder,
    parameters: PublicEccParametersBuilder,
) -> tss_esapi::Result<Public> {
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes.build()?)
        .with_ecc_parameters(parameters.build()?)
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// The owner-hierarchy storage primary: an ECC P-256 restricted decryption key with the
/// TCG's AES-128-CFB symmetric, re-derived the same every time from the owner seed.
fn storage_primary() -> tss_esapi::Result<Public> {
    p256_template(
        bound_attributes()
            .with_no_da(true)
            .with_restricted(true)
            .with_decrypt(true),
        PublicEccParametersBuilder::new_restricted_decryption_key(
            SymmetricDefinitionObject::AES_128_CFB,
            EccCurve::NistP256,
        ),
    )
}

/// A keygate signing key: ECC P-256, ECDSA with SHA-256, sign only; fixedTPM, fixedParent
/// and sensitiveDataOrigin, so the private part is made in the TPM and can never leave it.
fn signing_key() -> tss_esapi::Result<Public> {
    p256_template(
        bound_attributes()
            .with_sign_encrypt(true)
            .with_decrypt(false)
            .with_restricted(false),
        PublicEccParametersBuilder::new_unrestricted_signing_key(
            EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
            EccCurve::NistP256,
        ),
    )
}

fn pad32(v: &[u8]) -> Result<[u8; 32], KeyError> {
    if v.len() > 32 {
        return Err(KeyError::BadPublicKey(format!(
            "{} bytes where 32 were expected",
            v.len()
        )));
    }
    let mut out = [0u8; 32];
    out[32 - v.len()..].copy_from_slice(v);
    Ok(out)
}

/// The P-256 public key of an ECC public area, refusing anything but a P-256 signing key.
fn p256_of(public: &Public) -> Result<p256::PublicKey, KeyError> {
    match public {
        Public::Ecc {
            object_attributes,
            parameters,
            unique,
            ..
        } => {
            if parameters.ecc_curve() != EccCurve::NistP256 || !object_attributes.sign_encrypt() {
                return Err(KeyError::BadPublicKey("not a P-256 signing key".into()));
            }
            let mut point = vec![4u8];
            point.extend_from_slice(&pad32(unique.x().value())?);
            point.extend_from_slice(&pad32(unique.y().value())?);
            parse_ec_point(&point)
        }
        _ => Err(KeyError::BadPublicKey("not an ECC key".into())),
    }
}

impl TpmBackend {
    pub(super) fn auth_value(&self) -> Result<Option<Auth>, KeyError> {
        self.auth()
            .map(|a| Auth::try_from(a.expose_secret().as_bytes().to_vec()))
            .transpose()
            .map_err(|e| KeyError::Config(format!("[tpm] auth value: {e}")))
    }

    /// Persistent handles in keygate's range that are in use.
    pub(super) fn used_handles(&self, ctx: &mut Context) -> Result<Vec<u32>, KeyError> {
        let c = self.config();
        let (data, _) = ctx
            .get_capability(CapabilityType::Handles, c.handle_base, c.handle_count)
            .map_err(|e| tss_error("GetCapability(handles)", e))?;
        let CapabilityData::Handles(list) = data else {
            return Ok(Vec::new());
        };
        Ok(list
            .into_inner()
            .into_iter()
            .filter_map(|h| match h {
                TpmHandle::Persistent(p) => Some(u32::from(p)),
                _ => None,
            })
            .filter(|h| (c.handle_base..c.handle_base.saturating_add(c.handle_count)).contains(h))
            .collect())
    }

    /// An ESYS object for a persistent handle (the caller closes it).
    pub(super) fn open_persistent(ctx: &mut Context, handle: u32) -> Result<ObjectHandle, KeyError> {
        let tpm = PersistentTpmHandle::new(handle).map_err(|e| tss_error("handle", e))?;
        // measured on the development VM: libtss2-esys 3.2.1 crashes here with a password session set.
        ctx.execute_without_session(|ctx| ctx.tr_from_tpm_public(TpmHandle::Persistent(tpm)))
            .map_err(|e| tss_error(&format!("TR_FromTPMPublic(0x{handle:08x})"), e))
    }

    pub(super) fn read_key(&self, ctx: &mut Context, handle: u32) -> Result<Public, KeyError> {
        let obj = Self::open_persistent(ctx, handle)?;
        let r = ctx.execute_without_session(|ctx| ctx.read_public(KeyHandle::from(obj)));
        let mut obj = obj;
        let _ = ctx.tr_close(&mut obj);
        r.map(|(public, _, _)| public)
            .map_err(|e| tss_error(&format!("ReadPublic(0x{handle:08x})"), e))
    }

    /// Creates a key under the storage primary, persists it at the next free handle, and
    /// flushes every transient object it made.
    pub(super) fn generate(&self, label: &str) -> Result<KeyInfo, KeyError> {
        let auth = self.auth_value()?;
        self.with_context(|ctx| {
            let used = self.used_handles(ctx)?;
            let c = self.config();
            let handle = (c.handle_base..c.handle_base.saturating_add(c.handle_count))
                .find(|h| !used.contains(h))
                .ok_or_else(|| {
                    KeyError::Config(format!("all {} TPM handles of [tpm] are in use", c.handle_count))
                })?;
            let template = storage_primary().map_err(|e| tss_error("template", e))?;
            let primary = ctx
                .execute_with_nullauth_session(|ctx| {
                    ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
                })
                .map_err(|e| tss_error("CreatePrimary(owner)", e))?
                .key_handle;
            let made = (|| {
                let template = signing_key().map_err(|e| tss_error("template", e))?;
                let created = ctx
                    .execute_with_nullauth_session(|ctx| {
                        ctx.create(primary, template, auth, None, None, None)
                    })
                    .map_err(|e| tss_error("Create", e))?;
                let loaded = ctx
                    .execute_with_nullauth_session(|ctx| {
                        ctx.load(primary, created.out_private.clone(), created.out_public.clone())
                    })
                    .map_err(|e| tss_error("Load", e))?;
                let persistent = PersistentTpmHandle::new(handle).map_err(|e| tss_error("handle", e))?;
                let evicted = ctx.execute_with_nullauth_session(|ctx| {
                    ctx.evict_control(
                        Provision::Owner,
                        loaded.into(),
                        Persistent::Persistent(persistent),
                    )
                });
                let _ = ctx.flush_context(loaded.into());
                let mut evicted = evicted.map_err(|e| tss_error("EvictControl", e))?;
                let _ = ctx.tr_close(&mut evicted);
                p256_of(&created.out_public)
            })();
            let _ = ctx.flush_context(primary.into());
            let public_key = made?;
            let uri = uri_for(handle);
            tracing::info!(uri = %uri, "generated P-256 signing key inside the TPM");
            Ok(KeyInfo {
                uri,
                label: label.to_owned(),
                public_key,
            })
        })
    }

    /// This TPM's identity: `tpm:` and the first 16 hex digits of the SHA-256 of its owner
    /// storage primary's public point. The primary is derived from the owner seed, so the
    /// id stays the same for as long as the TPM's keys do (clearing the owner hierarchy
    /// changes both).
    pub(super) fn identity(&self) -> Result<String, KeyError> {
        self.with_context(|ctx| {
            let template = storage_primary().map_err(|e| tss_error("template", e))?;
            let created = ctx
                .execute_with_nullauth_session(|ctx| {
                    ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
                })
                .map_err(|e| tss_error("CreatePrimary(owner)", e))?;
            let _ = ctx.flush_context(created.key_handle.into());
            let Public::Ecc { unique, .. } = &created.out_public else {
                return Err(KeyError::BadPublicKey(
                    "the storage primary is not an ECC key".into(),
                ));
            };
            let mut ctx_hash = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
            ctx_hash.update(unique.x().value());
            ctx_hash.update(unique.y().value());
            let id = hex::encode(&ctx_hash.finish().as_ref()[..8]);
            Ok(format!("tpm:{id}"))
        })
    }

    pub(super) fn list(&self) -> Result<Vec<KeyInfo>, KeyError> {
        self.with_context(|ctx| {
            let mut out = Vec::new();
            for h in self.used_handles(ctx)? {
                if let Ok(public_key) = self.read_key(ctx, h).and_then(|p| p256_of(&p)) {
                    out.push(KeyInfo {
                        uri: uri_for(h),
                        label: uri_for(h),
                        public_key,
                    });
                }
            }
            Ok(out)
        })
    }

    pub(super) fn find(&self, uri: &str) -> Result<KeyInfo, KeyError> {
        let handle = parse_uri(uri)?;
        self.with_context(|ctx| {
            if !self.used_handles(ctx)?.contains(&handle) {
                return Err(KeyError::KeyNotFound(uri.to_owned()));
            }
            let public_key = p256_of(&self.read_key(ctx, handle)?)?;
            Ok(KeyInfo {
                uri: uri.to_owned(),
                label: uri.to_owned(),
                public_key,
            })
        })
    }

    pub(super) fn sign(&self, uri: &str, digest: &[u8; 32]) -> Result<[u8; 64], KeyError> {
        let handle = parse_uri(uri)?;
        let auth = self.auth_value()?;
        self.with_context(|ctx| {
            let obj = Self::open_persistent(ctx, handle)?;
            let signed = (|| {
                if let Some(a) = auth {
                    ctx.tr_set_auth(obj, a).map_err(|e| tss_error("TR_SetAuth", e))?;
                }
                let digest = Digest::try_from(digest.to_vec()).map_err(|e| tss_error("digest", e))?;
                let ticket = TPMT_TK_HASHCHECK {
                    tag: TPM2_ST_HASHCHECK,
                    hierarchy: TPM2_RH_NULL,
                    digest: Default::default(),
                }
                .try_into()
                .map_err(|e| tss_error("ticket", e))?;
                ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
                    ctx.sign(KeyHandle::from(obj), digest, SignatureScheme::Null, ticket)
                })
                .map_err(|e| tss_error(&format!("Sign(0x{handle:08x})"), e))
            })();
            let mut obj = obj;
            let _ = ctx.tr_close(&mut obj);
            match signed? {
                Signature::EcDsa(sig) => {
                    let mut out = [0u8; 64];
                    out[..32].copy_from_slice(&pad32(sig.signature_r().value())?);
                    out[32..].copy_from_slice(&pad32(sig.signature_s().value())?);
                    Ok(out)
                }
                _ => Err(KeyError::Tpm {
                    what: "Sign".into(),
                    reason: "not an ECDSA signature".into(),
                }),
            }
        })
    }

    /// The object attributes of a key as the TPM reports them (tests prove fixedTPM,
    /// fixedParent and sensitiveDataOrigin from this).
    pub fn key_attributes(&self, uri: &str) -> Result<tss_esapi::attributes::ObjectAttributes, KeyError> {
        let handle = parse_uri(uri)?;
        self.with_context(|ctx| match self.read_key(ctx, handle)? {
            Public::Ecc {
                object_attributes, ..
            } => Ok(object_attributes),
            _ => Err(KeyError::BadPublicKey("not an ECC key".into())),
        })
    }

    /// Removes a key from the TPM (EvictControl on the persistent handle).
    pub fn destroy(&self, uri: &str) -> Result<(), KeyError> {
        let handle = parse_uri(uri)?;
        self.with_context(|ctx| {
            let obj = Self::open_persistent(ctx, handle)?;
            let persistent = PersistentTpmHandle::new(handle).map_err(|e| tss_error("handle", e))?;
            ctx.execute_with_nullauth_session(|ctx| {
                ctx.evict_control(Provision::Owner, obj, Persistent::Persistent(persistent))
            })
            .map(|_| ())
            .map_err(|e| tss_error("EvictControl(remove)", e))
        })
    }
}
