//! Operator commands over HTTP: API tokens, machines, the audit log, signing keys.

use anyhow::bail;
use clap::Subcommand;
use serde_json::json;

use super::ClientArgs;
use super::client::{Api, segment, table};
use crate::api::{ApiTokenView, AuditPage, CreateApiTokenResponse, KeyView, MachineView};

#[derive(Debug, Subcommand)]
pub enum ApiTokenCommand {
    /// Mint an API token (scope admin); prints the secret once.
    Create {
        #[command(flatten)]
        client: ClientArgs,
        /// A name for people (who or what holds it).
        #[arg(long)]
        name: String,
        /// A scope (tokens:issue, tokens:read, tokens:revoke, keys:read, keys:rotate,
        /// audit:read, enroll:admin, admin); repeat for more.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Lifetime in seconds (default: the server's).
        #[arg(long)]
        ttl: Option<u64>,
        /// Print the full JSON answer instead of the secret alone.
        #[arg(long)]
        json: bool,
    },
    /// List API tokens (scope admin); never shows a secret.
    List {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        json: bool,
    },
    /// Delete an API token by id (scope admin): refused at once on every replica.
    Delete {
        #[command(flatten)]
        client: ClientArgs,
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum MachinesCommand {
    /// List registered and enrolled machines (scope enroll:admin).
    List {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        json: bool,
    },
    /// Register a machine by its EK hash, with a name (scope enroll:admin).
    Add {
        #[command(flatten)]
        client: ClientArgs,
        /// Lowercase hex SHA-256 of the EK public key's DER SubjectPublicKeyInfo.
        #[arg(long)]
        ek_hash: String,
        /// The name its tokens and certificates carry as subject.
        #[arg(long)]
        name: String,
    },
    /// Revoke a machine (scope enroll:admin): later enrollments are refused and its
    /// unexpired tokens are revoked.
    Revoke {
        #[command(flatten)]
        client: ClientArgs,
        ek_hash: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Revoke one certificate keygate issued, by serial (scope tokens:revoke); its CA's CRL
    /// lists it from then on.
    Revoke {
        #[command(flatten)]
        client: ClientArgs,
        /// The serial number in hex (`openssl x509 -noout -serial`).
        serial: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Fetch the CRL (DER) of the active CA key, or of --kid, into a file.
    Crl {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        kid: Option<String>,
        /// Where to write it (DER; `openssl crl -inform DER` reads it).
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

pub async fn certificates(cmd: CertCommand) -> anyhow::Result<()> {
    match cmd {
        CertCommand::Revoke {
            client,
            serial,
            reason,
        } => {
            if serial.is_empty() || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("{serial:?} is not a serial number (hex)");
            }
            let body = match reason {
                Some(r) => json!({ "reason": r }),
                None => json!({}),
            };
            let r: serde_json::Value = Api::new(&client)?
                .post(&format!("/v1/certificates/{serial}/revoke"), &body)
                .await?;
            println!(
                "certificate {} revoked at {}",
                r["serial"].as_str().unwrap_or(&serial),
                r["revoked_at"].as_str().unwrap_or("?")
            );
        }
        CertCommand::Crl { client, kid, out } => {
            let api = Api::anonymous(&client.server)?;
            let path = match &kid {
                Some(k) => format!("/v1/crl?kid={}", segment("a kid", k)?),
                None => "/v1/crl".to_owned(),
            };
            let der = api.get_bytes(&path).await?;
            std::fs::write(&out, &der).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
            println!("CRL ({} bytes) written to {}", der.len(), out.display());
        }
    }
    Ok(())
}

/// Checks an EK hash before it goes into a URL path.
fn ek_hash(h: &str) -> anyhow::Result<&str> {
    if h.len() != 64
        || !h
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        bail!("{h:?} is not an EK hash (64 lowercase hex digits)");
    }
    Ok(h)
}

fn opt(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".into())
}

pub async fn api_tokens(cmd: ApiTokenCommand) -> anyhow::Result<()> {
    match cmd {
        ApiTokenCommand::Create {
            client,
            name,
            scopes,
            ttl,
            json,
        } => {
            let mut body = json!({ "name": name, "scopes": scopes });
            if let Some(t) = ttl {
                body["ttl_seconds"] = t.into();
            }
            let r: CreateApiTokenResponse = Api::new(&client)?.post("/v1/api-tokens", &body).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("{}", r.token);
                eprintln!(
                    "keygate: API token {} created (expires {}); the secret above is shown once",
                    r.id,
                    opt(&r.expires_at)
                );
            }
        }
        ApiTokenCommand::List { client, json } => {
            let list: Vec<ApiTokenView> = Api::new(&client)?.get("/v1/api-tokens").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            t.name.clone(),
                            t.created_at.clone(),
                            opt(&t.expires_at),
                            t.scopes.join(","),
                        ]
                    })
                    .collect();
                table(&["ID", "NAME", "CREATED", "EXPIRES", "SCOPES"], &rows);
            }
        }
        ApiTokenCommand::Delete { client, id } => {
            let id = segment("an API token id", &id)?;
            Api::new(&client)?.delete(&format!("/v1/api-tokens/{id}")).await?;
            println!("API token {id} deleted");
        }
    }
    Ok(())
}

pub async fn machines(cmd: MachinesCommand) -> anyhow::Result<()> {
    match cmd {
        MachinesCommand::List { client, json } => {
            let list: Vec<MachineView> = Api::new(&client)?.get("/v1/enroll/machines").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|m| {
                        vec![
                            m.ek_hash.clone(),
                            opt(&m.registered_at),
                            opt(&m.enrolled_at),
                            opt(&m.revoked_at),
                            m.name.clone(),
                        ]
                    })
                    .collect();
                table(&["EK HASH", "REGISTERED", "ENROLLED", "REVOKED", "NAME"], &rows);
            }
        }
        MachinesCommand::Add {
            client,
            ek_hash: h,
            name,
        } => {
            let h = ek_hash(&h)?;
            let _: serde_json::Value = Api::new(&client)?
                .post("/v1/enroll/machines", &json!({ "ek_hash": h, "name": name }))
                .await?;
            println!("machine {h} registered as {name}");
        }
        MachinesCommand::Revoke { client, ek_hash: h } => {
            let h = ek_hash(&h)?;
            Api::new(&client)?
                .delete(&format!("/v1/enroll/machines/{h}"))
                .await?;
            println!("machine {h} revoked");
        }
    }
    Ok(())
}

/// `keygate audit list`: entries after `after`, at most `limit`, oldest first.
pub async fn audit_list(client: ClientArgs, after: i64, limit: i64, json: bool) -> anyhow::Result<()> {
    let page: AuditPage = Api::new(&client)?
        .get(&format!("/v1/audit?after={after}&limit={limit}"))
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&page)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = page
        .entries
        .iter()
        .map(|e| {
            vec![
                e.seq.to_string(),
                e.at.clone(),
                e.actor.clone(),
                e.action.clone(),
                e.target.clone(),
                e.outcome.clone(),
            ]
        })
        .collect();
    table(&["SEQ", "AT", "ACTOR", "ACTION", "TARGET", "OUTCOME"], &rows);
    if let Some(last) = page.entries.last()
        && page.entries.len() as i64 == limit
    {
        eprintln!("keygate: more may follow: --after {}", last.seq);
    }
    Ok(())
}

pub async fn list_keys(c: ClientArgs, json: bool) -> anyhow::Result<()> {
    let keys: Vec<KeyView> = Api::new(&c)?.get("/v1/keys").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&keys)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.kid.clone(),
                k.state.clone(),
                k.device.clone(),
                k.created_at.clone(),
                opt(&k.activate_at.clone().or(k.activated_at.clone())),
                opt(&k.retire_at),
                k.uri.clone(),
            ]
        })
        .collect();
    table(
        &[
            "KID",
            "STATE",
            "DEVICE",
            "CREATED",
            "ACTIVATE_AT",
            "RETIRE_AT",
            "URI",
        ],
        &rows,
    );
    Ok(())
}

pub async fn rotate_key(c: ClientArgs, activate_now: bool) -> anyhow::Result<()> {
    let k: KeyView = Api::new(&c)?
        .post("/v1/keys/rotate", &json!({ "activate_now": activate_now }))
        .await?;
    match (&k.state[..], &k.activate_at) {
        ("next", Some(at)) => println!("{} next (published now, signs from {at})", k.kid),
        _ => println!("{} {}", k.kid, k.state),
    }
    Ok(())
}

pub async fn destroy_key(c: ClientArgs, kid: &str) -> anyhow::Result<()> {
    let kid = segment("a kid (base64url RFC 7638 thumbprint)", kid)?;
    Api::new(&c)?.delete(&format!("/v1/keys/{kid}")).await?;
    println!("{kid} destroyed");
    Ok(())
}
