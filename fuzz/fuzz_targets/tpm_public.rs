//! The `TPM2B_PUBLIC` / `TPMT_PUBLIC` parser (EK and AK public areas sent by clients), and
//! what the server derives from a parsed area: its name, DER SubjectPublicKeyInfo and EK hash.
#![no_main]

use keygate::attest::TpmPublic;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for parsed in [
        TpmPublic::from_tpm2b(data, "fuzz"),
        TpmPublic::from_tpmt(data, "fuzz"),
    ] {
        if let Ok(public) = parsed {
            let _ = public.name();
            let _ = public.spki_der();
            let _ = public.ek_hash();
        }
    }
});
