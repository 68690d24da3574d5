//! TPM 2.0 attestation, server side: it needs no TPM of its own. This step holds the parts
//! the enrollment endpoints build on (issue 5): parsing the TCG structures clients send
//! (`TPM2B_PUBLIC` of EKs and AKs, names, the EK hash) and MakeCredential in software.

mod credential;
mod ekcert;
pub mod keyproof;
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
