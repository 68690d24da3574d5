//! MakeCredential in software (the credential blob the server builds for a client's EK and
//! AK): any EK public area a client can send, any AK name and secret, and the credential
//! written out in tpm2-tools' file format.
//!
//! Input: a 2-byte big-endian length, that many bytes of EK `TPM2B_PUBLIC`, one byte that
//! splits the rest into the AK name and the secret.
#![no_main]

use keygate::attest::{TpmPublic, make_credential};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let len = usize::from(u16::from_be_bytes(*len));
    if rest.len() < len + 1 {
        return;
    }
    let (ek, rest) = rest.split_at(len);
    let Ok(ek) = TpmPublic::from_tpm2b(ek, "fuzz") else {
        return;
    };
    let cut = usize::from(rest[0]).min(rest.len() - 1);
    let (name, secret) = rest[1..].split_at(cut);
    if let Ok(c) = make_credential(&ek, name, secret) {
        let _ = c.tpm2_tools_file();
    }
});
