//! `keygate audit verify`: checks the audit hash chain and its signed checkpoints offline.

use anyhow::bail;
use clap::Args;

use crate::audit::{checkpoint_message, verify_chain};
use crate::config::Config;
use crate::store::Store;
use crate::token::{Jwk, JwkSet, Verifier, VerifierConfig, VerifyError, b64};

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Check checkpoint signatures against this JWKS (URL or file). Without it, the keys
    /// recorded in the same database are used, which an attacker who can rewrite the
    /// database could replace too.
    #[arg(long)]
    pub jwks: Option<String>,
}

/// Reads every entry page by page and checks the chain, then every checkpoint: its entry
/// has its hash, its signature is good, and the log still reaches it.
pub async fn verify(args: VerifyArgs, config: &Config) -> anyhow::Result<()> {
    let opts = config.store_options()?;
    if let Some(path) = opts.url.sqlite_path()
        && !std::path::Path::new(path).exists()
    {
        bail!("no audit log at {path}");
    }
    let store = Store::open(&opts).await?;
    let result = check(&store, args).await;
    store.close().await;
    let (entries, checkpoints, newest) = result?;
    match newest {
        Some(cp) => println!(
            "audit log verified: {entries} entries, {checkpoints} signed checkpoints, the newest at entry {cp}{}",
            if cp < entries {
                " (later entries are covered by the chain only)"
            } else {
                ""
            }
        ),
        None => println!(
            "audit log verified: {entries} entries, no signed checkpoint yet (removing the newest entries would go unnoticed)"
        ),
    }
    Ok(())
}

async fn check(store: &Store, args: VerifyArgs) -> anyhow::Result<(i64, usize, Option<i64>)> {
    // The keys recorded in this database, every state (checkpoints signed by keys retired
    // since are checked against these).
    let recorded = JwkSet {
        keys: store
            .signing_keys()
            .await?
            .iter()
            .filter_map(|k| serde_json::from_str::<Jwk>(&k.jwk).ok())
            .collect(),
    };
    let jwks = match &args.jwks {
        Some(loc) => super::verify::load_jwks(loc).await?,
        None => recorded.clone(),
    };
    let checkpoints = store.checkpoints(0, i64::MAX).await?;
    let (verifier, recorded) = if checkpoints.is_empty() {
        (None, None)
    } else {
        (
            Some(Verifier::new(&jwks, VerifierConfig::new("", ""))?),
            Verifier::new(&recorded, VerifierConfig::new("", "")).ok(),
        )
    };
    let (mut after, mut head) = (0i64, None::<(i64, String)>);
    let mut next_cp = checkpoints.iter().peekable();
    loop {
        let page = store.audit_entries(after, 1000).await?;
        let Some(last) = page.last() else { break };
        if let Err(broken) = verify_chain(&page, head.as_ref().map(|(s, h)| (*s, h.as_str()))) {
            bail!("audit log broken at {broken}");
        }
        for e in &page {
            while let Some(cp) = next_cp.next_if(|cp| cp.seq <= e.seq) {
                if cp.seq != e.seq || cp.hash != e.hash {
                    bail!(
                        "audit log broken at entry {}: it does not match the signed checkpoint there",
                        cp.seq
                    );
                }
            }
        }
        after = last.seq;
        head = Some((last.seq, last.hash.clone()));
    }
    let entries = head.as_ref().map(|(s, _)| *s).unwrap_or(0);
    if let Some(cp) = next_cp.next() {
        bail!(
            "audit log broken: it ends at entry {entries} but a signed checkpoint covers entry {} (entries were removed)",
            cp.seq
        );
    }
    let mut by_retired = 0;
    if let Some(v) = &verifier {
        for (i, cp) in checkpoints.iter().enumerate() {
            let sig = b64::decode(&cp.signature).unwrap_or_default();
            let msg = checkpoint_message(cp.seq, &cp.hash);
            let newest = i + 1 == checkpoints.len();
            let checked = match v.verify_detached(&cp.kid, &msg, &sig) {
                // A key rotated out of the JWKS since: the newest checkpoint, signed by a
                // published key, vouches for the whole chain before it; older ones are
                // checked against the recorded keys.
                Err(VerifyError::UnknownKid(_)) if args.jwks.is_some() && !newest => {
                    by_retired += 1;
                    match &recorded {
                        Some(r) => r.verify_detached(&cp.kid, &msg, &sig),
                        None => Err(VerifyError::UnknownKid(cp.kid.clone())),
                    }
                }
                other => other,
            };
            if let Err(e) = checked {
                bail!(
                    "audit log broken: the checkpoint at entry {} does not verify: {e}",
                    cp.seq
                );
            }
        }
    }
    if by_retired > 0 {
        eprintln!(
            "keygate: {by_retired} older checkpoint(s) are signed by keys no longer in the JWKS (rotated out); checked against the keys recorded in this database, and covered by the newest checkpoint"
        );
    }
    if args.jwks.is_none() && !checkpoints.is_empty() {
        eprintln!(
            "keygate: checkpoint signatures checked against the keys recorded in this database; pass --jwks for an independent trust anchor"
        );
    }
    Ok((entries, checkpoints.len(), checkpoints.last().map(|c| c.seq)))
}
