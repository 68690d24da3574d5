//! TPM 2.0 attestation, server side: it needs no TPM of its own. This step holds the parts
//! the enrollment endpoints build on (issue 5): parsing the TCG structures clients send
//! (`TPM2B_PUBLIC` of EKs and AKs, names, the EK hash) and MakeCredential in software.

mod credential;
mod ekcert;
mod policy;
mod public;
mod quote;
mod reader;

pub(crate) use credential::tpm2b;
pub use credential::{Credential, kdfa, kdfe, make_credential};
pub use ekcert::{EkCaBundle, EkCertError, MAX_EK_CERT};
pub use policy::PcrPolicy;
pub use public::{Attributes, KeyKind, TpmPublic};
pub use quote::{Quote, QuoteError, verify_quote};
pub(crate) use reader::Reader;

/// TCG algorithm identifiers used here (TPM 2.0 Library, Part 2, TPM_ALG_ID).
pub mod alg {
    pub const RSA: u16 = 0x0001;
    pub const SHA1: u16 = 0x0004;
    pub const AES: u16 = 0x0006;
    pub const SHA256: u16 = 0x000B;
    pub const SHA384: u16 = 0x000C;
    pub const NULL: u16 = 0x0010;
    pub const ECDSA: u16 = 0x0018;
    pub const ECDAA: u16 = 0x001A;
    pub const ECC: u16 = 0x0023;
    pub const CFB: u16 = 0x0043;
}

/// Policy digests of the TCG EK Credential Profile 2.x (hex). A high-range EK (the P-384
/// template H-3, say) has authPolicy PolicyB = PolicyOR(PolicyA, PolicyC); satisfying it
/// takes PolicySecret(endorsement) (that is PolicyA), then PolicyOR with both.
pub mod ek_policy {
    /// PolicySecret(TPM_RH_ENDORSEMENT) in a SHA-384 session.
    pub const POLICY_A_SHA384: &str =
        "8bbf2266537c171cb56e403c4dc1d4b64f432611dc386e6f532050c3278c930e143e8bb1133824ccb431053871c6db53";
    /// PolicyAuthorizeNV of the profile's SHA-384 NV index.
    pub const POLICY_C_SHA384: &str =
        "d6032ce61f2fb3c240eb3cf6a33237ef2b6a16f4293c22b455e261cffd217ad5b4947c2d73e63005eed2dc2b3593d165";
}

/// Why a TPM structure or operation was refused. Messages are safe to show a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    #[error("{what} is malformed: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("{0} is not supported")]
    Unsupported(String),
    #[error("internal crypto failure: {0}")]
    Crypto(&'static str),
}

pub(crate) fn malformed(what: &'static str, why: impl Into<String>) -> AttestError {
    AttestError::Malformed {
        what,
        why: why.into(),
    }
}
