//! Issuing provisioning tokens, and introspecting them (RFC 7662).

use std::time::Instant;

use tokio::sync::oneshot;
use zeroize::Zeroizing;

use super::{Authority, AuthorityError, Principal, now, random_bytes, signing_input, timed_sign};
use crate::audit::AuditRecord;
use crate::keys::Handoff;
use crate::store::{IssuedToken, WriteOp};
use crate::token::{self, Audience, Claims, Confirmation, b64};

/// Longest `sub` / `aud` accepted.
const MAX_NAME: usize = 256;
/// Most scopes in one token.
const MAX_SCOPES: usize = 32;

/// What an operator asks for.
#[derive(Debug, Clone, Default)]
pub struct IssueRequest {
    pub subject: String,
    pub audience: String,
    pub ttl_seconds: Option<u64>,
    pub scopes: Vec<String>,
    pub one_time: bool,
    pub cnf_jkt: Option<String>,
    /// subjectAltNames a certificate at redemption may carry.
    pub sans: Vec<String>,
}

/// A signed, recorded token. The token text is wiped on drop.
pub struct Issued {
    pub token: Zeroizing<String>,
    pub jti: String,
    pub kid: String,
    pub expires_at: i64,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("jti", &self.jti)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// RFC 7662 answer, with keygate's `kid`, `revoked` and `redeemed`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Introspection {
    pub active: bool,
    /// Present when the token is one of ours (signature verifies, jti recorded).
    pub details: Option<(Claims, String, bool, bool)>,
}

/// A printable, trimmed, non-empty name of at most `max` bytes.
pub(super) fn check_name(field: &str, v: &str, max: usize) -> Result<(), AuthorityError> {
    if v.is_empty() {
        return Err(AuthorityError::BadRequest(format!("{field} must not be empty")));
    }
    if v.len() > max {
        return Err(AuthorityError::BadRequest(format!(
            "{field} is longer than {max} bytes"
        )));
    }
    if v.trim() != v || v.chars().any(char::is_control) {
        return Err(AuthorityError::BadRequest(format!(
            "{field} must not have control characters or surrounding whitespace"
        )));
    }
    Ok(())
}

/// RFC 6749 §3.3 scope-token: 1*( %x21 / %x23-5B / %x5D-7E ).
fn is_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

impl IssueRequest {
    /// Checks the request against the policy; returns the TTL to use.
    pub(super) fn validate(&self, default_ttl: u64, max_ttl: u64) -> Result<u64, AuthorityError> {
        check_name("subject", &self.subject, MAX_NAME)?;
        check_name("audience", &self.audience, MAX_NAME)?;
        let ttl = self.ttl_seconds.unwrap_or(default_ttl);
        if ttl == 0 {
            return Err(AuthorityError::BadRequest("ttl_seconds must be positive".into()));
        }
        if ttl > max_ttl {
            return Err(AuthorityError::BadRequest(format!(
                "ttl_seconds {ttl} exceeds the maximum of {max_ttl}"
            )));
        }
        if self.scopes.len() > MAX_SCOPES {
            return Err(AuthorityError::BadRequest(format!("at most {MAX_SCOPES} scopes")));
        }
        if let Some(bad) = self.scopes.iter().find(|s| !is_scope_token(s)) {
            return Err(AuthorityError::BadRequest(format!(
                "scope {bad:?} is not an RFC 6749 scope token (printable ASCII, no space, quote or backslash)"
            )));
        }
        if let Some(jkt) = &self.cnf_jkt
            && b64::decode(jkt).is_none_or(|d| d.len() != 32)
        {
            return Err(AuthorityError::BadRequest(
                "cnf_jkt must be a base64url SHA-256 JWK thumbprint (43 characters)".into(),
            ));
        }
        self.normalized_sans()?;
        Ok(ttl)
    }

    /// The requested SANs, checked and in one spelling (DNS names lowercase, IP addresses
    /// canonical), without repeats.
    pub(super) fn normalized_sans(&self) -> Result<Vec<String>, AuthorityError> {
        if self.sans.len() > MAX_SCOPES {
            return Err(AuthorityError::BadRequest(format!("at most {MAX_SCOPES} sans")));
        }
        let mut out: Vec<String> = Vec::with_capacity(self.sans.len());
        for s in &self.sans {
            let san =
                crate::x509::San::parse(s).map_err(|e| AuthorityError::BadRequest(format!("sans: {e}")))?;
            let plain = match san {
                crate::x509::San::Dns(d) => d,
                crate::x509::San::Ip(ip) => ip.to_string(),
            };
            if !out.contains(&plain) {
                out.push(plain);
            }
        }
        Ok(out)
    }
}

impl Authority {
    /// Validates, signs inside the hardware with the active key, records the token and its
    /// audit entry, and only then returns it. Nothing is recorded for an invalid request;
    /// nothing is returned if recording fails.
    ///
    /// The signing thread hands the signed token straight to the store's writer, so this
    /// task is woken once, when the commit is done (docs/benchmarks-server-cpu.md). The device wait
    /// holds as for every signature: a request whose signature has not been made within it
    /// is answered 503 and its token is neither recorded nor returned.
    pub async fn issue(
        &self,
        who: &Principal,
        req: &IssueRequest,
        remote: &str,
    ) -> Result<Issued, AuthorityError> {
        let started = Instant::now();
        let ttl = req.validate(self.settings.default_ttl, self.settings.max_ttl)?;
        let ring = self.key_ring();
        let (claims, row) = self.claims_for(req, ttl, &who.id, &ring.active.kid)?;
        let input = signing_input(&ring.active.kid, &claims)?;
        let audit = AuditRecord::new(&who.id, "token.issue", &claims.jti, "success", remote);
        let signer = ring.active.signer.clone();
        // announced now, so that the writer holds its batch open for it while it is signed
        let write = self.store.write_queue().announce();
        let (signed, mut token) = oneshot::channel();
        let (reply, written) = oneshot::channel();
        let ticket = self.sign_queue.submit(move |job: &Handoff| {
            let sig = timed_sign(&signer, &input);
            if !job.finish() {
                return;
            }
            match sig {
                Ok(sig) => {
                    let _ = signed.send(Ok(Zeroizing::new(token::jws::assemble(&input, &sig))));
                    write.submit(vec![WriteOp::InsertIssued(row)], audit, reply);
                }
                // `reply` and `write` are dropped unanswered: the caller reads why here
                Err(e) => drop(signed.send(Err(e))),
            }
        })?;
        // The store's bound (PostgreSQL) counts from when the signature was made and the
        // token handed to the writer, right after the job finished; until then the ticket's
        // device wait bounds the request, and a job not finished by its end is given up.
        let finished = ticket.finished();
        let answer = self.store.answer(written, move || finished.at());
        let written = ticket.wait(answer).await?;
        let token = match token.try_recv() {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(e.into()),
            // dropped unrun: its deadline passed in the queue
            Err(_) => return Err(crate::keys::KeyError::Busy(self.sign_queue.wait_ms()).into()),
        };
        written?;
        metrics::counter!("keygate_tokens_issued_total").increment(1);
        metrics::histogram!("keygate_issue_duration_seconds").record(started.elapsed().as_secs_f64());
        Ok(Issued {
            token,
            jti: claims.jti,
            kid: ring.active.kid.clone(),
            expires_at: claims.exp,
        })
    }

    /// The claims of a token for a validated request, with a new jti, and its row to record.
    fn claims_for(
        &self,
        req: &IssueRequest,
        ttl: u64,
        issued_by: &str,
        kid: &str,
    ) -> Result<(Claims, IssuedToken), AuthorityError> {
        let iat = now();
        let jti = new_jti()?;
        let mut scopes: Vec<String> = Vec::new();
        for s in &req.scopes {
            if !scopes.contains(s) {
                scopes.push(s.clone());
            }
        }
        let claims = Claims {
            iss: self.settings.issuer.clone(),
            sub: req.subject.clone(),
            aud: Audience::One(req.audience.clone()),
            iat,
            nbf: iat,
            exp: iat + ttl as i64,
            jti: jti.clone(),
            scope: (!scopes.is_empty()).then(|| scopes.join(" ")),
            cnf: req.cnf_jkt.clone().map(|jkt| Confirmation { jkt }),
            one_time: req.one_time.then_some(true),
            sans: Some(req.normalized_sans()?).filter(|s| !s.is_empty()),
        };
        let row = IssuedToken {
            jti,
            kid: kid.to_owned(),
            sub: claims.sub.clone(),
            aud: req.audience.clone(),
            scopes: claims.scope.clone().unwrap_or_default(),
            iat,
            nbf: iat,
            exp: claims.exp,
            one_time: req.one_time,
            cnf_jkt: req.cnf_jkt.clone(),
            issued_by: issued_by.to_owned(),
        };
        Ok((claims, row))
    }

    /// Signs a token for a validated request inside the hardware with the active key, and
    /// returns it with the row to record. The caller records it (with its audit entry) and
    /// hands the token out only once that is committed.
    pub(super) async fn mint(
        &self,
        req: &IssueRequest,
        ttl: u64,
        issued_by: &str,
    ) -> Result<(Issued, IssuedToken), AuthorityError> {
        let ring = self.key_ring();
        let (claims, row) = self.claims_for(req, ttl, issued_by, &ring.active.kid)?;
        let payload = serde_json::to_vec(&claims).map_err(|e| AuthorityError::Internal(e.to_string()))?;
        let token = Zeroizing::new(
            self.sign_compact(&ring.active, token::TYP_PROVISIONING, &payload)
                .await?,
        );
        let issued = Issued {
            token,
            jti: claims.jti,
            kid: ring.active.kid.clone(),
            expires_at: claims.exp,
        };
        Ok((issued, row))
    }

    /// RFC 7662 introspection from the issuer's own view: no clock leeway, the token must be
    /// ours (signature by a published key, `iss` ours, jti recorded), unexpired, not revoked,
    /// and (if one-time) not yet redeemed.
    pub async fn introspect(&self, token: &str) -> Result<Introspection, AuthorityError> {
        let ring = self.key_ring();
        let Ok(claims) = ring
            .verifier
            .verify_signed::<Claims>(token, token::TYP_PROVISIONING)
        else {
            return Ok(Introspection::default());
        };
        if claims.iss != self.settings.issuer {
            return Ok(Introspection::default());
        }
        let Some((row, status)) = self.store.issued_token(&claims.jti).await? else {
            return Ok(Introspection::default());
        };
        let kid = row.kid.clone();
        let revoked = status.revoked_at.is_some();
        let redeemed = status.redeemed_at.is_some();
        let timely = token::verify::check_times(&claims, now(), 0).is_ok();
        let active = timely && !revoked && !(row.one_time && redeemed);
        Ok(Introspection {
            active,
            details: Some((claims, kid, revoked, redeemed)),
        })
    }
}

/// A new jti: base64url of a 48-bit millisecond timestamp (big-endian) followed by 128
/// random bits, 30 characters. The random part makes it unique and unguessable; the
/// timestamp makes the jtis of one moment share a prefix, so the store's jti index takes a
/// commit's tokens on a few adjacent pages instead of one random page each (the SQLite
/// writer's CPU per issued token fell by a third).
pub(crate) fn new_jti() -> Result<String, AuthorityError> {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut raw = [0u8; 22];
    raw[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    raw[6..].copy_from_slice(&random_bytes::<16>()?);
    Ok(b64::encode(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> IssueRequest {
        IssueRequest {
            subject: "node-1".into(),
            audience: "fleet".into(),
            ..Default::default()
        }
    }

    #[test]
    fn jti_is_time_prefixed_and_random() {
        let (a, b) = (new_jti().unwrap(), new_jti().unwrap());
        assert_eq!(a.len(), 30);
        let raw = b64::decode(&a).unwrap();
        assert_eq!(raw.len(), 22);
        let mut ms = [0u8; 8];
        ms[2..].copy_from_slice(&raw[..6]);
        let age = now() * 1000 - u64::from_be_bytes(ms) as i64;
        // `now()` is whole seconds: the timestamp may be up to 999 ms ahead of it.
        assert!((-1000..60_000).contains(&age), "timestamp {age} ms off");
        // Same millisecond or not, the random 128 bits differ.
        assert_ne!(raw[6..], b64::decode(&b).unwrap()[6..]);
    }

    #[test]
    fn validation() {
        assert_eq!(req().validate(900, 3600).unwrap(), 900);
        let r = IssueRequest {
            ttl_seconds: Some(3601),
            ..req()
        };
        assert!(
            r.validate(900, 3600)
                .unwrap_err()
                .to_string()
                .contains("exceeds the maximum")
        );
        let r = IssueRequest {
            subject: "".into(),
            ..req()
        };
        assert!(r.validate(900, 3600).is_err());
        let r = IssueRequest {
            subject: " x".into(),
            ..req()
        };
        assert!(r.validate(900, 3600).is_err());
        let r = IssueRequest {
            scopes: vec!["a b".into()],
            ..req()
        };
        assert!(r.validate(900, 3600).is_err());
        let r = IssueRequest {
            scopes: vec!["read:x".into()],
            cnf_jkt: Some("x".into()),
            sans: Vec::new(),
            ..req()
        };
        assert!(r.validate(900, 3600).is_err());
        let r = IssueRequest {
            ttl_seconds: Some(0),
            ..req()
        };
        assert!(r.validate(900, 3600).is_err());
    }
}
