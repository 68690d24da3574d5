//! Key rotation: `next` → `active` → `retiring` → `retired`, then destroyed by hand.
//!
//! - A new key is created `next` and published at once; it starts signing `publish_lead`
//!   later, which is at least the JWKS `max-age`, so every verifier that honours the cache
//!   header has it before it meets a token it signed.
//! - The key it replaces turns `retiring`: published but signing nothing, until every token
//!   it signed has expired (plus the verifier leeway). Then it is `retired` and unpublished.
//! - `activate_now` (an emergency) skips the lead: verifiers with a cached JWKS refuse the new
//!   key's tokens until they refresh.
//! - The schedule (`rotate_every`) creates the next key `publish_lead` before it is due.
//!
//! Keys belong to devices (`KeyBackend::device_id`): replicas sharing a PKCS#11 token share
//! its keys; each TPM replica has its own. A replica rotates the keys of its own device.
//!
//! - [`Authority::schedule_tick`] runs on one replica per device at a time (the holder of
//!   the device's lease, `cli/periodic.rs`): promote, retire, create the next key.
//! - [`Authority::refresh_keys`] runs on every replica every check interval and whenever the
//!   store announces a key change: a change made elsewhere (another replica, the CLI) puts
//!   the new ring in force here.
//!
//! State changes are conditional updates and each device has at most one `next` and one
//! `active` key (unique indexes), so even two schedulers at once cannot both promote or
//! create.

use std::sync::Arc;

use super::keyring::{KeyRing, generate_key, record_new_key};
use super::{Authority, AuthorityError, Principal, now};
use crate::audit::AuditRecord;
use crate::store::{Refusal, SigningKeyRow, StoreError, WriteOp};

/// A key that stopped signing stays `retiring` at least this long, for issuances that took
/// the old key just before the switch and record their token just after.
const RETIRE_GRACE: i64 = 5;

/// The answer of a rotation.
#[derive(Debug, Clone)]
pub struct RotateOutcome {
    /// The new (or promoted) key, as recorded.
    pub key: SigningKeyRow,
}

impl Authority {
    /// This replica's device (`pkcs11`, `tpm:<id>`).
    pub fn device(&self) -> &str {
        &self.device
    }

    /// (kid, when the schedule replaces it) for this device's active key, when a schedule
    /// is set (`rotation.rotate_every_seconds`).
    pub async fn scheduled_retirement(&self) -> Result<Option<(String, i64)>, AuthorityError> {
        if self.settings.rotate_every <= 0 {
            return Ok(None);
        }
        let keys = self.store.signing_keys().await?;
        Ok(keys
            .into_iter()
            .find(|k| k.device == self.device && k.state == "active")
            .and_then(|k| Some((k.kid, k.activated_at? + self.settings.rotate_every))))
    }

    /// Reads the keys from the store and the device again and puts the new ring in force.
    pub async fn reload_keys(&self) -> Result<(), AuthorityError> {
        let _one = self.reload_lock.lock().await;
        let states = self.store.key_states().await?;
        let ring = KeyRing::load(&self.store, &self.backend, &self.device).await?;
        let changed = ring.active.kid != self.key_ring().active.kid;
        match self.keys.write() {
            Ok(mut g) => *g = Arc::new(ring),
            Err(p) => *p.into_inner() = Arc::new(ring),
        }
        if let Ok(mut s) = self.key_states.lock() {
            *s = states;
        }
        if changed {
            tracing::info!(kid = %self.key_ring().active.kid, "a new key signs from now on");
        }
        Ok(())
    }

    /// Rotates by hand: creates a key and records it `next` (active after the publish lead),
    /// or with `activate_now` makes it active at once. With a `next` key waiting already,
    /// `activate_now` promotes that one (it is published already), and a plain rotate is a
    /// conflict.
    pub async fn rotate(
        &self,
        who: &Principal,
        activate_now: bool,
        remote: &str,
    ) -> Result<RotateOutcome, AuthorityError> {
        let _serial = self.rotation_lock.lock().await;
        let keys = self.store.signing_keys().await?;
        let waiting = keys.iter().find(|k| k.state == "next" && k.device == self.device);
        let kid = match (waiting, activate_now) {
            (Some(k), false) => {
                return Err(AuthorityError::Conflict(format!(
                    "key {} is already waiting to become active at {}",
                    k.kid,
                    super::rfc3339(k.activate_at.unwrap_or_default())
                )));
            }
            (Some(k), true) => {
                self.promote(&k.kid, &who.id, "key.activate", "success: activated now", remote)
                    .await?;
                k.kid.clone()
            }
            (None, _) => {
                let t = now();
                let mut row = generate_key(&self.backend, &self.settings, &self.device).await?;
                let kid = row.kid.clone();
                let (more, outcome) = if activate_now {
                    (self.promotion_ops(&kid, t).await?, "success: activated now")
                } else {
                    row.activate_at = Some(t + self.settings.publish_lead);
                    (Vec::new(), "success: next")
                };
                let audit = AuditRecord::new(&who.id, "key.rotate", &kid, outcome, remote);
                record_new_key(&self.store, &self.backend, row, more, audit).await?;
                kid
            }
        };
        self.reload_keys().await?;
        let key = self
            .store
            .signing_keys()
            .await?
            .into_iter()
            .find(|k| k.kid == kid)
            .ok_or_else(|| AuthorityError::Internal(format!("key {kid} vanished")))?;
        Ok(RotateOutcome { key })
    }

    /// The ops that make `next_kid` active and the active key retiring.
    async fn promotion_ops(&self, next_kid: &str, t: i64) -> Result<Vec<WriteOp>, AuthorityError> {
        let mut ops = Vec::new();
        if let Some(old) = self
            .store
            .signing_keys()
            .await?
            .into_iter()
            .find(|k| k.state == "active" && k.device == self.device)
        {
            // Expected retirement: its last token's expiry plus the verifier leeway, and not
            // before the grace for issuances in flight has passed.
            let (_, last_exp) = self.store.tokens_signed_by(&old.kid, t).await?;
            let retire_at = (t + RETIRE_GRACE).max(last_exp.unwrap_or(0) + self.settings.leeway);
            ops.push(WriteOp::SetKeyState {
                kid: old.kid,
                from: "active",
                to: "retiring",
                activated_at: None,
                retire_at: Some(retire_at),
                retired_at: None,
            });
        }
        ops.push(WriteOp::SetKeyState {
            kid: next_kid.to_owned(),
            from: "next",
            to: "active",
            activated_at: Some(t),
            retire_at: None,
            retired_at: None,
        });
        Ok(ops)
    }

    async fn promote(
        &self,
        kid: &str,
        actor: &str,
        action: &str,
        outcome: &str,
        remote: &str,
    ) -> Result<(), AuthorityError> {
        let ops = self.promotion_ops(kid, now()).await?;
        match self
            .store
            .write(ops, AuditRecord::new(actor, action, kid, outcome, remote))
            .await
        {
            Ok(_) => Ok(()),
            Err(StoreError::Refused(Refusal::KeyState)) => Err(AuthorityError::Conflict(format!(
                "key {kid} changed state meanwhile"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Every replica: when any key changed state since the ring was loaded (here or on
    /// another replica), loads it again. True when it did.
    pub async fn refresh_keys(&self) -> Result<bool, AuthorityError> {
        let seen = self.key_states.lock().map(|s| s.clone()).unwrap_or_default();
        if self.store.key_states().await? == seen {
            return Ok(false);
        }
        self.reload_keys().await?;
        Ok(true)
    }

    /// One pass of the schedule, for the one replica per device that leads: promote this
    /// device's due `next` key, retire `retiring` keys whose tokens have all expired (of any
    /// device: retiring needs no device, and a TPM replica may be gone for good), create this
    /// device's next key when its active one is due. Then [`Authority::refresh_keys`].
    pub async fn schedule_tick(&self) -> Result<(), AuthorityError> {
        let serial = self.rotation_lock.lock().await;
        let t = now();
        for k in self.store.signing_keys().await? {
            match k.state.as_str() {
                "next" if k.device == self.device && k.activate_at.is_some_and(|at| at <= t) => {
                    match self
                        .promote(&k.kid, "scheduler", "key.activate", "success", "local")
                        .await
                    {
                        Ok(()) | Err(AuthorityError::Conflict(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                "retiring" => {
                    self.maybe_retire(&k, t).await?;
                }
                _ => {}
            }
        }
        if self.settings.rotate_every > 0 {
            let keys = self.store.signing_keys().await?;
            let mine = || keys.iter().filter(|k| k.device == self.device);
            let due = mine()
                .find(|k| k.state == "active")
                .and_then(|k| k.activated_at)
                .map(|at| at + self.settings.rotate_every);
            let waiting = mine().any(|k| k.state == "next");
            if let Some(due) = due.filter(|d| !waiting && d - self.settings.publish_lead <= t) {
                let mut row = generate_key(&self.backend, &self.settings, &self.device).await?;
                row.activate_at = Some(due.max(t + self.settings.publish_lead));
                let audit = AuditRecord::new("scheduler", "key.rotate", &row.kid, "success: next", "local");
                match record_new_key(&self.store, &self.backend, row, Vec::new(), audit).await {
                    // Another process created it first.
                    Ok(()) | Err(AuthorityError::Store(StoreError::Conflict(_))) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        drop(serial);
        self.refresh_keys().await?;
        Ok(())
    }

    /// Retires `k` when its expected retirement has come and no token it signed can still
    /// verify (expiry plus the verifier leeway). True when the key was retired.
    async fn maybe_retire(&self, k: &SigningKeyRow, t: i64) -> Result<bool, AuthorityError> {
        if k.retire_at.is_some_and(|r| t < r) {
            return Ok(false);
        }
        let (live, _) = self
            .store
            .tokens_signed_by(&k.kid, t - self.settings.leeway)
            .await?;
        if live == 0 {
            let op = WriteOp::SetKeyState {
                kid: k.kid.clone(),
                from: "retiring",
                to: "retired",
                activated_at: None,
                retire_at: None,
                retired_at: Some(t),
            };
            let audit = AuditRecord::new("scheduler", "key.retire", &k.kid, "success", "local");
            return match self.store.write(vec![op], audit).await {
                Ok(_) | Err(StoreError::Refused(Refusal::KeyState)) => Ok(true),
                Err(e) => Err(e.into()),
            };
        }
        Ok(false)
    }
}

impl Authority {
    /// Removes a retired key from the device and records it destroyed. Refused (409) while
    /// the key is not retired or a token it signed could still verify. Removing a key the
    /// device no longer has is not an error, so a destroy whose record failed can be retried.
    pub async fn destroy_key(&self, who: &Principal, kid: &str, remote: &str) -> Result<(), AuthorityError> {
        let _serial = self.rotation_lock.lock().await;
        let k = self
            .store
            .signing_keys()
            .await?
            .into_iter()
            .find(|k| k.kid == kid)
            .ok_or_else(|| AuthorityError::NotFound(format!("key {kid}")))?;
        if k.device != self.device {
            return Err(AuthorityError::Conflict(format!(
                "key {kid} lives in device {}, not in this replica's ({}); destroy it on the replica that holds it",
                k.device, self.device
            )));
        }
        if let Some(at) = k.destroyed_at {
            return Err(AuthorityError::Conflict(format!(
                "key {kid} was destroyed at {}",
                super::rfc3339(at)
            )));
        }
        if matches!(k.state.as_str(), "active" | "next") {
            return Err(AuthorityError::Conflict(format!(
                "key {kid} is {}; only a retired key can be destroyed (rotate first)",
                k.state
            )));
        }
        let t = now();
        let (live, last) = self.store.tokens_signed_by(kid, t - self.settings.leeway).await?;
        if live > 0 {
            return Err(AuthorityError::Conflict(format!(
                "key {kid} is {}: {live} token(s) it signed are unexpired (the last until {})",
                k.state,
                super::rfc3339(last.unwrap_or_default())
            )));
        }
        if k.state != "retired" {
            return Err(AuthorityError::Conflict(format!(
                "key {kid} is {}; it retires at {} and can be destroyed then",
                k.state,
                super::rfc3339(k.retire_at.unwrap_or(t))
            )));
        }
        let (b, uri) = (self.backend.clone(), k.uri.clone());
        tokio::task::spawn_blocking(move || match b.find_key(&uri) {
            Ok(_) => b.destroy_key(&uri),
            Err(crate::keys::KeyError::KeyNotFound(_)) => Ok(()),
            Err(e) => Err(e),
        })
        .await
        .map_err(|e| AuthorityError::Internal(e.to_string()))??;
        let op = WriteOp::KeyDestroyed {
            kid: kid.to_owned(),
            at: t,
        };
        self.store
            .write(
                vec![op],
                AuditRecord::new(&who.id, "key.destroy", kid, "success", remote),
            )
            .await
            .map_err(|e| match e {
                // another replica destroyed it (or changed its state) in the meantime
                StoreError::Refused(Refusal::KeyState) => AuthorityError::Conflict(format!(
                    "key {kid} changed state while it was being destroyed; list the keys to see it"
                )),
                e => e.into(),
            })?;
        tracing::info!(kid, uri = %k.uri, "signing key destroyed in the device");
        Ok(())
    }
}
