//! Key proofs: the evidence that a signing key lives in this TPM, and the TPM's half of the
//! challenge (docs/adr/0014-key-proofs.md).
//!
//! The attestation key is a primary key in the endorsement hierarchy: restricted, sign only,
//! fixedTPM. CreatePrimary derives it from the endorsement seed and the template, so it is
//! the same key every time and nothing has to be stored. The EK is re-created from its TCG
//! template the same way.

use tss_esapi::Context;
use tss_esapi::handles::KeyHandle;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Data, EccScheme, HashScheme, Public, PublicEccParametersBuilder, SignatureScheme,
    SymmetricDefinitionObject,
};
use tss_esapi::traits::Marshall;

use super::ek::{self, EkKind, public_tpm2b};
use super::keys::{bound_attributes, p256_template};
use super::{TpmBackend, parse_uri, tss_error};
use crate::keys::{Certified, KeyError, TpmEvidence};

/// The largest EK certificate file read (TCG NV indices hold a few kB).
const MAX_EK_CERT_FILE: u64 = 64 * 1024;

/// The endorsement half of the evidence, the same for every key of this TPM.
#[derive(Debug, Clone)]
pub(super) struct Endorsement {
    kind: EkKind,
    ek_public: Vec<u8>,
    ek_certificate: Option<Vec<u8>>,
    ak_public: Vec<u8>,
}

/// The attestation key: ECC P-256, ECDSA with SHA-256, restricted signing (it signs only
/// what the TPM itself produced: quotes, certifications), fixedTPM and fixedParent.
fn ak_template() -> tss_esapi::Result<Public> {
    p256_template(
        bound_attributes()
            .with_no_da(true)
            .with_restricted(true)
            .with_sign_encrypt(true)
            .with_decrypt(false),
        PublicEccParametersBuilder::new()
            .with_symmetric(SymmetricDefinitionObject::Null)
            .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
            .with_curve(EccCurve::NistP256)
            .with_key_derivation_function_scheme(tss_esapi::structures::KeyDerivationFunctionScheme::Null)
            .with_is_signing_key(true)
            .with_is_decryption_key(false)
            .with_restricted(true),
    )
}

/// Reads an EK certificate file: DER, or the first PEM `CERTIFICATE` block.
fn read_certificate_file(path: &std::path::Path) -> Result<Vec<u8>, KeyError> {
    let fail =
        |reason: String| KeyError::Config(format!("[tpm] ek_certificate {}: {reason}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if meta.len() > MAX_EK_CERT_FILE {
        return Err(fail(format!("larger than {MAX_EK_CERT_FILE} bytes")));
    }
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    if bytes.starts_with(b"-----BEGIN") {
        use der::Encode;
        let chain = x509_cert::Certificate::load_pem_chain(&bytes).map_err(|e| fail(e.to_string()))?;
        let first = chain.first().ok_or_else(|| fail("no CERTIFICATE in it".into()))?;
        return first.to_der().map_err(|e| fail(e.to_string()));
    }
    Ok(ek::der_prefix(&bytes).to_vec())
}

impl TpmBackend {
    /// Creates the EK and the AK (transient; the caller flushes both), with the endorsement
    /// hierarchy's auth value when one is configured.
    fn load_endorsement(
        &self,
        ctx: &mut Context,
        kind: EkKind,
    ) -> Result<(KeyHandle, KeyHandle, Public), KeyError> {
        if let Some(a) = self.endorsement_auth() {
            let auth = tss_esapi::structures::Auth::try_from(
                secrecy::ExposeSecret::expose_secret(a).as_bytes().to_vec(),
            )
            .map_err(|e| KeyError::Config(format!("[tpm] endorsement_auth: {e}")))?;
            ctx.tr_set_auth(tss_esapi::handles::ObjectHandle::Endorsement, auth)
                .map_err(|e| tss_error("TR_SetAuth(endorsement)", e))?;
        }
        let ek = ek::create_ek(ctx, kind)?;
        let ak = ak_template()
            .map_err(|e| tss_error("AK template", e))
            .and_then(|t| {
                ctx.execute_with_nullauth_session(|c| {
                    c.create_primary(Hierarchy::Endorsement, t, None, None, None, None)
                })
                .map_err(|e| tss_error("CreatePrimary(endorsement, AK)", e))
            });
        match ak {
            Ok(ak) => Ok((ek, ak.key_handle, ak.out_public)),
            Err(e) => {
                let _ = ctx.flush_context(ek.into());
                Err(e)
            }
        }
    }

    /// Which EK, its certificate, and both public areas; made once per process.
    fn endorsement(&self, ctx: &mut Context) -> Result<Endorsement, KeyError> {
        if let Some(e) = self.endorsement.get() {
            return Ok(e.clone());
        }
        let c = self.config();
        let file = c
            .ek_certificate
            .as_deref()
            .map(read_certificate_file)
            .transpose()?;
        let (kind, nv) = match c.ek {
            Some(kind) => (kind, ek::ek_certificate(ctx, kind)),
            None => EkKind::ALL
                .iter()
                .find_map(|k| ek::ek_certificate(ctx, *k).map(|cert| (*k, Some(cert))))
                .unwrap_or((EkKind::Rsa2048, None)),
        };
        let (ek, ak, ak_public) = self.load_endorsement(ctx, kind)?;
        let ek_public = ctx
            .read_public(ek)
            .map_err(|e| tss_error("ReadPublic(EK)", e))
            .and_then(|(p, _, _)| public_tpm2b(&p));
        let _ = ctx.flush_context(ek.into());
        let _ = ctx.flush_context(ak.into());
        let made = Endorsement {
            kind,
            ek_public: ek_public?,
            ek_certificate: file.or(nv),
            ak_public: public_tpm2b(&ak_public)?,
        };
        Ok(self.endorsement.get_or_init(|| made).clone())
    }

    /// The key must be one of keygate's keys in this TPM.
    fn key_handle(&self, ctx: &mut Context, uri: &str) -> Result<u32, KeyError> {
        let handle = parse_uri(uri)?;
        if !self.used_handles(ctx)?.contains(&handle) {
            return Err(KeyError::KeyNotFound(uri.to_owned()));
        }
        Ok(handle)
    }

    pub(super) fn evidence(&self, uri: &str) -> Result<TpmEvidence, KeyError> {
        self.with_context(|ctx| {
            let handle = self.key_handle(ctx, uri)?;
            let key_public = public_tpm2b(&self.read_key(ctx, handle)?)?;
            let e = self.endorsement(ctx)?;
            Ok(TpmEvidence {
                ek_kind: e.kind.name(),
                ek_public: e.ek_public,
                ek_certificate: e.ek_certificate,
                ak_public: e.ak_public,
                key_public,
            })
        })
    }

    pub(super) fn certify(
        &self,
        uri: &str,
        id_object: &[u8],
        encrypted_secret: &[u8],
        nonce: &[u8],
    ) -> Result<Certified, KeyError> {
        let nonce = Data::try_from(nonce.to_vec())
            .map_err(|_| KeyError::BadInput("the nonce is longer than 64 bytes".into()))?;
        let auth = self.auth_value()?;
        self.with_context(|ctx| {
            let handle = self.key_handle(ctx, uri)?;
            let kind = self.endorsement(ctx)?.kind;
            let (ek, ak, _) = self.load_endorsement(ctx, kind)?;
            let obj = Self::open_persistent(ctx, handle);
            let r = obj.and_then(|obj| {
                let activated = ek::activate(ctx, kind, ak, ek, id_object, encrypted_secret);
                let r = activated
                    .and_then(|r| {
                        // The TPM refused the credential itself: it was not made for this EK
                        // and AK. A client's mistake, not a device failure.
                        r.map_err(|why| {
                            KeyError::BadInput(format!("the TPM refused to activate the credential ({why})"))
                        })
                    })
                    .and_then(|secret| {
                        if let Some(a) = auth {
                            ctx.tr_set_auth(obj, a).map_err(|e| tss_error("TR_SetAuth", e))?;
                        }
                        let (attest, signature) = ctx
                            .execute_with_sessions(
                                (Some(AuthSession::Password), Some(AuthSession::Password), None),
                                |c| c.certify(obj, ak, nonce, SignatureScheme::Null),
                            )
                            .map_err(|e| tss_error(&format!("Certify(0x{handle:08x})"), e))?;
                        Ok(Certified {
                            secret,
                            attest: attest
                                .marshall()
                                .map_err(|e| tss_error("marshal TPMS_ATTEST", e))?,
                            signature: signature
                                .marshall()
                                .map_err(|e| tss_error("marshal TPMT_SIGNATURE", e))?,
                        })
                    });
                let mut obj = obj;
                let _ = ctx.tr_close(&mut obj);
                r
            });
            let _ = ctx.flush_context(ek.into());
            let _ = ctx.flush_context(ak.into());
            r
        })
    }
}
