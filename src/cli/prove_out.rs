//! `keygate keys prove --out DIR`: a proven key's evidence in the formats of stock tools,
//! so that it can be re-checked without keygate (docs/key-proofs.md lists the commands).

use std::path::Path;

use anyhow::{Context, anyhow};

use super::prove::Answer;
use crate::attest::keyproof::{Checked, Evidence};

/// TPMT_SIGNATURE (ECDSA) to the DER ECDSA-Sig-Value openssl verifies.
fn ecdsa_der(sig: &[u8]) -> anyhow::Result<Vec<u8>> {
    let take = |b: &[u8], at: usize| -> anyhow::Result<(Vec<u8>, usize)> {
        let n = usize::from(u16::from_be_bytes(
            b.get(at..at + 2)
                .ok_or_else(|| anyhow!("short signature"))?
                .try_into()?,
        ));
        Ok((
            b.get(at + 2..at + 2 + n)
                .ok_or_else(|| anyhow!("short signature"))?
                .to_vec(),
            at + 2 + n,
        ))
    };
    anyhow::ensure!(
        sig.get(..2) == Some(&[0x00, 0x18][..]),
        "the AK's signature is not ECDSA"
    );
    let (r, at) = take(sig, 4)?;
    let (s, _) = take(sig, at)?;
    let pad = |v: &[u8]| {
        let mut out = [0u8; 32];
        out[32 - v.len().min(32)..].copy_from_slice(&v[v.len().saturating_sub(32)..]);
        out
    };
    let sig =
        p256::ecdsa::Signature::from_scalars(pad(&r), pad(&s)).map_err(|_| anyhow!("bad ECDSA signature"))?;
    Ok(sig.to_der().as_bytes().to_vec())
}

fn pem(label: &str, der: &[u8]) -> anyhow::Result<String> {
    der::pem::encode_string(label, der::pem::LineEnding::LF, der).map_err(|e| anyhow!("PEM: {e}"))
}

/// Writes the evidence of one proven key into `dir`.
pub(super) fn write(dir: &Path, e: &Evidence<'_>, checked: &Checked, a: &Answer) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("ek.crt", e.ek_certificate.unwrap_or_default().to_vec()),
        ("ek.pub", e.ek_public.to_vec()),
        ("ak.pub", e.ak_public.to_vec()),
        ("key.pub", e.key_public.to_vec()),
        ("ak.pem", pem("PUBLIC KEY", &checked.ak.spki_der())?.into_bytes()),
        (
            "key.pem",
            pem("PUBLIC KEY", &checked.key.spki_der())?.into_bytes(),
        ),
        (
            "key.name",
            format!("{}\n", hex::encode(checked.key.name())).into_bytes(),
        ),
        ("nonce.bin", a.nonce.clone()),
        ("certify.attest", a.attest.clone()),
        ("certify.sig", a.signature.clone()),
    ];
    let mut files = files;
    // openssl's form of the signature, for keygate's P-256 AK (another server's AK may be
    // RSA or P-384: certify.sig, the TPM's own form, is written either way).
    if matches!(&checked.ak.key, crate::attest::KeyKind::Ecc { x, .. } if x.len() == 32) {
        files.push(("certify.sig.der", ecdsa_der(&a.signature)?));
    }
    for (name, bytes) in files {
        let path = dir.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpmt_signature_to_der() {
        let mut sig = vec![0x00, 0x18, 0x00, 0x0b, 0x00, 0x20];
        sig.extend([0x11; 32]);
        sig.extend([0x00, 0x1f]);
        sig.extend([0x22; 31]);
        let der = ecdsa_der(&sig).unwrap();
        let back = p256::ecdsa::Signature::from_der(&der).unwrap();
        assert_eq!(back.r().to_bytes().as_slice(), &[0x11; 32]);
        assert_eq!(&back.s().to_bytes()[1..], &[0x22; 31]);
        assert!(ecdsa_der(&[0x00, 0x14, 0, 0]).is_err());
        assert!(ecdsa_der(&[0x00, 0x18, 0x00, 0x0b, 0x00, 0x20, 1]).is_err());
    }
}
