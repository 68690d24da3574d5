//! `keygate verify`: offline verification with a JWKS from a URL or a file.

use std::io::Read;

use anyhow::Context;
use clap::Args;
use zeroize::Zeroizing;

use crate::config::Config;
use crate::token::{JwkSet, ProvenKeys, Verifier, VerifierConfig};

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// JWKS location: an http(s) URL or a file path. Without it, the JWKS is the one the
    /// issuer's OpenID Connect discovery document names (`<issuer>/.well-known/openid-configuration`).
    #[arg(long)]
    pub jwks: Option<String>,
    /// Expected issuer (`iss`).
    #[arg(long)]
    pub issuer: String,
    /// Expected audience (`aud` must name it).
    #[arg(long)]
    pub audience: String,
    /// Clock leeway in seconds for exp/nbf/iat (default: tokens.leeway_seconds, 5).
    #[arg(long)]
    pub leeway: Option<u64>,
    /// Also refuse the token when this signed revocation list (URL or file, from
    /// /v1/revocations) names it.
    #[arg(long)]
    pub revocations: Option<String>,
    /// Trust only keys proven to live in hardware: a pinned proof file (the `proven.json`
    /// of `keygate keys prove --out`), or a folder of TPM manufacturer CA certificates, with
    /// which the token's key is proven now against the issuer (or --proof-server).
    #[arg(long)]
    pub require_proof: Option<std::path::PathBuf>,
    /// The server to prove the key against with a --require-proof folder (default: the
    /// issuer URL).
    #[arg(long)]
    pub proof_server: Option<String>,
    /// The token, or `-` (the default) to read it from standard input.
    #[arg(default_value = "-")]
    pub token: String,
}

/// Fetches or reads a JWK Set.
pub async fn load_jwks(location: &str) -> anyhow::Result<JwkSet> {
    let text = load_text(location, "JWKS").await?;
    serde_json::from_str(&text).with_context(|| format!("{location} is not a JWK Set"))
}

/// The body at an http(s) URL, or a file's text; `what` names it in errors.
pub async fn load_text(location: &str, what: &str) -> anyhow::Result<String> {
    Ok(
        if location.starts_with("http://") || location.starts_with("https://") {
            let res = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()?
                .get(location)
                .send()
                .await
                .with_context(|| format!("cannot fetch {what} {location}"))?;
            if !res.status().is_success() {
                anyhow::bail!("cannot fetch {what} {location}: {}", res.status());
            }
            res.text().await?
        } else {
            std::fs::read_to_string(location)
                .with_context(|| format!("cannot read {what} file {location}"))?
        },
    )
}

/// The `jwks_uri` of `issuer`'s OpenID Connect discovery document, after checking that the
/// document speaks for that issuer (OpenID Connect Discovery 1.0 §4.3).
pub async fn discover_jwks(issuer: &str) -> anyhow::Result<String> {
    if !(issuer.starts_with("https://") || issuer.starts_with("http://")) {
        anyhow::bail!("--issuer {issuer:?} is not a URL, so its JWKS cannot be discovered: pass --jwks");
    }
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let text = load_text(&url, "discovery document").await?;
    #[derive(serde::Deserialize)]
    struct Discovery {
        issuer: String,
        jwks_uri: String,
    }
    let d: Discovery = serde_json::from_str(&text)
        .with_context(|| format!("{url} is not an OpenID Connect discovery document"))?;
    if d.issuer != issuer {
        anyhow::bail!("{url} speaks for issuer {:?}, not {issuer:?}", d.issuer);
    }
    if !(d.jwks_uri.starts_with("https://") || d.jwks_uri.starts_with("http://")) {
        anyhow::bail!("{url} names a jwks_uri that is not an http(s) URL");
    }
    Ok(d.jwks_uri)
}

/// The kids `--require-proof` trusts: those of a pinned proof file, or the token's own kid
/// once a live proof against `server` passed.
async fn proven_kids(
    path: &std::path::Path,
    server: &str,
    jwks: &JwkSet,
    token: &str,
) -> anyhow::Result<Vec<String>> {
    if !path.is_dir() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the proof file {}", path.display()))?;
        let file = ProvenKeys::from_json(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        return Ok(file.kids().collect());
    }
    let kid = crate::token::jws::parse(token)
        .ok()
        .and_then(|p| p.header.kid)
        .ok_or_else(|| anyhow::anyhow!("invalid token: it names no key (kid) to prove"))?;
    let bundle = crate::attest::EkCaBundle::load_dir(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let api = super::client::Api::anonymous(server)?;
    match super::prove::prove(&api, jwks, &kid, Some(&bundle), None).await {
        Ok(super::prove::Outcome::Proven { .. }) => Ok(vec![kid]),
        Ok(super::prove::Outcome::NotProven(what)) => {
            anyhow::bail!("invalid token: key {kid} is not proven to live in hardware: {what}")
        }
        Err(e) => anyhow::bail!(
            "invalid token: key {kid} is not proven to live in hardware: step {} failed: {}",
            e.step,
            e.why
        ),
    }
}

pub async fn run(a: VerifyArgs, config: &Config) -> anyhow::Result<()> {
    let token = if a.token == "-" {
        let mut s = Zeroizing::new(String::new());
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read the token from standard input")?;
        Zeroizing::new(s.trim().to_owned())
    } else {
        Zeroizing::new(a.token.trim().to_owned())
    };
    let jwks = match &a.jwks {
        Some(location) => load_jwks(location).await?,
        None => load_jwks(&discover_jwks(&a.issuer).await?).await?,
    };
    let mut cfg = VerifierConfig::new(a.issuer.clone(), a.audience);
    cfg.leeway_seconds = a.leeway.unwrap_or(config.tokens.leeway_seconds);
    if let Some(path) = &a.require_proof {
        let server = a.proof_server.as_deref().unwrap_or(&a.issuer);
        cfg = cfg.require_proven(proven_kids(path, server, &jwks, &token).await?);
    }
    let verifier = Verifier::new(&jwks, cfg)?;
    let claims = match &a.revocations {
        None => verifier.verify(&token),
        Some(loc) => {
            let list = verifier
                .verify_revocations(load_text(loc, "revocation list").await?.trim())
                .map_err(|e| anyhow::anyhow!("revocation list {loc}: {e}"))?;
            verifier.verify_not_revoked(&token, &list)
        }
    }
    .map_err(|e| anyhow::anyhow!("invalid token: {e}"))?;
    println!("{}", serde_json::to_string_pretty(&claims)?);
    Ok(())
}
