//! Attestation building blocks against a real (software) TPM: keygate's MakeCredential must
//! be activated by swtpm through stock tpm2-tools, for RSA and ECC EKs; the names and public
//! areas keygate parses are the ones tpm2-tools wrote.

use std::path::Path;
use std::process::{Command, Output};

use std::collections::BTreeMap;

use keygate::attest::{Attributes, QuoteError, TpmPublic, make_credential, verify_quote};

use crate::common::swtpm::Swtpm;

fn tool(tcti: &str, dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .env("TPM2TOOLS_TCTI", tcti)
        .output()
        .unwrap();
    // swtpm has no resource manager: flush transient objects and sessions after each step.
    let _ = Command::new("tpm2_flushcontext")
        .arg("-t")
        .env("TPM2TOOLS_TCTI", tcti)
        .output();
    out
}

fn ok(out: Output) -> Output {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Runs `tpm2_activatecredential` on `blob` with the EK policy session; the recovered secret.
fn activate(tcti: &str, dir: &Path, blob: &[u8]) -> Option<Vec<u8>> {
    std::fs::write(dir.join("cred.blob"), blob).unwrap();
    let _ = std::fs::remove_file(dir.join("secret.out"));
    ok(tool(
        tcti,
        dir,
        &["tpm2_startauthsession", "--policy-session", "-S", "s.ctx"],
    ));
    ok(Command::new("tpm2_policysecret")
        .args(["-S", "s.ctx", "-c", "e"])
        .current_dir(dir)
        .env("TPM2TOOLS_TCTI", tcti)
        .output()
        .unwrap());
    let out = Command::new("tpm2_activatecredential")
        .args([
            "-c",
            "ak.ctx",
            "-C",
            "ek.ctx",
            "-i",
            "cred.blob",
            "-o",
            "secret.out",
            "-P",
            "session:s.ctx",
        ])
        .current_dir(dir)
        .env("TPM2TOOLS_TCTI", tcti)
        .output()
        .unwrap();
    let _ = tool(tcti, dir, &["tpm2_flushcontext", "s.ctx"]);
    out.status
        .success()
        .then(|| std::fs::read(dir.join("secret.out")).unwrap())
}

/// `tpm2_createak` under the EK: an ECDSA P-256 AK in `<stem>.ctx`, `.pub` (TPM2B_PUBLIC),
/// `.name` and `.priv`.
fn create_ak(tcti: &str, dir: &Path, stem: &str) {
    let f = |ext: &str| format!("{stem}.{ext}");
    let (ctx, public, name, private) = (f("ctx"), f("pub"), f("name"), f("priv"));
    ok(tool(
        tcti,
        dir,
        &[
            "tpm2_createak",
            "-C",
            "ek.ctx",
            "-c",
            &ctx,
            "-G",
            "ecc",
            "-g",
            "sha256",
            "-s",
            "ecdsa",
            "-u",
            &public,
            "-n",
            &name,
            "-r",
            &private,
        ],
    ));
}

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
        activate(&tcti, d, &cred.tpm2_tools_file()).as_deref(),
        Some(&secret[..])
    );
    // Bound to the AK's name: a credential made for another name does not activate.
    let mut other = ak.name();
    other[5] ^= 1;
    let wrong = make_credential(&ek, &other, &secret).unwrap();
    assert_eq!(activate(&tcti, d, &wrong.tpm2_tools_file()), None);
    // A changed byte of the encrypted seed does not activate either.
    let mut tampered = cred.clone();
    let n = tampered.encrypted_secret.len();
    tampered.encrypted_secret[n - 3] ^= 1;
    assert_ne!(
        activate(&tcti, d, &tampered.tpm2_tools_file()).as_deref(),
        Some(&secret[..])
    );

    // A quote over PCRs 0-7 for a nonce verifies with the AK, the nonce and the PCR values.
    let nonce = [0x5au8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
    let nonce_hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    let sel = "sha256:0,1,2,3,4,5,6,7";
    ok(tool(
        &tcti,
        d,
        &[
            "tpm2_quote",
            "-c",
            "ak.ctx",
            "-l",
            sel,
            "-q",
            &nonce_hex,
            "-m",
            "quote.msg",
            "-s",
            "quote.sig",
            "-o",
            "quote.pcrs",
            "-g",
            "sha256",
        ],
    ));
    ok(tool(&tcti, d, &["tpm2_pcrread", sel, "-o", "pcrs.bin"]));
    let raw = std::fs::read(d.join("pcrs.bin")).unwrap();
    assert_eq!(raw.len(), 8 * 32);
    let values: BTreeMap<u32, Vec<u8>> = raw
        .chunks(32)
        .enumerate()
        .map(|(i, c)| (i as u32, c.to_vec()))
        .collect();
    let (msg, sig) = (
        std::fs::read(d.join("quote.msg")).unwrap(),
        std::fs::read(d.join("quote.sig")).unwrap(),
    );
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
