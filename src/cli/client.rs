//! CLI commands that talk to a keygate server over HTTP.

use anyhow::{Context, bail};
use clap::Args;
use zeroize::Zeroizing;

use super::ClientArgs;
use crate::api::{IssueTokenResponse, KeyView, Problem};

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
    #[arg(long)]
    pub cnf_jkt: Option<String>,
    /// Print the full JSON answer instead of the token alone.
    #[arg(long)]
    pub json: bool,
}

fn api_token(c: &ClientArgs) -> anyhow::Result<Zeroizing<String>> {
    if let Some(path) = &c.token_file {
        let s = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        return Ok(Zeroizing::new(s.trim().to_owned()));
    }
    match std::env::var("KEYGATE_TOKEN") {
        Ok(s) if !s.is_empty() => Ok(Zeroizing::new(s)),
        _ => bail!("no API token: set KEYGATE_TOKEN or pass --token-file"),
    }
}

fn http() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?)
}

/// Turns a non-2xx answer into a one-line error from its problem document.
async fn check(res: reqwest::Response) -> anyhow::Result<reqwest::Response> {
    if res.status().is_success() {
        return Ok(res);
    }
    let status = res.status();
    match res.json::<Problem>().await {
        Ok(p) => bail!("{} {}: {}", p.status, p.title, p.detail),
        Err(_) => bail!("server answered {status}"),
    }
}

pub async fn issue(a: IssueArgs) -> anyhow::Result<()> {
    let token = api_token(&a.client)?;
    let mut body = serde_json::json!({ "subject": a.subject, "audience": a.audience });
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
    let url = format!("{}/v1/tokens", a.client.server.trim_end_matches('/'));
    let res = http()?
        .post(&url)
        .bearer_auth(token.as_str())
        .json(&body)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let out: IssueTokenResponse = check(res).await?.json().await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{}", out.token);
    }
    Ok(())
}

pub async fn list_keys(c: ClientArgs, json: bool) -> anyhow::Result<()> {
    let token = api_token(&c)?;
    let url = format!("{}/v1/keys", c.server.trim_end_matches('/'));
    let res = http()?
        .get(&url)
        .bearer_auth(token.as_str())
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let keys: Vec<KeyView> = check(res).await?.json().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&keys)?);
        return Ok(());
    }
    println!(
        "{:<44} {:<9} {:<8} {:<21} URI",
        "KID", "STATE", "BACKEND", "CREATED"
    );
    for k in keys {
        println!(
            "{:<44} {:<9} {:<8} {:<21} {}",
            k.kid, k.state, k.backend, k.created_at, k.uri
        );
    }
    Ok(())
}

pub async fn rotate_key(c: ClientArgs, activate_now: bool) -> anyhow::Result<()> {
    let token = api_token(&c)?;
    let url = format!("{}/v1/keys/rotate", c.server.trim_end_matches('/'));
    let res = http()?
        .post(&url)
        .bearer_auth(token.as_str())
        .json(&serde_json::json!({ "activate_now": activate_now }))
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let k: KeyView = check(res).await?.json().await?;
    match (&k.state[..], &k.activate_at) {
        ("next", Some(at)) => println!("{} next (published now, signs from {at})", k.kid),
        _ => println!("{} {}", k.kid, k.state),
    }
    Ok(())
}

pub async fn destroy_key(c: ClientArgs, kid: &str) -> anyhow::Result<()> {
    let token = api_token(&c)?;
    if kid.is_empty()
        || !kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        bail!("{kid:?} is not a kid (base64url RFC 7638 thumbprint)");
    }
    let url = format!("{}/v1/keys/{kid}", c.server.trim_end_matches('/'));
    let res = http()?
        .delete(&url)
        .bearer_auth(token.as_str())
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    check(res).await?;
    println!("{kid} destroyed");
    Ok(())
}
