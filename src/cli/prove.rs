//! `keygate keys prove`: checks from the outside that a server's signing keys live in
//! hardware (docs/adr/0014-key-proofs.md). For a TPM key every step of
//! `attest::keyproof` must pass; a PKCS#11 key's attributes are printed for what they are,
//! the module's word, and never count as proven.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use clap::Args;
use serde_json::json;

use super::client::{Api, segment};
use crate::api::keyproof::{KeyProofChallengeResponse, KeyProofResponse};
use crate::attest::EkCaBundle;
use crate::attest::keyproof::{self, Evidence, ProofError};
use crate::token::{JwkSet, ProvenKey, ProvenKeys};

#[derive(Debug, Args)]
pub struct ProveArgs {
    /// The keygate server: a URL, or host:port (http on loopback, https elsewhere).
    #[arg(long, env = "KEYGATE_SERVER")]
    pub server: String,
    /// The key to prove (default: every key of the server's JWKS).
    #[arg(long, allow_hyphen_values = true)]
    pub kid: Option<String>,
    /// Folder of the TPM manufacturer CA certificates to trust (PEM or DER files).
    #[arg(long)]
    pub tpm_ca: Option<PathBuf>,
    /// Write each proven key's evidence to DIR/<kid>/ in tpm2-tools' and openssl's formats.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// What one key's proof came to.
pub(super) enum Outcome {
    Proven { ek_kind: String, ca: String },
    NotProven(String),
}

/// The decoded answer of the server, kept for `--out`.
pub(super) struct Answer {
    pub attest: Vec<u8>,
    pub signature: Vec<u8>,
    pub nonce: Vec<u8>,
}

fn b64(field: &str, v: &str) -> Result<Vec<u8>, ProofError> {
    STANDARD.decode(v).map_err(|_| ProofError {
        step: "evidence",
        why: format!("the server's {field} is not base64"),
    })
}

fn step(step: &'static str) -> impl Fn(anyhow::Error) -> ProofError {
    move |e| ProofError {
        step,
        why: format!("{e:#}"),
    }
}

pub async fn run(args: ProveArgs) -> anyhow::Result<()> {
    let api = Api::anonymous(&args.server)?;
    let jwks: JwkSet = api.get("/.well-known/jwks.json").await?;
    // Keys as a verifier takes them: by their RFC 7638 thumbprint (token::Verifier skips an
    // entry whose kid is not its thumbprint, and so does a proof).
    let kids: Vec<String> = match &args.kid {
        Some(k) => vec![k.clone()],
        None => {
            let mut kids = Vec::new();
            for k in &jwks.keys {
                match k.es256_point() {
                    Ok((_, kid)) if !kids.contains(&kid) => kids.push(kid),
                    Ok(_) => {}
                    Err(e) => println!(
                        "{}: ignored: not a key any verifier takes ({e})",
                        k.kid.as_deref().unwrap_or("(no kid)")
                    ),
                }
            }
            kids
        }
    };
    if kids.is_empty() {
        bail!("the server's JWKS has no keys");
    }
    let bundle = args
        .tpm_ca
        .as_deref()
        .map(EkCaBundle::load_dir)
        .transpose()
        .map_err(|e| anyhow!("{e}"))?;
    let mut failed = Vec::new();
    let mut proven = Vec::new();
    for kid in &kids {
        match prove(&api, &jwks, kid, bundle.as_ref(), args.out.as_deref()).await {
            Ok(Outcome::Proven { ek_kind, ca }) => {
                println!(
                    "{kid}: proven: made inside a TPM and bound to it (fixedTPM, fixedParent, sensitiveDataOrigin); \
                     the TPM's {ek_kind} EK is certified by {ca}"
                );
                proven.push(ProvenKey {
                    kid: kid.clone(),
                    ek_kind,
                    manufacturer_ca: ca,
                });
            }
            Ok(Outcome::NotProven(what)) => {
                println!("{kid}: NOT proven: {what}");
                failed.push(kid.clone());
            }
            Err(e) => {
                println!("{kid}: FAILED at step {}: {}", e.step, e.why);
                failed.push(kid.clone());
            }
        }
    }
    if let Some(dir) = &args.out {
        let file = ProvenKeys {
            server: api.url(""),
            proven_at: crate::token::verify::now(),
            keys: proven,
        };
        let path = dir.join("proven.json");
        std::fs::create_dir_all(dir)?;
        std::fs::write(&path, serde_json::to_string_pretty(&file)?)
            .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} keys not proven to live in hardware: {}",
            failed.len(),
            kids.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

/// Runs the whole proof of `kid` against the server of `api`.
pub(super) async fn prove(
    api: &Api,
    jwks: &JwkSet,
    kid: &str,
    bundle: Option<&EkCaBundle>,
    out: Option<&Path>,
) -> Result<Outcome, ProofError> {
    // The point a verifier would use for `kid`: the entry whose thumbprint it is. The kid
    // member alone proves nothing (a server could name any point with any kid).
    let point = jwks
        .keys
        .iter()
        .filter_map(|k| k.es256_point().ok())
        .find(|(_, thumbprint)| thumbprint == kid)
        .map(|(point, _)| point)
        .ok_or_else(|| ProofError {
            step: "jwks",
            why: "no usable ES256 key whose RFC 7638 thumbprint is this kid in the server's JWKS".into(),
        })?;
    let (x, y) = (point[1..33].to_vec(), point[33..65].to_vec());
    let seg = segment("a kid", kid).map_err(step("jwks"))?;
    let c: KeyProofChallengeResponse = api
        .post(&format!("/v1/keys/{seg}/proof/challenge"), &json!({}))
        .await
        .map_err(step("evidence"))?;
    let Some(tpm) = c.tpm.as_ref().filter(|_| c.hardware_proof && c.kind == "tpm") else {
        let what = match &c.pkcs11 {
            Some(p) => {
                let attrs: Vec<String> = p
                    .attributes
                    .iter()
                    .map(|(k, v)| format!("{k}={}", v.map_or("unknown".into(), |b| b.to_string())))
                    .collect();
                format!(
                    "a PKCS#11 key on {} {}; the module states {}; that is the module's word, not a hardware proof",
                    p.token_manufacturer,
                    p.token_model,
                    attrs.join(" ")
                )
            }
            None => format!("the server offers no hardware proof (kind {:?})", c.kind),
        };
        return Ok(Outcome::NotProven(what));
    };
    let bundle = bundle.ok_or_else(|| ProofError {
        step: "ek-certificate",
        why: "a TPM key: give the manufacturer CA folder to trust with --tpm-ca".into(),
    })?;
    let ek_certificate = tpm
        .ek_certificate
        .as_deref()
        .map(|v| b64("ek_certificate", v))
        .transpose()?;
    let (ek_public, ak_public, key_public) = (
        b64("ek_public", &tpm.ek_public)?,
        b64("ak_public", &tpm.ak_public)?,
        b64("key_public", &tpm.key_public)?,
    );
    let evidence = Evidence {
        ek_certificate: ek_certificate.as_deref(),
        ek_public: &ek_public,
        ak_public: &ak_public,
        key_public: &key_public,
    };
    let now = crate::token::verify::now();
    let checked = keyproof::check_evidence(&evidence, bundle, (&x, &y), now)?;
    let mut secret = zeroize::Zeroizing::new([0u8; 32]);
    let mut nonce = [0u8; 32];
    aws_lc_rs::rand::fill(secret.as_mut()).map_err(|_| step("credential")(anyhow!("no randomness")))?;
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| step("certify")(anyhow!("no randomness")))?;
    let cred = keyproof::credential_for(&checked, secret.as_ref())?;
    let challenge = c.challenge.clone().ok_or_else(|| ProofError {
        step: "evidence",
        why: "the server gave no challenge id".into(),
    })?;
    let a: KeyProofResponse = api
        .post(
            &format!("/v1/keys/{seg}/proof"),
            &json!({
                "challenge": challenge,
                "id_object": STANDARD.encode(&cred.id_object),
                "encrypted_secret": STANDARD.encode(&cred.encrypted_secret),
                "nonce": STANDARD.encode(nonce),
            }),
        )
        .await
        .map_err(step("credential"))?;
    let answer = Answer {
        attest: b64("attest", &a.attest)?,
        signature: b64("signature", &a.signature)?,
        nonce: nonce.to_vec(),
    };
    let returned = zeroize::Zeroizing::new(b64("secret", &a.secret)?);
    keyproof::check_answer(
        &checked,
        secret.as_ref(),
        &nonce,
        &returned,
        &answer.attest,
        &answer.signature,
    )?;
    if let Some(dir) = out {
        super::prove_out::write(&dir.join(seg), &evidence, &checked, &answer).map_err(step("out"))?;
    }
    Ok(Outcome::Proven {
        ek_kind: tpm.ek_kind.clone(),
        ca: checked.manufacturer_ca.clone(),
    })
}
