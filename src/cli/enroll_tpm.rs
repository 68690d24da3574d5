//! The TPM half of `keygate enroll`, with tss-esapi: the EK from the TCG template (so it is
//! the key its certificate names) and that certificate from NV, an AK under it,
//! ActivateCredential with the EK's policy session, and a quote. One `Context`, used on the
//! calling (blocking) thread only: it is not `Send`.

use std::str::FromStr;

use anyhow::{Context as _, anyhow, bail};
use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, DefaultKey, ak, ek, pcr};
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{KeyHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, Digest, DigestList, EncryptedSecret, IdObject, PcrSelectionListBuilder, PcrSlot, Public,
    SignatureScheme, SymmetricDefinition,
};
use tss_esapi::traits::Marshall;
use tss_esapi::{Context, TctiNameConf};

use crate::attest::ek_policy::{POLICY_A_SHA384, POLICY_C_SHA384};
use crate::attest::{Reader, tpm2b};

/// Which EK (TCG EK Credential Profile template).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EkKind {
    /// RSA-2048 (template L-1; certificate at NV 0x01c00002).
    Rsa2048,
    /// ECC NIST P-256 (template L-2; certificate at NV 0x01c0000a).
    P256,
    /// ECC NIST P-384 (template H-3; certificate at NV 0x01c00016).
    P384,
}

impl EkKind {
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
}

/// A TPM with the EK and a loaded AK.
pub struct Tpm {
    ctx: Context,
    kind: EkKind,
    ek: KeyHandle,
    ak: KeyHandle,
    /// TPM2B_PUBLIC of the EK and of the AK; TPM2B_PRIVATE of the AK.
    pub ek_pub: Vec<u8>,
    pub ak_pub: Vec<u8>,
    pub ak_priv: Vec<u8>,
    /// DER, when the TPM holds one for this EK.
    pub ek_certificate: Option<Vec<u8>>,
}

/// The bytes of a TPM2B from the server, without its size, checking the size.
fn unwrap_tpm2b<'a>(what: &'static str, b: &'a [u8]) -> anyhow::Result<&'a [u8]> {
    let mut r = Reader::new(b, what);
    let v = r.tpm2b(b.len()).map_err(|e| anyhow!("the server's {e}"))?;
    r.done().map_err(|e| anyhow!("the server's {e}"))?;
    Ok(v)
}

/// The first DER element of `b` (some TPMs pad their NV indices).
fn der_prefix(b: &[u8]) -> &[u8] {
    crate::x509::first_tlv(b).unwrap_or(b)
}

fn public_tpm2b(p: &Public) -> anyhow::Result<Vec<u8>> {
    Ok(tpm2b(&p.marshall().context("cannot marshal a public area")?))
}

impl Tpm {
    /// Opens the TPM at `tcti`, creates the EK of `kind` and an ECDSA P-256 AK under it,
    /// and reads the EK certificate if there is one.
    pub fn open(tcti: &str, kind: EkKind) -> anyhow::Result<Tpm> {
        let conf = TctiNameConf::from_str(tcti).map_err(|e| {
            anyhow!("{tcti:?} is not a TCTI like device:/dev/tpmrm0 or swtpm:host=H,port=P ({e})")
        })?;
        let mut ctx = Context::new(conf)
            .map_err(|e| anyhow!("cannot open the TPM at {tcti}: is it there and reachable? ({e})"))?;
        let ek = ek::create_ek_object_2(&mut ctx, kind.selection(), DefaultKey)
            .map_err(|e| anyhow!("cannot create the EK from the TCG template: {e}"))?;
        let ek_certificate = match ek::retrieve_ek_pubcert(&mut ctx, kind.selection()) {
            Ok(c) => Some(der_prefix(&c).to_vec()),
            Err(e) => {
                tracing::info!(error = %e, "no EK certificate in NV for this EK");
                None
            }
        };
        let (ek_public, _, _) = ctx.read_public(ek).context("cannot read the EK")?;
        let created = ak::create_ak(
            &mut ctx,
            ek,
            HashingAlgorithm::Sha256,
            SignatureSchemeAlgorithm::EcDsa,
            None,
            DefaultKey,
        )
        .map_err(|e| anyhow!("cannot create the AK under the EK: {e}"))?;
        let ak = ak::load_ak(
            &mut ctx,
            ek,
            None,
            created.out_private.clone(),
            created.out_public.clone(),
        )
        .map_err(|e| anyhow!("cannot load the AK: {e}"))?;
        Ok(Tpm {
            ek_pub: public_tpm2b(&ek_public)?,
            ak_pub: public_tpm2b(&created.out_public)?,
            ak_priv: tpm2b(created.out_private.value()),
            ek_certificate,
            ctx,
            kind,
            ek,
            ak,
        })
    }

    /// A policy session that satisfies the EK's authPolicy (PolicySecret(endorsement), and
    /// for high-range EKs the PolicyOR with PolicyC).
    fn ek_session(&mut self) -> anyhow::Result<AuthSession> {
        let hash = self.kind.policy_hash();
        let s = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                hash,
            )
            .context("cannot start a policy session")?
            .ok_or_else(|| anyhow!("the TPM started no policy session"))?;
        let ps = PolicySession::try_from(s).context("policy session")?;
        self.ctx
            .execute_with_nullauth_session(|c| {
                c.policy_secret(
                    ps,
                    tss_esapi::handles::AuthHandle::Endorsement,
                    Default::default(),
                    Default::default(),
                    Default::default(),
                    None,
                )
            })
            .context("PolicySecret(endorsement) failed")?;
        if hash == HashingAlgorithm::Sha384 {
            let mut list = DigestList::new();
            for d in [POLICY_A_SHA384, POLICY_C_SHA384] {
                let bytes = hex::decode(d).context("policy digest")?;
                list.add(Digest::try_from(bytes).context("policy digest")?)
                    .context("policy digest")?;
            }
            self.ctx
                .execute_without_session(|c| c.policy_or(ps, list))
                .context("PolicyOR failed")?;
        }
        Ok(s)
    }

    /// TPM2_ActivateCredential of the server's TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET.
    pub fn activate(&mut self, id_object: &[u8], encrypted_secret: &[u8]) -> anyhow::Result<Vec<u8>> {
        let id = IdObject::try_from(unwrap_tpm2b("id_object", id_object)?).context("id_object")?;
        let secret = EncryptedSecret::try_from(unwrap_tpm2b("encrypted_secret", encrypted_secret)?)
            .context("encrypted_secret")?;
        let session = self.ek_session()?;
        let (ak, ek) = (self.ak, self.ek);
        let r = self
            .ctx
            .execute_with_sessions((Some(AuthSession::Password), Some(session), None), |c| {
                c.activate_credential(ak, ek, id, secret)
            });
        let _ = self.ctx.flush_context(SessionHandle::from(session).into());
        let digest = r.map_err(|e| anyhow!("the TPM refused to activate the credential: {e}"))?;
        Ok(digest.value().to_vec())
    }

    /// A quote by the AK over `selection` (`sha256:0,1,2`) for `nonce`, and the PCR values
    /// it covers: (TPMS_ATTEST, TPMT_SIGNATURE, (index, value) in index order). The values
    /// are read before the quote, and read and quoted again if a PCR changed in between.
    #[allow(clippy::type_complexity)]
    pub fn quote(
        &mut self,
        selection: &str,
        nonce: &[u8],
    ) -> anyhow::Result<(Vec<u8>, Vec<u8>, Vec<(u32, Vec<u8>)>)> {
        let (bank, list) = selection
            .split_once(':')
            .ok_or_else(|| anyhow!("the server's pcr_selection {selection:?} is not like sha256:0,1"))?;
        let alg = match bank {
            "sha1" => HashingAlgorithm::Sha1,
            "sha256" => HashingAlgorithm::Sha256,
            "sha384" => HashingAlgorithm::Sha384,
            other => bail!("the server asks for the PCR bank {other:?}"),
        };
        let mut indices = Vec::new();
        for i in list.split(',') {
            let i: u32 = i
                .trim()
                .parse()
                .ok()
                .filter(|i| *i < 24)
                .ok_or_else(|| anyhow!("the server's pcr_selection has index {i:?}"))?;
            indices.push(i);
        }
        // The TPM reports and digests PCRs in index order: values pair with sorted indices.
        indices.sort_unstable();
        indices.dedup();
        let slots = indices
            .iter()
            .map(|i| PcrSlot::try_from(1u32 << i).context("PCR slot"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let sel = PcrSelectionListBuilder::new()
            .with_selection(alg, &slots)
            .build()
            .context("PCR selection")?;
        let nonce = Data::try_from(nonce.to_vec())
            .map_err(|_| anyhow!("the server's nonce is longer than 64 bytes"))?;
        let ak = self.ak;
        for _ in 0..3 {
            let data = pcr::read_all(&mut self.ctx, sel.clone()).context("cannot read the PCRs")?;
            let values_bank = data
                .pcr_bank(alg)
                .ok_or_else(|| anyhow!("the TPM has no {bank} PCR bank"))?;
            let mut values = Vec::new();
            for (&i, slot) in indices.iter().zip(slots.iter()) {
                let d = values_bank
                    .get_digest(*slot)
                    .ok_or_else(|| anyhow!("the TPM did not return PCR {i}"))?;
                values.push((i, d.value().to_vec()));
            }
            let (attest, sig) = self
                .ctx
                .execute_with_session(Some(AuthSession::Password), |c| {
                    c.quote(ak, nonce.clone(), SignatureScheme::Null, sel.clone())
                })
                .map_err(|e| anyhow!("the TPM refused the quote: {e}"))?;
            let attest = attest.marshall().context("cannot marshal the quote")?;
            let sig = sig.marshall().context("cannot marshal the signature")?;
            // The quote's PCR digest is the last TPM2B of TPMS_ATTEST (a SHA-256 of the
            // values, the AK's scheme hash): compare it to catch a PCR extended meanwhile.
            let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
            values.iter().for_each(|(_, v)| ctx.update(v));
            if attest.ends_with(ctx.finish().as_ref()) {
                return Ok((attest, sig, values));
            }
        }
        bail!("the PCRs kept changing while quoting")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_prefix_drops_padding() {
        let mut b = vec![0x30, 0x03, 1, 2, 3];
        b.extend_from_slice(&[0xff; 10]);
        assert_eq!(der_prefix(&b), &[0x30, 0x03, 1, 2, 3]);
        let mut long = vec![0x30, 0x82, 0x01, 0x00];
        long.extend(vec![0u8; 0x100 + 5]);
        assert_eq!(der_prefix(&long).len(), 4 + 0x100);
        assert_eq!(der_prefix(&[0x30]), &[0x30]);
        assert!(unwrap_tpm2b("x", &[0, 2, 1]).is_err());
        assert!(unwrap_tpm2b("x", &[0, 1, 9, 9]).is_err());
        assert_eq!(unwrap_tpm2b("x", &[0, 1, 9]).unwrap(), &[9]);
    }
}
