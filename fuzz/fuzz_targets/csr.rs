//! PKCS#10 request checks (`keygate::x509::check_csr`): the PEM decoder, the DER
//! `CertificationRequest` parser, the algorithm match and the self-signature check.
//!
//! The input is tried as PEM text (lossy UTF-8), and its raw bytes are wrapped as a PEM
//! "CERTIFICATE REQUEST" so that arbitrary DER reaches the parser behind the PEM layer.
#![no_main]

use keygate::x509::check_csr;
use libfuzzer_sys::fuzz_target;

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// `der` as PEM with `label`: standard base64 with padding, 64 characters a line.
fn pem(label: &str, der: &[u8]) -> String {
    let mut out = String::with_capacity(der.len() * 4 / 3 + 2 * label.len() + 64);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    let mut column = 0;
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(BASE64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
        column += 4;
        if column == 64 {
            out.push('\n');
            column = 0;
        }
    }
    if column != 0 {
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

fuzz_target!(|data: &[u8]| {
    let _ = check_csr(&String::from_utf8_lossy(data));
    let _ = check_csr(&pem("CERTIFICATE REQUEST", data));
});
