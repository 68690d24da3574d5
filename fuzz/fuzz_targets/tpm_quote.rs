//! TPM2_Quote verification (`keygate::attest::verify_quote`): the `TPMT_SIGNATURE` and
//! `TPMS_ATTEST` parsers and the nonce, PCR selection and PCR digest checks.
//!
//! Input layout: a big-endian u16 `L`, then `L` bytes of AK `TPM2B_PUBLIC`, then the rest.
//! - When the AK parses, the rest is split in half into `attest` and `signature`, and the
//!   quote is verified with that AK (reaches the signature parser; the quote parser only
//!   behind a valid signature, which a fuzzer cannot make).
//! - Otherwise the whole rest is the `attest`, and this target signs it with a fixed ECC
//!   P-256 AK of its own, so the quote parser and every check after the signature are
//!   reached. `verify_quote` checks the signature first and the quote parser is private, so
//!   this is the only public way to fuzz it.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use keygate::attest::{Attributes, TpmPublic, alg, verify_quote};
use libfuzzer_sys::fuzz_target;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};

const NONCE: &[u8] = b"nonce";
/// The PCR selection the server expects: SHA-256 bank, PCRs 0 to 3.
const PCRS: [u32; 4] = [0, 1, 2, 3];
const AK_SECRET: [u8; 32] = [0x22; 32];
/// TPM_ECC_NIST_P256.
const CURVE_P256: u16 = 0x0003;

struct Fixture {
    signer: SigningKey,
    ak: TpmPublic,
    /// The reported PCR values: 32 zero bytes for each expected PCR.
    values: BTreeMap<u32, Vec<u8>>,
}

/// The `TPMT_PUBLIC` of a restricted ECDSA P-256/SHA-256 signing key (an AK).
fn ak_tpmt(x: &[u8], y: &[u8]) -> Vec<u8> {
    let attributes = Attributes::FIXED_TPM
        | Attributes::FIXED_PARENT
        | Attributes::SENSITIVE_DATA_ORIGIN
        | Attributes::USER_WITH_AUTH
        | Attributes::RESTRICTED
        | Attributes::SIGN;
    let mut v = Vec::new();
    v.extend_from_slice(&alg::ECC.to_be_bytes());
    v.extend_from_slice(&alg::SHA256.to_be_bytes()); // nameAlg
    v.extend_from_slice(&attributes.to_be_bytes());
    v.extend_from_slice(&0u16.to_be_bytes()); // empty authPolicy
    v.extend_from_slice(&alg::NULL.to_be_bytes()); // symmetric
    v.extend_from_slice(&alg::ECDSA.to_be_bytes()); // scheme
    v.extend_from_slice(&alg::SHA256.to_be_bytes()); // scheme hash
    v.extend_from_slice(&CURVE_P256.to_be_bytes());
    v.extend_from_slice(&alg::NULL.to_be_bytes()); // kdf
    for coordinate in [x, y] {
        v.extend_from_slice(&(coordinate.len() as u16).to_be_bytes());
        v.extend_from_slice(coordinate);
    }
    v
}

fn build() -> Result<Fixture, String> {
    let secret = p256::SecretKey::from_slice(&AK_SECRET).map_err(|e| e.to_string())?;
    let point = secret.public_key().to_sec1_bytes();
    if point.len() != 65 {
        return Err(format!("SEC1 point of {} bytes", point.len()));
    }
    let ak = TpmPublic::from_tpmt(&ak_tpmt(&point[1..33], &point[33..65]), "ak_pub")
        .map_err(|e| e.to_string())?;
    Ok(Fixture {
        signer: SigningKey::from(&secret),
        ak,
        values: PCRS.iter().map(|i| (*i, vec![0u8; 32])).collect(),
    })
}

fn fixture() -> Option<&'static Fixture> {
    static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            build()
                .map_err(|e| eprintln!("tpm_quote: fixture failed, self-signed quotes are not fuzzed: {e}"))
                .ok()
        })
        .as_ref()
}

/// A `TPMT_SIGNATURE` (TPM_ALG_ECDSA, SHA-256) by `signer` over `message`.
fn tpmt_signature(signer: &SigningKey, message: &[u8]) -> Vec<u8> {
    let sig: Signature = signer.sign(message);
    let (r, s) = sig.split_bytes();
    let mut v = Vec::with_capacity(4 + 2 * 34);
    v.extend_from_slice(&alg::ECDSA.to_be_bytes());
    v.extend_from_slice(&alg::SHA256.to_be_bytes());
    for part in [&r[..], &s[..]] {
        v.extend_from_slice(&(part.len() as u16).to_be_bytes());
        v.extend_from_slice(part);
    }
    v
}

fuzz_target!(|data: &[u8]| {
    let [hi, lo, tail @ ..] = data else {
        return;
    };
    let ak_len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
    let (ak_bytes, rest) = tail.split_at(ak_len);
    let fixture = fixture();
    let no_values = BTreeMap::new();
    let values = fixture.map_or(&no_values, |f| &f.values);
    match TpmPublic::from_tpm2b(ak_bytes, "ak_pub") {
        Ok(ak) => {
            let (attest, signature) = rest.split_at(rest.len() / 2);
            let _ = verify_quote(&ak, attest, signature, NONCE, (alg::SHA256, &PCRS[..]), values);
        }
        Err(_) => {
            if let Some(f) = fixture {
                let signature = tpmt_signature(&f.signer, rest);
                let _ = verify_quote(&f.ak, rest, &signature, NONCE, (alg::SHA256, &PCRS[..]), values);
            }
        }
    }
});
