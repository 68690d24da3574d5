//! A bounded pool of logged-in PKCS#11 sessions with recovery.
//!
//! A `Session` is `Send` but not `Sync` and runs one operation at a time, so each worker
//! borrows one. Sessions are opened lazily up to the configured size. When the device says a
//! session is gone (`CKR_SESSION_HANDLE_INVALID`, `CKR_SESSION_CLOSED`, `CKR_DEVICE_REMOVED`,
//! `CKR_TOKEN_NOT_PRESENT`, `CKR_DEVICE_ERROR`) every idle session is dropped and the call
//! is retried once on a fresh one; when it says the application was logged out (`CKR_USER_NOT_LOGGED_IN`) it logs in
//! again and retries once.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use super::super::KeyError;
use super::ck_error;

pub(super) struct SessionPool {
    ctx: Pkcs11,
    slot: Slot,
    pin: AuthPin,
    max: usize,
    timeout: Duration,
    state: Mutex<PoolState>,
    freed: Condvar,
}

struct PoolState {
    idle: Vec<Session>,
    open: usize,
}

/// What a failed call means for the session it ran on.
enum Recovery {
    /// The session is dead: discard it and retry on a new one.
    Reopen,
    /// The application was logged out: log in and retry.
    Relogin,
    /// Not a session problem: report it.
    None,
}

fn recovery_for(e: &CkError) -> Recovery {
    match e {
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::DeviceError,
            _,
        ) => Recovery::Reopen,
        CkError::Pkcs11(RvError::UserNotLoggedIn, _) => Recovery::Relogin,
        _ => Recovery::None,
    }
}

impl SessionPool {
    pub(super) fn limits(&self) -> (usize, Duration) {
        (self.max, self.timeout)
    }

    pub(super) fn slot(&self) -> Slot {
        self.slot
    }

    pub(super) fn new(ctx: Pkcs11, slot: Slot, pin: AuthPin, max: usize, timeout: Duration) -> Self {
        SessionPool {
            ctx,
            slot,
            pin,
            max: max.max(1),
            timeout,
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
        }
    }

    /// Opens a read-write session and makes sure the application is logged in.
    fn open(&self) -> Result<Session, KeyError> {
        let s = self.ctx.open_rw_session(self.slot).map_err(ck_error)?;
        self.login(&s)?;
        Ok(s)
    }

    fn login(&self, s: &Session) -> Result<(), KeyError> {
        match s.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(CkError::Pkcs11(rv, _)) if is_auth_failure(rv) => Err(KeyError::Login(rv_name(rv))),
            Err(e) => Err(ck_error(e)),
        }
    }

    /// Opens and logs in the first session now, so configuration errors (wrong PIN) show at
    /// startup rather than at the first request.
    pub(super) fn warm_up(&self) -> Result<(), KeyError> {
        let s = self.open()?;
        let mut st = self.state.lock().map_err(|_| poisoned())?;
        st.open += 1;
        st.idle.push(s);
        Ok(())
    }

    fn acquire(&self) -> Result<Session, KeyError> {
        let deadline = Instant::now() + self.timeout;
        let mut st = self.state.lock().map_err(|_| poisoned())?;
        loop {
            if let Some(s) = st.idle.pop() {
                return Ok(s);
            }
            if st.open < self.max {
                st.open += 1;
                drop(st);
                return self.open().inspect_err(|_| self.forget_one());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(KeyError::Busy(self.timeout.as_millis() as u64));
            }
            st = self.freed.wait_timeout(st, left).map_err(|_| poisoned())?.0;
        }
    }

    fn release(&self, s: Session) {
        if let Ok(mut st) = self.state.lock() {
            st.idle.push(s);
        }
        self.freed.notify_one();
    }

    fn forget_one(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.open = st.open.saturating_sub(1);
        }
        self.freed.notify_one();
    }

    /// Runs `op` on a pooled session, with one retry after session recovery.
    pub(super) fn run<T>(&self, mut op: impl FnMut(&Session) -> Result<T, CkError>) -> Result<T, KeyError> {
        let mut retried = false;
        loop {
            let s = self.acquire()?;
            match op(&s) {
                Ok(v) => {
                    self.release(s);
                    return Ok(v);
                }
                Err(e) => match (recovery_for(&e), retried) {
                    (Recovery::Reopen, false) => {
                        // When the device dropped one session it has usually dropped them all
                        // (restart, failover): discard every idle one, retry on a fresh one.
                        tracing::warn!(error = %ck_error(e), "PKCS#11 session lost; reopening");
                        drop(s);
                        self.forget_one();
                        self.close_idle();
                    }
                    (Recovery::Relogin, false) => {
                        tracing::warn!("PKCS#11 application logged out; logging in again");
                        let r = self.login(&s);
                        self.release(s);
                        r?;
                    }
                    (Recovery::Reopen, true) => {
                        drop(s);
                        self.forget_one();
                        return Err(ck_error(e));
                    }
                    _ => {
                        self.release(s);
                        return Err(ck_error(e));
                    }
                },
            }
            retried = true;
        }
    }

    /// Drops every idle session (they are reopened on demand).
    pub(super) fn close_idle(&self) {
        if let Ok(mut st) = self.state.lock() {
            let n = st.idle.len();
            st.idle.clear();
            st.open -= n;
        }
    }
}

fn poisoned() -> KeyError {
    KeyError::Config("session pool lock poisoned".into())
}

pub(super) fn is_auth_failure(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::PinIncorrect
            | RvError::PinLocked
            | RvError::PinInvalid
            | RvError::PinLenRange
            | RvError::PinExpired
    )
}

/// `PinIncorrect` → `CKR_PIN_INCORRECT`: the name an operator looks up in the standard.
pub fn rv_name(rv: RvError) -> String {
    let camel = format!("{rv:?}");
    let mut out = String::from("CKR_");
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}
