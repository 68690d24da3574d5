//! Provisioning tokens: JWS compact serialization (RFC 7515) of JWTs (RFC 7519) signed with
//! ES256 (RFC 7518 §3.4), keys published as a JWK Set (RFC 7517) with RFC 7638 thumbprints
//! as `kid`.
//!
//! This module needs no hardware and no server: an instance links it alone
//! (`keygate = { default-features = false }`) to verify tokens offline.

pub mod b64;
pub mod claims;
pub mod dpop;
pub mod jwk;
pub mod jws;
pub mod proven;
pub mod revocation;
pub mod verify;

pub use claims::{Audience, Claims, Confirmation};
pub use dpop::{DpopError, Proof, ProofContext, TYP_DPOP, verify_proof};
pub use jwk::{Jwk, JwkSet, thumbprint};
pub use jws::{Header, signing_input};
pub use proven::{ProvenKey, ProvenKeys};
pub use revocation::{RevocationList, Revoked, TYP_REVOCATIONS};
pub use verify::{Verifier, VerifierConfig, VerifyError};

/// `typ` header of provisioning tokens.
pub const TYP_PROVISIONING: &str = "provisioning+jwt";
/// The only algorithm keygate signs with and accepts.
pub const ALG_ES256: &str = "ES256";
