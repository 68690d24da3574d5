//! The endorsement side of a TPM, shared by the enrollment client (`keygate enroll`) and the
//! server's key proofs: the EK re-created from its TCG template (so it is the key its
//! certificate names), that certificate from NV, the EK's policy session, and
//! ActivateCredential.

use tss_esapi::Context;
use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, DefaultKey, ek};
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{KeyHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{Digest, DigestList, EncryptedSecret, IdObject, Public, SymmetricDefinition};
use tss_esapi::traits::Marshall;

use super::tss_error;
use crate::keys::KeyError;

/// Policy digests of the TCG EK Credential Profile 2.x (hex). A high-range EK (the P-384
/// template H-3, say) has authPolicy PolicyB = PolicyOR(PolicyA, PolicyC); satisfying it
/// takes PolicySecret(endorsement) (that is PolicyA), then PolicyOR with both.
pub mod ek_policy {
    /// PolicySecret(TPM_RH_ENDORSEMENT) in a SHA-384 session.
    pub const POLICY_A_SHA384: &str =
        "8bbf2266537c171cb56e403c4dc1d4b64f432611dc386e6f532050c3278c930e143e8bb1133824ccb431053871c6db53";
    /// PolicyAuthorizeNV of the profile's SHA-384 NV index.
    pub const POLICY_C_SHA384: &str =
        "d6032ce61f2fb3c240eb3cf6a33237ef2b6a16f4293c22b455e261cffd217ad5b4947c2d73e63005eed2dc2b3593d165";
}

/// Which EK (TCG EK Credential Profile template).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EkKind {
    /// RSA-2048 (template L-1; certificate at NV 0x01c00002).
    Rsa2048,
    /// ECC NIST P-256 (template L-2; certificate at NV 0x01c0000a).
    P256,
    /// ECC NIST P-384 (template H-3; certificate at NV 0x01c00016).
    P384,
}

impl EkKind {
    pub const ALL: [EkKind; 3] = [EkKind::Rsa2048, EkKind::P256, EkKind::P384];

    fn selection(self) -> AsymmetricAlgorithmSelection {
        match self {
            EkKind::Rsa2048 => AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            EkKind::P256 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
            EkKind::P384 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP384),
        }
    }

    /// The hash of the EK's policy session.
    fn policy_hash(self) -> HashingAlgorithm {
        match self {
            EkKind::P384 => HashingAlgorithm::Sha384,
            _ => HashingAlgorithm::Sha256,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            EkKind::Rsa2048 => "rsa2048",
            EkKind::P256 => "p256",
            EkKind::P384 => "p384",
        }
    }
}

/// Creates the EK of `kind` from the TCG template (a transient object the caller flushes).
pub fn create_ek(ctx: &mut Context, kind: EkKind) -> Result<KeyHandle, KeyError> {
    ek::create_ek_object_2(ctx, kind.selection(), DefaultKey)
        .map_err(|e| tss_error(&format!("CreatePrimary(EK {}, TCG template)", kind.name()), e))
}

/// The EK certificate of `kind` from its NV index (DER, without the padding some TPMs add),
/// or `None` when the TPM holds none.
pub fn ek_certificate(ctx: &mut Context, kind: EkKind) -> Option<Vec<u8>> {
    match ek::retrieve_ek_pubcert(ctx, kind.selection()) {
        Ok(c) => Some(der_prefix(&c).to_vec()),
        Err(e) => {
            tracing::debug!(error = %e, ek = kind.name(), "no EK certificate in NV");
            None
        }
    }
}

/// The first DER element of `b` (some TPMs pad their NV indices).
pub(crate) fn der_prefix(b: &[u8]) -> &[u8] {
    use der::{Decode, Reader};
    let first = der::SliceReader::new(b).ok().and_then(|mut r| {
        der::asn1::AnyRef::decode(&mut r).ok()?;
        usize::try_from(r.position()).ok()
    });
    first.and_then(|n| b.get(..n)).unwrap_or(b)
}

/// A marshalled TPM2B_PUBLIC.
pub fn public_tpm2b(p: &Public) -> Result<Vec<u8>, KeyError> {
    let t = p.marshall().map_err(|e| tss_error("marshal TPMT_PUBLIC", e))?;
    let mut out = (t.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&t);
    Ok(out)
}

/// The bytes of a TPM2B, checking its size field against the input.
pub(crate) fn unwrap_tpm2b<'a>(what: &str, b: &'a [u8]) -> Result<&'a [u8], KeyError> {
    match b {
        [hi, lo, rest @ ..] if usize::from(u16::from_be_bytes([*hi, *lo])) == rest.len() => Ok(rest),
        _ => Err(KeyError::BadInput(format!("{what} is not a TPM2B of its length"))),
    }
}

/// A policy session that satisfies the EK's authPolicy (PolicySecret(endorsement), and for
/// high-range EKs the PolicyOR with PolicyC). The caller flushes it.
fn ek_session(ctx: &mut Context, kind: EkKind) -> Result<AuthSession, KeyError> {
    let hash = kind.policy_hash();
    let s = ctx
        .start_auth_session(
            None,
            None,
            None,
            SessionType::Policy,
            SymmetricDefinition::AES_128_CFB,
            hash,
        )
        .map_err(|e| tss_error("StartAuthSession(policy)", e))?
        .ok_or_else(|| KeyError::Tpm {
            what: "StartAuthSession(policy)".into(),
            reason: "no session".into(),
        })?;
    let r = (|| {
        let ps = PolicySession::try_from(s).map_err(|e| tss_error("policy session", e))?;
        ctx.execute_with_nullauth_session(|c| {
            c.policy_secret(
                ps,
                tss_esapi::handles::AuthHandle::Endorsement,
                Default::default(),
                Default::default(),
                Default::default(),
                None,
            )
        })
        .map_err(|e| tss_error("PolicySecret(endorsement)", e))?;
        if hash == HashingAlgorithm::Sha384 {
            let mut list = DigestList::new();
            for d in [ek_policy::POLICY_A_SHA384, ek_policy::POLICY_C_SHA384] {
                let bytes = hex::decode(d).map_err(|e| KeyError::Config(format!("policy digest: {e}")))?;
                list.add(Digest::try_from(bytes).map_err(|e| tss_error("policy digest", e))?)
                    .map_err(|e| tss_error("policy digest", e))?;
            }
            ctx.execute_without_session(|c| c.policy_or(ps, list))
                .map_err(|e| tss_error("PolicyOR", e))?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        let _ = ctx.flush_context(SessionHandle::from(s).into());
        return Err(e);
    }
    Ok(s)
}

/// TPM2_ActivateCredential of a TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET made for `ak`'s
/// name with `ek`'s public key: the secret, which only this TPM can recover. The inner
/// error is the TPM refusing the credential itself (made for another EK or AK, or changed
/// on the way), with its response; the outer one is anything else (the session, the
/// device, input that is not a TPM2B).
pub fn activate(
    ctx: &mut Context,
    kind: EkKind,
    ak: KeyHandle,
    ek: KeyHandle,
    id_object: &[u8],
    encrypted_secret: &[u8],
) -> Result<Result<Vec<u8>, String>, KeyError> {
    let id = IdObject::try_from(unwrap_tpm2b("id_object", id_object)?)
        .map_err(|_| KeyError::BadInput("id_object is too long".into()))?;
    let secret = EncryptedSecret::try_from(unwrap_tpm2b("encrypted_secret", encrypted_secret)?)
        .map_err(|_| KeyError::BadInput("encrypted_secret is too long".into()))?;
    let session = ek_session(ctx, kind)?;
    let r = ctx.execute_with_sessions((Some(AuthSession::Password), Some(session), None), |c| {
        c.activate_credential(ak, ek, id, secret)
    });
    let _ = ctx.flush_context(SessionHandle::from(session).into());
    Ok(r.map(|d| d.value().to_vec())
        .map_err(|e| e.to_string().replace('\n', " ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_prefix_and_tpm2b() {
        let mut b = vec![0x30, 0x03, 1, 2, 3];
        b.extend_from_slice(&[0xff; 10]);
        assert_eq!(der_prefix(&b), &[0x30, 0x03, 1, 2, 3]);
        let mut long = vec![0x30, 0x82, 0x01, 0x00];
        long.extend(vec![0u8; 0x100 + 5]);
        assert_eq!(der_prefix(&long).len(), 4 + 0x100);
        assert_eq!(der_prefix(&[0x30]), &[0x30]);
        assert!(unwrap_tpm2b("x", &[0, 2, 1]).is_err());
        assert!(unwrap_tpm2b("x", &[0, 1, 9, 9]).is_err());
        assert!(unwrap_tpm2b("x", &[0]).is_err());
        assert_eq!(unwrap_tpm2b("x", &[0, 1, 9]).unwrap(), &[9]);
    }
}
