//! Signing a SHA-256 digest with `CKM_ECDSA` (SoftHSM2 2.6 has no `CKM_ECDSA_SHA256`;
//! measured on the development VM). The result is raw `r || s`, exactly the JWS ES256 signature.

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;

use super::super::KeyError;
use super::Pkcs11Backend;

impl Pkcs11Backend {
    pub(super) fn sign(&self, uri: &str, digest: &[u8; 32]) -> Result<[u8; 64], KeyError> {
        let handle = self.handle_for(uri)?;
        // A handle goes stale when the token was re-inserted or the object re-created: then
        // look it up again and retry once.
        let mut stale = false;
        let sig = self.pool.run(|s| {
            s.sign(&Mechanism::Ecdsa, handle, digest).inspect_err(|e| {
                stale = matches!(
                    e,
                    CkError::Pkcs11(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid, _)
                );
            })
        });
        let sig = match sig {
            Err(KeyError::Pkcs11 { .. }) if stale => {
                self.forget_handles();
                let handle = self.handle_for(uri)?;
                self.pool.run(|s| s.sign(&Mechanism::Ecdsa, handle, digest))?
            }
            other => other?,
        };
        sig.as_slice().try_into().map_err(|_| KeyError::Pkcs11 {
            function: "C_Sign".into(),
            rv: format!("returned {} bytes, expected 64", sig.len()),
        })
    }
}
