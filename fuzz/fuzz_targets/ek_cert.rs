//! EK certificate checks (`keygate::attest::EkCaBundle::verify`): the DER certificate
//! parser, the key match against the EK, the validity dates, the issuer lookup and the
//! signature algorithm selection.
//!
//! The input is the DER certificate. The EK is fixed: the ECC P-256 EK public area of the
//! unit tests of `src/attest/public.rs` (`ecc_ek_tpmt(&[1; 32], &[2; 32])`), so a
//! certificate whose SubjectPublicKeyInfo holds the point `04 || 01*32 || 02*32` matches it
//! (the seed `corpus/ek_cert/ek_cert.der` does). Two bundles are tried: an empty one, and
//! one trusting a hand-made self-issued "CN=Maker CA" P-256 certificate (the RFC 7515 A.3
//! key; its own signature is junk, which a trust anchor does not need), so a certificate
//! issued by "CN=Maker CA" reaches the signature check.
#![no_main]

use std::sync::OnceLock;

use keygate::attest::{EkCaBundle, TpmPublic};
use libfuzzer_sys::fuzz_target;
use x509_cert::Certificate;
use x509_cert::der::Decode;

const NOW: i64 = 1_800_000_000;

/// TPM2B_PUBLIC: ECC, nameAlg SHA-256, attributes 0x000300b2, authPolicy 0x11*32,
/// AES-128-CFB, scheme NULL, NIST P-256, kdf NULL, x = 0x01*32, y = 0x02*32.
const EK_TPM2B_HEX: &str = concat!(
    "007a",
    "0023000b000300b2",
    "0020",
    "1111111111111111111111111111111111111111111111111111111111111111",
    "0006008000430010",
    "00030010",
    "0020",
    "0101010101010101010101010101010101010101010101010101010101010101",
    "0020",
    "0202020202020202020202020202020202020202020202020202020202020202",
);

/// DER certificate: v3, serial 1, ecdsa-with-SHA256, issuer = subject = CN=Maker CA,
/// valid 2023-01-01 to 2033-01-01, P-256 key of RFC 7515 A.3, no extensions, junk signature.
const MAKER_CA_HEX: &str = concat!(
    "3081d33081b9a003020102020101300a06082a8648ce3d04030230133111300f",
    "06035504030c084d616b6572204341301e170d3233303130313030303030305a",
    "170d3333303130313030303030305a30133111300f06035504030c084d616b65",
    "722043413059301306072a8648ce3d020106082a8648ce3d030107034200047f",
    "cdce2770f6c45d4183cbee6fdb4b7b580733357be9ef13bacf6e3c7bd15445c7",
    "f144cd1bbd9b7e872cdfedb9eeb9f4b3695d6ea90b24ad8a4623288588e5ad30",
    "0a06082a8648ce3d0403020309003006020101020101",
);

fn unhex(s: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| char::from(c).to_digit(16);
    s.as_bytes()
        .chunks(2)
        .map(|p| match p {
            [h, l] => Some((digit(*h)? * 16 + digit(*l)?) as u8),
            _ => None,
        })
        .collect()
}

struct Fixture {
    ek: TpmPublic,
    empty: EkCaBundle,
    /// `None` (with a message) if the hand-made CA certificate does not parse.
    maker: Option<EkCaBundle>,
}

fn maker_bundle() -> Result<EkCaBundle, String> {
    let der = unhex(MAKER_CA_HEX).ok_or("CA hex")?;
    let ca = Certificate::from_der(&der).map_err(|e| e.to_string())?;
    let bundle = EkCaBundle::from_certificates(vec![ca]);
    if bundle.is_empty() {
        return Err("the bundle refused it".into());
    }
    Ok(bundle)
}

fn build() -> Result<Fixture, String> {
    let ek_bytes = unhex(EK_TPM2B_HEX).ok_or("EK hex")?;
    let ek = TpmPublic::from_tpm2b(&ek_bytes, "ek_pub").map_err(|e| e.to_string())?;
    let maker = maker_bundle()
        .map_err(|e| eprintln!("ek_cert: Maker CA not loaded, only the empty bundle is used: {e}"))
        .ok();
    Ok(Fixture {
        ek,
        empty: EkCaBundle::from_certificates(vec![]),
        maker,
    })
}

fn fixture() -> Option<&'static Fixture> {
    static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            build()
                .map_err(|e| eprintln!("ek_cert: the fixed EK did not parse, nothing is fuzzed: {e}"))
                .ok()
        })
        .as_ref()
}

fuzz_target!(|data: &[u8]| {
    let Some(f) = fixture() else {
        return;
    };
    let _ = f.empty.verify(data, &f.ek, NOW);
    if let Some(maker) = &f.maker {
        let _ = maker.verify(data, &f.ek, NOW);
    }
});
