//! `keygate audit verify`: checks the audit hash chain of the configured store offline.

use anyhow::bail;

use crate::audit::verify_chain;
use crate::config::Config;
use crate::store::Store;

/// Reads every entry, page by page, and checks the chain; names the first bad entry.
pub async fn verify(config: &Config) -> anyhow::Result<()> {
    let url = config.store_url();
    if let Some(path) = url.strip_prefix("sqlite://") {
        if !std::path::Path::new(path).exists() {
            bail!("no audit log at {path}");
        }
    }
    let store = Store::open(&url, true).await?;
    let (mut after, mut head) = (0i64, None::<(i64, String)>);
    loop {
        let page = store.audit_entries(after, 1000).await?;
        let Some(last) = page.last() else { break };
        let (seq, hash) = (last.seq, last.hash.clone());
        if let Err(broken) = verify_chain(&page, head.as_ref().map(|(s, h)| (*s, h.as_str()))) {
            store.close().await;
            bail!("audit log broken at {broken}");
        }
        after = seq;
        head = Some((seq, hash));
    }
    store.close().await;
    match head {
        Some((seq, hash)) => println!(
            "audit log verified: {seq} entries, last hash {hash} (no signed checkpoints yet: removing the newest entries goes unnoticed)"
        ),
        None => println!("audit log verified: empty"),
    }
    Ok(())
}
