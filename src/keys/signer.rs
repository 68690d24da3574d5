//! RustCrypto `signature` traits for hardware keys, so the `x509-cert` builder signs
//! certificates inside the device directly.

use std::sync::Arc;

use aws_lc_rs::digest;
use p256::ecdsa::{DerSignature, Signature, VerifyingKey};
use spki::{AlgorithmIdentifier, SignatureAlgorithmIdentifier};

use super::{KeyBackend, KeyError};

/// ecdsa-with-SHA256 (RFC 5758 §3.2).
const ECDSA_WITH_SHA256: spki::ObjectIdentifier = spki::ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");

/// A hardware key seen through `signature::Signer`: SHA-256 in software, ECDSA in the device.
#[derive(Clone)]
pub struct HardwareSigner {
    backend: Arc<dyn KeyBackend>,
    uri: String,
    verifying_key: VerifyingKey,
}

impl std::fmt::Debug for HardwareSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HardwareSigner").field("uri", &self.uri).finish()
    }
}

impl HardwareSigner {
    /// Binds the key at `uri` with its known public key.
    pub fn new(backend: Arc<dyn KeyBackend>, uri: String, public_key: &p256::PublicKey) -> Self {
        HardwareSigner {
            backend,
            uri,
            verifying_key: VerifyingKey::from(public_key),
        }
    }

    /// Signs `msg` (hashed with SHA-256 here) and returns raw `r || s` with `s` in its low
    /// form (`s <= n/2`): a device may return either of the two valid signatures, and
    /// keygate's verifiers accept only the low one, so a token has exactly one valid
    /// signature (no malleability: see `token::verify`).
    pub fn sign_raw(&self, msg: &[u8]) -> Result<[u8; 64], KeyError> {
        let d = digest::digest(&digest::SHA256, msg);
        let mut buf = [0u8; 32];
        buf.copy_from_slice(d.as_ref());
        let raw = self.backend.sign_digest(&self.uri, &buf)?;
        let sig =
            Signature::from_slice(&raw).map_err(|_| KeyError::BadSignature("r or s out of range".into()))?;
        Ok(sig.normalize_s().to_bytes().into())
    }
}

impl signature::Keypair for HardwareSigner {
    type VerifyingKey = VerifyingKey;

    fn verifying_key(&self) -> VerifyingKey {
        self.verifying_key
    }
}

impl signature::Signer<Signature> for HardwareSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<Signature, signature::Error> {
        let raw = self.sign_raw(msg).map_err(signature::Error::from_source)?;
        Signature::from_slice(&raw).map_err(|_| signature::Error::new())
    }
}

impl signature::Signer<DerSignature> for HardwareSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<DerSignature, signature::Error> {
        let sig: Signature = signature::Signer::try_sign(self, msg)?;
        Ok(sig.to_der())
    }
}

impl SignatureAlgorithmIdentifier for HardwareSigner {
    type Params = der::AnyRef<'static>;
    const SIGNATURE_ALGORITHM_IDENTIFIER: AlgorithmIdentifier<Self::Params> = AlgorithmIdentifier {
        oid: ECDSA_WITH_SHA256,
        parameters: None,
    };
}
