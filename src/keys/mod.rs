//! Hardware-held signing keys.
//!
//! The core trait [`KeyBackend`] is small, like smallstep's `kms.KeyManager`: create a P-256
//! signing key inside the device, list and find keys, export the public key, sign a SHA-256
//! digest. Private keys never leave the device; no software signing key exists in any
//! production path. Calls block (they are FFI): async callers run them in `spawn_blocking`.
//! This layer knows nothing of HTTP or storage.

pub mod pkcs11;
pub mod queue;
pub mod secret;
pub mod signer;
pub mod tpm;

pub use queue::{Finished, Handoff, SignQueue, Ticket};
pub use secret::SecretSource;
pub use signer::HardwareSigner;

/// A key held in the device: its URI (RFC 7512 `pkcs11:` or `tpm:`) and its public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Names the key; never carries a PIN.
    pub uri: String,
    /// Human label on the device (`CKA_LABEL`).
    pub label: String,
    pub public_key: p256::PublicKey,
}

/// What can go wrong with a hardware key. Every message is one line that names the failing
/// device call where there is one; none holds a PIN.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key backend configuration: {0}")]
    Config(String),
    #[error("cannot load PKCS#11 module {path}: {reason}")]
    Module { path: String, reason: String },
    #[error("no PKCS#11 token with {0} is present")]
    TokenNotFound(String),
    #[error("PKCS#11 login refused: {0} (check the user PIN)")]
    Login(String),
    #[error("PKCS#11 {function} failed: {rv}")]
    Pkcs11 { function: String, rv: String },
    #[error("no key {0} on the device")]
    KeyNotFound(String),
    #[error("the device returned an unusable public key: {0}")]
    BadPublicKey(String),
    #[error("the device returned an unusable signature: {0}")]
    BadSignature(String),
    #[error("key backend busy: no session free within {0} ms")]
    Busy(u64),
    #[error("TPM {what} failed: {reason}")]
    Tpm { what: String, reason: String },
    #[error("cannot read {what}: {reason}")]
    Secret { what: String, reason: String },
    /// The caller's input was refused by the device or before it (a client's mistake).
    #[error("{0}")]
    BadInput(String),
}

impl KeyError {
    /// True when retrying later may succeed (device or session trouble, not a bad request).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            KeyError::Busy(_)
                | KeyError::Pkcs11 { .. }
                | KeyError::Tpm { .. }
                | KeyError::TokenNotFound(_)
                | KeyError::Login(_)
        )
    }
}

/// A device that creates P-256 signing keys and signs digests with them.
///
/// Implementations are `Send + Sync` and safe to call from many threads at once; every
/// method blocks on the device.
pub trait KeyBackend: Send + Sync + 'static {
    /// Short backend name shown in `/v1/keys` (`pkcs11`, `tpm`).
    fn kind(&self) -> &'static str;

    /// True when the device is a software simulator (SoftHSM2, swtpm): startup warns.
    fn is_simulator(&self) -> bool;

    /// How many signatures the backend can make at once (its session count), and how long
    /// a caller should wait for one of those slots before giving up with 503. Async callers
    /// queue on this before they take a blocking thread.
    fn concurrency(&self) -> (usize, std::time::Duration);

    /// Which device this is, as recorded with each key: replicas that share one device (one
    /// PKCS#11 token) share its keys; a TPM belongs to one machine, so each TPM replica has
    /// its own (`tpm:<id>`). Stable for as long as the device's keys exist.
    fn device_id(&self) -> Result<String, KeyError>;

    /// Generates a new non-extractable P-256 signing key inside the device.
    fn create_key(&self, label: &str) -> Result<KeyInfo, KeyError>;

    /// Lists the P-256 signing keys on the device.
    fn list_keys(&self) -> Result<Vec<KeyInfo>, KeyError>;

    /// Finds one key by URI; [`KeyError::KeyNotFound`] when it is not there.
    fn find_key(&self, uri: &str) -> Result<KeyInfo, KeyError>;

    /// Signs a SHA-256 digest with the key at `uri`; returns the raw 64-byte `r || s`.
    fn sign_digest(&self, uri: &str, digest: &[u8; 32]) -> Result<[u8; 64], KeyError>;

    /// Removes the key at `uri` from the device for good. Callers check first, with
    /// [`KeyBackend::find_key`], that it is there.
    fn destroy_key(&self, uri: &str) -> Result<(), KeyError>;

    /// What the device says of where the key at `uri` lives ([`KeyEvidence`]).
    fn key_evidence(&self, uri: &str) -> Result<KeyEvidence, KeyError>;

    /// A TPM's answer to a key-proof challenge: ActivateCredential of `id_object` and
    /// `encrypted_secret` with its EK and AK, then TPM2_Certify of the key at `uri` by the AK
    /// over `nonce`. Other devices have no such proof.
    fn certify_key(
        &self,
        _uri: &str,
        _id_object: &[u8],
        _encrypted_secret: &[u8],
        _nonce: &[u8],
    ) -> Result<Certified, KeyError> {
        Err(KeyError::BadInput(format!(
            "the {} backend has no hardware key proof to answer",
            self.kind()
        )))
    }
}

/// What a device says of where a key lives (`/v1/keys/{kid}/proof`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyEvidence {
    /// A TPM key: what a verifier checks against the TPM's manufacturer CA.
    Tpm(TpmEvidence),
    /// A PKCS#11 key: its attributes as the module reports them. The module's own word,
    /// not a proof: software (SoftHSM2) answers the same as hardware.
    Pkcs11(Pkcs11Evidence),
}

/// The public half of a TPM key proof: all TCG wire formats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmEvidence {
    /// Which EK template (`rsa2048`, `p256`, `p384`).
    pub ek_kind: &'static str,
    /// TPM2B_PUBLIC of the EK.
    pub ek_public: Vec<u8>,
    /// DER EK certificate (from NV, or the file configured for TPMs without one).
    pub ek_certificate: Option<Vec<u8>>,
    /// TPM2B_PUBLIC of the attestation key: a restricted signing primary key in the
    /// endorsement hierarchy, the same every time (derived from the endorsement seed).
    pub ak_public: Vec<u8>,
    /// TPM2B_PUBLIC of the signing key.
    pub key_public: Vec<u8>,
}

/// A PKCS#11 key's attributes (None: the module would not say) and the token's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Evidence {
    pub attributes: Vec<(&'static str, Option<bool>)>,
    /// The token's manufacturer and model, as `C_GetTokenInfo` gives them.
    pub token_manufacturer: String,
    pub token_model: String,
}

/// A TPM's answer to a key-proof challenge.
#[derive(Clone, PartialEq, Eq)]
pub struct Certified {
    /// What ActivateCredential returned.
    pub secret: Vec<u8>,
    /// TPMS_ATTEST of TPM2_Certify (marshalled).
    pub attest: Vec<u8>,
    /// TPMT_SIGNATURE by the AK over `attest` (marshalled).
    pub signature: Vec<u8>,
}

impl std::fmt::Debug for Certified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certified").finish_non_exhaustive()
    }
}

/// Decodes an EC point as devices return it: raw SEC1, or wrapped in a DER OCTET STRING
/// (PKCS#11 `CKA_EC_POINT`, measured on the development VM).
pub fn parse_ec_point(bytes: &[u8]) -> Result<p256::PublicKey, KeyError> {
    let raw = match bytes {
        [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest,
        _ => bytes,
    };
    p256::PublicKey::from_sec1_bytes(raw)
        .map_err(|_| KeyError::BadPublicKey(format!("{} bytes, not a P-256 point", bytes.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_point_raw_and_wrapped() {
        let sk = p256::SecretKey::from_slice(&[7u8; 32]).unwrap();
        let raw = sk.public_key().to_sec1_bytes();
        let raw = &raw[..];
        assert_eq!(parse_ec_point(raw).unwrap(), sk.public_key());
        let mut wrapped = vec![0x04, 0x41];
        wrapped.extend_from_slice(raw);
        assert_eq!(parse_ec_point(&wrapped).unwrap(), sk.public_key());
        assert!(parse_ec_point(&wrapped[..40]).is_err());
    }
}
