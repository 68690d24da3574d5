//! A pinned proof file: the keys a verifier (or someone it trusts) proved to live in
//! hardware with `keygate keys prove --out DIR`, which writes `DIR/proven.json`. An instance
//! that pins it accepts tokens of those keys only ([`super::VerifierConfig::require_proven`]),
//! so a key that appears in the JWKS without a proof is refused. The file is a record, not
//! evidence: protect it like the configuration that names the issuer.

use serde::{Deserialize, Serialize};

/// One proven key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvenKey {
    pub kid: String,
    /// The EK template of the TPM that holds it (`rsa2048`, `p256`, `p384`).
    pub ek_kind: String,
    /// Subject of the manufacturer CA that certified that TPM's EK.
    pub manufacturer_ca: String,
}

/// `proven.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvenKeys {
    /// The server the proofs ran against.
    pub server: String,
    /// Unix time of the proofs.
    pub proven_at: i64,
    pub keys: Vec<ProvenKey>,
}

impl ProvenKeys {
    /// Parses a `proven.json`.
    pub fn from_json(text: &str) -> Result<ProvenKeys, String> {
        serde_json::from_str(text).map_err(|e| format!("not a keygate proven-keys file: {e}"))
    }

    /// The kids it names.
    pub fn kids(&self) -> impl Iterator<Item = String> + '_ {
        self.keys.iter().map(|k| k.kid.clone())
    }
}
