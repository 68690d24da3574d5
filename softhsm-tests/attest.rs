//! Attestation building blocks against a real (software) TPM: keygate's MakeCredential must
//! be activated by swtpm through stock tpm2-tools, for RSA and ECC EKs; the names and public
//! areas keygate parses are the ones tpm2-tools wrote.

use std::process::Command;

use std::collections::BTreeMap;

use keygate::attest::{Attributes, QuoteError, TpmPublic, make_credential, verify_quote};

use crate::common::swtpm::Swtpm;
use crate::common::tpm2tools::{activate_with, create_ak, ok, quote, tool};

fn credential_activates_on_a_real_tpm(ek_type: &str) {
    let tpm = Swtpm::start();
    let tcti = tpm.tcti();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(tool(
        &tcti,
        d,
        &[
            "tpm2_createek",
            "-c",
            "ek.ctx",
            "-G",
            ek_type,
            "-u",
            "ek.pub",
            "-f",
            "tss",
        ],
    ));
    create_ak(&tcti, d, "ak");
    let ek = TpmPublic::from_tpm2b(&std::fs::read(d.join("ek.pub")).unwrap(), "ek_pub").unwrap();
    let ak = TpmPublic::from_tpm2b(&std::fs::read(d.join("ak.pub")).unwrap(), "ak_pub").unwrap();
    assert_eq!(
        ak.name(),
        std::fs::read(d.join("ak.name")).unwrap(),
        "AK name as the TPM computes it"
    );
    assert!(
        ek.attributes
            .has(Attributes::RESTRICTED | Attributes::DECRYPT | Attributes::FIXED_TPM)
    );
    assert!(ak.attributes.has(
        Attributes::RESTRICTED
            | Attributes::SIGN
            | Attributes::FIXED_TPM
            | Attributes::FIXED_PARENT
            | Attributes::SENSITIVE_DATA_ORIGIN
    ));
    // The EK hash is SHA-256 of the DER SubjectPublicKeyInfo, as openssl writes it.
    std::fs::write(d.join("ek.der"), ek.spki_der()).unwrap();
    let pem = Command::new("openssl")
        .args([
            "pkey", "-pubin", "-inform", "DER", "-in", "ek.der", "-outform", "DER",
        ])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(
        pem.status.success(),
        "openssl refused the SPKI: {}",
        String::from_utf8_lossy(&pem.stderr)
    );
    assert_eq!(pem.stdout, ek.spki_der(), "the SPKI is canonical DER");

    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).unwrap();
    let cred = make_credential(&ek, &ak.name(), &secret).unwrap();
    assert_eq!(
        activate_with(&tcti, d, &cred.tpm2_tools_file(), ek_type).as_deref(),
        Some(&secret[..])
    );
    // Bound to the AK's name: a credential made for another name does not activate.
    let mut other = ak.name();
    other[5] ^= 1;
    let wrong = make_credential(&ek, &other, &secret).unwrap();
    assert_eq!(activate_with(&tcti, d, &wrong.tpm2_tools_file(), ek_type), None);
    // A changed byte of the encrypted seed does not activate either.
    let mut tampered = cred.clone();
    let n = tampered.encrypted_secret.len();
    tampered.encrypted_secret[n - 3] ^= 1;
    assert_ne!(
        activate_with(&tcti, d, &tampered.tpm2_tools_file(), ek_type).as_deref(),
        Some(&secret[..])
    );

    // A quote over PCRs 0-7 for a nonce verifies with the AK, the nonce and the PCR values.
    let nonce = [0x5au8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
    let sel = "sha256:0,1,2,3,4,5,6,7";
    let (msg, sig, _) = quote(&tcti, d, "ak", &nonce, sel);
    // The values come from tpm2_pcrread, independently of the quote.
    ok(tool(&tcti, d, &["tpm2_pcrread", sel, "-o", "pcrs.bin"]));
    let raw = std::fs::read(d.join("pcrs.bin")).unwrap();
    assert_eq!(raw.len(), 8 * 32);
    let values: BTreeMap<u32, Vec<u8>> = raw
        .chunks(32)
        .enumerate()
        .map(|(i, c)| (i as u32, c.to_vec()))
        .collect();
    let pcrs: Vec<u32> = (0..8).collect();
    let sha256 = keygate::attest::alg::SHA256;
    verify_quote(&ak, &msg, &sig, &nonce, (sha256, &pcrs), &values).unwrap();
    let mut other_nonce = nonce;
    other_nonce[0] ^= 1;
    assert_eq!(
        verify_quote(&ak, &msg, &sig, &other_nonce, (sha256, &pcrs), &values),
        Err(QuoteError::Nonce)
    );
    let mut bad_values = values.clone();
    bad_values.get_mut(&7).unwrap()[0] ^= 1;
    assert_eq!(
        verify_quote(&ak, &msg, &sig, &nonce, (sha256, &pcrs), &bad_values),
        Err(QuoteError::PcrDigest)
    );
    let nine: Vec<u32> = (0..9).collect();
    assert!(matches!(
        verify_quote(&ak, &msg, &sig, &nonce, (sha256, &nine), &values),
        Err(QuoteError::Selection { .. })
    ));
    let mut flipped = msg.clone();
    flipped[20] ^= 1;
    assert_eq!(
        verify_quote(&ak, &flipped, &sig, &nonce, (sha256, &pcrs), &values),
        Err(QuoteError::BadSignature)
    );
    // Signed by another AK of the same TPM: refused.
    create_ak(&tcti, d, "ak2");
    let ak2 = TpmPublic::from_tpm2b(&std::fs::read(d.join("ak2.pub")).unwrap(), "ak_pub").unwrap();
    assert_eq!(
        verify_quote(&ak2, &msg, &sig, &nonce, (sha256, &pcrs), &values),
        Err(QuoteError::BadSignature)
    );
    // Truncated structures are errors, never panics.
    for n in 0..msg.len() {
        assert!(verify_quote(&ak, &msg[..n], &sig, &nonce, (sha256, &pcrs), &values).is_err());
    }
    for n in 0..sig.len() {
        assert!(verify_quote(&ak, &msg, &sig[..n], &nonce, (sha256, &pcrs), &values).is_err());
    }
    drop(tpm);
}

#[test]
fn make_credential_for_an_rsa_ek_is_activated_by_swtpm() {
    credential_activates_on_a_real_tpm("rsa");
}

#[test]
fn make_credential_for_an_ecc_p256_ek_is_activated_by_swtpm() {
    credential_activates_on_a_real_tpm("ecc");
}

/// The TCG high-range P-384 EK: SHA-384 names, AES-256, a SHA-384 seed by ECDH and KDFe.
#[test]
fn make_credential_for_an_ecc_p384_ek_is_activated_by_swtpm() {
    credential_activates_on_a_real_tpm("ecc384");
}
