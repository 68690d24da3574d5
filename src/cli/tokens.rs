//! `keygate token ...`: issue, revoke, introspect, redeem (with a CSR and a DPoP proof),
//! and inspect (decode without verifying).

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use p256::ecdsa::signature::Signer;
use serde_json::{Value, json};

use super::ClientArgs;
use super::client::{Api, arg_or_stdin};
use crate::api::{IntrospectResponse, IssueTokenResponse, RedeemResponse, RevokeResponse};
use crate::token::{Jwk, b64};

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Issue a provisioning token (scope tokens:issue); prints the token.
    Issue(IssueArgs),
    /// Revoke a token by its jti (scope tokens:revoke), with an optional reason.
    Revoke {
        #[command(flatten)]
        client: ClientArgs,
        /// The token's `jti`.
        #[arg(allow_hyphen_values = true)]
        jti: String,
        /// Why (kept in the revocation list, the event stream and the audit log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// RFC 7662 introspection (scope tokens:read): is the token active, and why not.
    Introspect {
        #[command(flatten)]
        client: ClientArgs,
        /// The token, or `-` to read it from standard input.
        #[arg(default_value = "-")]
        token: String,
    },
    /// Redeem a token (no API token needed: the token is the credential).
    Redeem(RedeemArgs),
    /// Decode a token WITHOUT verifying it (like `step crypto jwt inspect --insecure`):
    /// header and claims as JSON, with the times in words.
    Inspect {
        /// The token, or `-` to read it from standard input.
        #[arg(default_value = "-")]
        token: String,
    },
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// `sub` of the token.
    #[arg(long)]
    pub subject: String,
    /// `aud` of the token.
    #[arg(long)]
    pub audience: String,
    /// Lifetime in seconds (default: the server's).
    #[arg(long)]
    pub ttl: Option<u64>,
    /// A scope; repeat for more.
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// The token may be redeemed once only.
    #[arg(long)]
    pub one_time: bool,
    /// Bind the token to this RFC 7638 JWK thumbprint (cnf.jkt).
    #[arg(long, conflicts_with = "dpop_key")]
    pub cnf_jkt: Option<String>,
    /// Bind the token to the key in this PEM file (its public key's thumbprint becomes
    /// cnf.jkt); redeem it with `keygate token redeem --dpop-key` and the same file.
    #[arg(long)]
    pub dpop_key: Option<std::path::PathBuf>,
    /// A subjectAltName a certificate made at redemption may carry (a DNS name or an IP
    /// address); repeat for more. Redemption refuses a CSR that asks for any other.
    #[arg(long = "san")]
    pub sans: Vec<String>,
    /// Print the full JSON answer instead of the token alone.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RedeemArgs {
    /// The keygate server (URL, or host:port).
    #[arg(long, env = "KEYGATE_ADDR", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// A PEM PKCS#10 request: the answer then carries a certificate chain for its key.
    #[arg(long)]
    pub csr: Option<std::path::PathBuf>,
    /// The P-256 private key (PEM, PKCS#8 or SEC1) the token is bound to: a fresh RFC 9449
    /// proof is signed with it and sent in the DPoP header.
    #[arg(long)]
    pub dpop_key: Option<std::path::PathBuf>,
    /// Write the certificate chain (with --csr) to this file instead of the JSON answer.
    #[arg(long, requires = "csr")]
    pub cert_out: Option<std::path::PathBuf>,
    /// The token, or `-` to read it from standard input.
    #[arg(default_value = "-")]
    pub token: String,
}

pub async fn run(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Issue(a) => issue(a).await,
        TokenCommand::Revoke { client, jti, reason } => {
            let jti = super::client::segment("a jti", &jti)?;
            let body = match reason {
                Some(r) => json!({ "reason": r }),
                None => json!({}),
            };
            let r: RevokeResponse = Api::new(&client)?
                .post(&format!("/v1/tokens/{jti}/revoke"), &body)
                .await?;
            println!("{} revoked at {}", r.jti, r.revoked_at);
            Ok(())
        }
        TokenCommand::Introspect { client, token } => {
            let token = arg_or_stdin(&token, "token")?;
            let api = Api::new(&client)?;
            let r: IntrospectResponse = api
                .post_form("/v1/tokens/introspect", &[("token", token.as_str())])
                .await?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            // like `test`: the exit status says whether the token is active
            if !r.active {
                std::process::exit(1);
            }
            Ok(())
        }
        TokenCommand::Redeem(a) => redeem(a).await,
        TokenCommand::Inspect { token } => {
            let token = arg_or_stdin(&token, "token")?;
            println!("{}", serde_json::to_string_pretty(&inspect(&token)?)?);
            eprintln!("keygate: NOT verified: the signature, issuer, audience and times were not checked");
            Ok(())
        }
    }
}

async fn issue(a: IssueArgs) -> anyhow::Result<()> {
    let api = Api::new(&a.client)?;
    let mut body = json!({ "subject": a.subject, "audience": a.audience });
    if let Some(t) = a.ttl {
        body["ttl_seconds"] = t.into();
    }
    if !a.scopes.is_empty() {
        body["scopes"] = a.scopes.clone().into();
    }
    if a.one_time {
        body["one_time"] = true.into();
    }
    if let Some(j) = &a.cnf_jkt {
        body["cnf_jkt"] = j.clone().into();
    }
    if !a.sans.is_empty() {
        body["sans"] = a.sans.clone().into();
    }
    if let Some(path) = &a.dpop_key {
        body["cnf_jkt"] = public_jwk(&read_key(path)?).kid.unwrap_or_default().into();
    }
    let out: IssueTokenResponse = api.post("/v1/tokens", &body).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{}", out.token);
    }
    Ok(())
}

async fn redeem(a: RedeemArgs) -> anyhow::Result<()> {
    let token = arg_or_stdin(&a.token, "token")?;
    let api = Api::anonymous(&a.server)?;
    let mut body = json!({ "token": token.as_str() });
    if let Some(path) = &a.csr {
        let pem = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        body["csr"] = pem.into();
    }
    let path = "/v1/tokens/redeem";
    let proof = match &a.dpop_key {
        Some(k) => Some(dpop_proof(&read_key(k)?, "POST", &api.url(path), &token)?),
        None => None,
    };
    let headers: Vec<(&str, &str)> = proof.iter().map(|p| ("DPoP", p.as_str())).collect();
    let r: RedeemResponse = api.post_with(path, &body, &headers).await?;
    match (&a.cert_out, &r.certificate) {
        (Some(out), Some(chain)) => {
            std::fs::write(out, chain).with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "redeemed for {}; certificate chain in {}",
                r.subject,
                out.display()
            );
        }
        _ => println!("{}", serde_json::to_string_pretty(&r)?),
    }
    Ok(())
}

/// A P-256 private key from a PEM file: PKCS#8 (`BEGIN PRIVATE KEY`) or SEC1 (`BEGIN EC
/// PRIVATE KEY`, what `openssl ecparam -genkey` writes).
fn read_key(path: &std::path::Path) -> anyhow::Result<p256::ecdsa::SigningKey> {
    use p256::pkcs8::DecodePrivateKey;
    let pem = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
    );
    if let Ok(k) = p256::ecdsa::SigningKey::from_pkcs8_pem(&pem) {
        return Ok(k);
    }
    match p256::SecretKey::from_sec1_pem(&pem) {
        Ok(k) => Ok(k.into()),
        Err(_) => bail!(
            "{} is not a P-256 private key in PEM (PKCS#8 or SEC1)",
            path.display()
        ),
    }
}

fn public_jwk(key: &p256::ecdsa::SigningKey) -> Jwk {
    Jwk::from_public_key(&p256::PublicKey::from(key.verifying_key()))
}

/// An RFC 9449 proof for `method url`, bound to `token` by `ath`.
fn dpop_proof(key: &p256::ecdsa::SigningKey, method: &str, url: &str, token: &str) -> anyhow::Result<String> {
    let mut jwk = serde_json::to_value(public_jwk(key))?;
    if let Some(o) = jwk.as_object_mut() {
        o.retain(|k, _| matches!(k.as_str(), "kty" | "crv" | "x" | "y"));
    }
    let header = json!({ "typ": crate::token::TYP_DPOP, "alg": "ES256", "jwk": jwk });
    let ath = b64::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        token.as_bytes(),
    ));
    let mut jti = [0u8; 16];
    getrandom::fill(&mut jti).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let claims = json!({
        "jti": b64::encode(jti), "htm": method, "htu": url,
        "iat": crate::authority::now(), "ath": ath,
    });
    let input = format!(
        "{}.{}",
        b64::encode(header.to_string()),
        b64::encode(claims.to_string())
    );
    let sig: p256::ecdsa::Signature = key.sign(input.as_bytes());
    Ok(format!("{input}.{}", b64::encode(sig.to_bytes())))
}

/// Header and claims of a compact JWS, decoded but not verified, with `exp`/`nbf`/`iat`
/// also as RFC 3339 and a note when the token has expired.
pub fn inspect(token: &str) -> anyhow::Result<Value> {
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        bail!("not a compact JWS: {} parts, expected 3", parts.len());
    }
    let decode = |i: usize, what: &str| -> anyhow::Result<Value> {
        let bytes = b64::decode(parts[i]).ok_or_else(|| anyhow::anyhow!("the {what} is not base64url"))?;
        serde_json::from_slice(&bytes).map_err(|_| anyhow::anyhow!("the {what} is not JSON"))
    };
    let header = decode(0, "header")?;
    let claims = decode(1, "payload")?;
    let mut times = serde_json::Map::new();
    for name in ["iat", "nbf", "exp"] {
        if let Some(t) = claims.get(name).and_then(Value::as_i64) {
            times.insert(name.into(), crate::authority::rfc3339(t).into());
        }
    }
    let mut out = json!({ "header": header, "claims": claims, "times": times });
    if let Some(exp) = out["claims"]["exp"].as_i64()
        && exp <= crate::authority::now()
    {
        out["expired"] = true.into();
    }
    Ok(out)
}
