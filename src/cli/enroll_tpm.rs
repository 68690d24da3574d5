//! The TPM half of `keygate enroll`, with tss-esapi: the EK from the TCG template (so it is
//! the key its certificate names) and that certificate from NV, an AK under it,
//! ActivateCredential with the EK's policy session, and a quote. One `Context`, used on the
//! calling (blocking) thread only: it is not `Send`.

use std::str::FromStr;

use anyhow::{Context as _, anyhow, bail};
use tss_esapi::abstraction::{DefaultKey, ak, pcr};
use tss_esapi::handles::KeyHandle;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{Data, PcrSelectionListBuilder, PcrSlot, SignatureScheme};
use tss_esapi::traits::Marshall;
use tss_esapi::{Context, TctiNameConf};

use crate::attest::tpm2b;
pub use crate::keys::tpm::EkKind;
use crate::keys::tpm::ek;

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

impl Tpm {
    /// Opens the TPM at `tcti`, creates the EK of `kind` and an ECDSA P-256 AK under it,
    /// and reads the EK certificate if there is one.
    pub fn open(tcti: &str, kind: EkKind) -> anyhow::Result<Tpm> {
        let conf = TctiNameConf::from_str(tcti).map_err(|e| {
            anyhow!("{tcti:?} is not a TCTI like device:/dev/tpmrm0 or swtpm:host=H,port=P ({e})")
        })?;
        let mut ctx = Context::new(conf)
            .map_err(|e| anyhow!("cannot open the TPM at {tcti}: is it there and reachable? ({e})"))?;
        let ek = ek::create_ek(&mut ctx, kind)
            .map_err(|e| anyhow!("cannot create the EK from the TCG template: {e}"))?;
        let ek_certificate = ek::ek_certificate(&mut ctx, kind);
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
            ek_pub: ek::public_tpm2b(&ek_public)?,
            ak_pub: ek::public_tpm2b(&created.out_public)?,
            ak_priv: tpm2b(created.out_private.value()),
            ek_certificate,
            ctx,
            kind,
            ek,
            ak,
        })
    }

    /// TPM2_ActivateCredential of the server's TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET.
    pub fn activate(&mut self, id_object: &[u8], encrypted_secret: &[u8]) -> anyhow::Result<Vec<u8>> {
        ek::activate(
            &mut self.ctx,
            self.kind,
            self.ak,
            self.ek,
            id_object,
            encrypted_secret,
        )
        .map_err(|e| match e {
            crate::keys::KeyError::BadInput(why) => anyhow!("the server's {why}"),
            e => anyhow!("cannot activate the credential: {e}"),
        })?
        .map_err(|why| anyhow!("the TPM refused to activate the credential: {why}"))
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
