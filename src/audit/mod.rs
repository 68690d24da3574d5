//! Audit entries and their hash chain.
//!
//! Each entry's `hash` is the lowercase hex SHA-256 of the previous entry's hash (64 zeros
//! for the first), a newline, and the entry's canonical JSON (fixed member order, no
//! whitespace). Editing, deleting or reordering any row breaks the chain from there on.
//! Signed checkpoints and `keygate audit verify` come with the lifecycle work (issue 4).

use aws_lc_rs::digest;
use serde::{Deserialize, Serialize};

/// `prev_hash` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What happened, as the caller knows it. Never holds a secret: targets are ids (jti, API
/// token id, kid), never tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// API token id, `cli`, or `anonymous`.
    pub actor: String,
    /// Dotted verb, e.g. `token.issue`, `api_token.delete`.
    pub action: String,
    pub target: String,
    /// `success`, or a short reason for refusal.
    pub outcome: String,
    pub remote_addr: String,
}

/// Longest actor, target or outcome recorded, in bytes. They can carry what a client sent
/// (a subject, an id, a refused token's `kid` in the reason), and a refusal needs no
/// credential: without a cap, each junk request could add kilobytes to the log.
pub const MAX_FIELD: usize = 256;

/// `s`, or its first bytes (on a character boundary) and how long it was.
fn capped(s: &str) -> String {
    if s.len() <= MAX_FIELD {
        return s.to_owned();
    }
    let mut end = MAX_FIELD - 24;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…({} bytes)", &s[..end], s.len())
}

impl AuditRecord {
    /// A record; actor, target and outcome are cut to [`MAX_FIELD`] bytes.
    pub fn new(actor: &str, action: &str, target: &str, outcome: &str, remote_addr: &str) -> Self {
        AuditRecord {
            actor: capped(actor),
            action: action.into(),
            target: capped(target),
            outcome: capped(outcome),
            remote_addr: remote_addr.into(),
        }
    }
}

/// An entry as stored: the record plus its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: i64,
    pub at: i64,
    #[serde(flatten)]
    pub record: AuditRecord,
    pub prev_hash: String,
    pub hash: String,
}

#[derive(Serialize)]
struct Canonical<'a> {
    seq: i64,
    at: i64,
    actor: &'a str,
    action: &'a str,
    target: &'a str,
    outcome: &'a str,
    remote_addr: &'a str,
}

/// The chain hash of an entry with this content after `prev_hash`.
pub fn chain_hash(prev_hash: &str, seq: i64, at: i64, r: &AuditRecord) -> String {
    let canonical = Canonical {
        seq,
        at,
        actor: &r.actor,
        action: &r.action,
        target: &r.target,
        outcome: &r.outcome,
        remote_addr: &r.remote_addr,
    };
    let json = serde_json::to_vec(&canonical).unwrap_or_default();
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(prev_hash.as_bytes());
    ctx.update(b"\n");
    ctx.update(&json);
    hex::encode(ctx.finish())
}

/// A signed statement that the chain's entry `seq` has hash `hash`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: i64,
    pub hash: String,
    /// The signing key (RFC 7638 thumbprint, as in the JWKS).
    pub kid: String,
    /// base64url raw `r || s` (ES256) over [`checkpoint_message`].
    pub signature: String,
}

/// The bytes a checkpoint signs.
pub fn checkpoint_message(seq: i64, hash: &str) -> Vec<u8> {
    format!("keygate-audit-checkpoint\n{seq}\n{hash}").into_bytes()
}

/// The first entry that does not follow its predecessor, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub seq: i64,
    pub reason: &'static str,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "entry {}: {}", self.seq, self.reason)
    }
}

/// Checks a run of entries that starts at the beginning of the log (or after `prev`), and
/// names the first entry that does not follow: a gap or repeat in `seq` (a row deleted or
/// moved), a `prev_hash` that is not the previous entry's hash (a row deleted, moved or
/// rewritten before it), or a `hash` that does not match the entry's content (the row itself
/// was edited).
pub fn verify_chain(entries: &[AuditEntry], prev: Option<(i64, &str)>) -> Result<(), Broken> {
    let (mut last_seq, mut last_hash) = prev
        .map(|(s, h)| (s, h.to_owned()))
        .unwrap_or((0, GENESIS.to_owned()));
    for e in entries {
        let broken = |reason| Err(Broken { seq: e.seq, reason });
        if e.seq != last_seq + 1 {
            return broken(
                "sequence number does not follow the previous entry (an entry is missing or out of place)",
            );
        }
        if e.prev_hash != last_hash {
            return broken("prev_hash is not the previous entry's hash (the chain was cut or reordered)");
        }
        if e.hash != chain_hash(&last_hash, e.seq, e.at, &e.record) {
            return broken("hash does not match the entry's content (the entry was altered)");
        }
        last_seq = e.seq;
        last_hash = e.hash.clone();
    }
    Ok(())
}

/// The seq of the first entry that does not follow ([`verify_chain`]).
pub fn first_broken(entries: &[AuditEntry], prev: Option<(i64, &str)>) -> Option<i64> {
    verify_chain(entries, prev).err().map(|b| b.seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_fields_are_cut_on_a_character_boundary() {
        let long = "é".repeat(3000);
        let r = AuditRecord::new(&long, "a", &long, &format!("denied: {long}"), "127.0.0.1");
        for f in [&r.actor, &r.target, &r.outcome] {
            assert!(f.len() <= MAX_FIELD, "{}", f.len());
            assert!(
                f.ends_with("…(6000 bytes)") || f.ends_with("…(6008 bytes)"),
                "{f}"
            );
        }
        assert_eq!(AuditRecord::new("a", "b", "c", "d", "e").target, "c");
    }

    fn chain(n: i64) -> Vec<AuditEntry> {
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|seq| {
                let record =
                    AuditRecord::new("t1", "token.issue", &format!("jti{seq}"), "success", "127.0.0.1");
                let hash = chain_hash(&prev, seq, 1000 + seq, &record);
                let e = AuditEntry {
                    seq,
                    at: 1000 + seq,
                    record,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                e
            })
            .collect()
    }

    #[test]
    fn clean_chain_verifies_and_edits_are_found() {
        let mut c = chain(5);
        assert_eq!(first_broken(&c, None), None);
        c[2].record.outcome = "denied".into();
        assert_eq!(first_broken(&c, None), Some(3));
        let mut c = chain(5);
        c.remove(1);
        assert_eq!(first_broken(&c, None), Some(3));
        let mut c = chain(5);
        c.swap(3, 4);
        assert_eq!(first_broken(&c, None), Some(5));
    }
}
