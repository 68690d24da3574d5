//! Token initialisation for the embedded SoftHSM2 default (`keygate init`), done through
//! PKCS#11 (`C_InitToken`, `C_InitPIN`) so no PIN ever appears on a command line.

use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

use super::super::KeyError;
use super::{Pkcs11Config, ck_error, context, find_slot_locked};

/// Initialises a token with `label` in the first free slot, unless a token with that label
/// already exists (then nothing happens and `false` is returned). Sets the user PIN.
pub fn init_token(cfg: &Pkcs11Config, so_pin: &AuthPin, user_pin: &AuthPin) -> Result<bool, KeyError> {
    let label = cfg
        .token_label
        .as_deref()
        .ok_or_else(|| KeyError::Config("token initialisation needs token_label".into()))?;
    // Tokens appear in the one free slot and a new free slot appears after: initialising two
    // at once in one process would race for it.
    let _guard = super::SLOTS
        .lock()
        .map_err(|_| KeyError::Config("token init lock poisoned".into()))?;
    let ctx = context(&cfg.module)?;
    match find_slot_locked(&ctx, cfg) {
        Ok(_) => return Ok(false),
        Err(KeyError::TokenNotFound(_)) => {}
        Err(e) => return Err(e),
    }
    let mut free = None;
    for slot in ctx.get_slots_with_token().map_err(ck_error)? {
        if !ctx.get_token_info(slot).map_err(ck_error)?.token_initialized() {
            free = Some(slot);
            break;
        }
    }
    let slot = free.ok_or_else(|| KeyError::Config("no free slot to initialise a token in".into()))?;
    ctx.init_token(slot, so_pin, label).map_err(ck_error)?;
    let session = ctx.open_rw_session(slot).map_err(ck_error)?;
    session.login(UserType::So, Some(so_pin)).map_err(ck_error)?;
    session.init_pin(user_pin).map_err(ck_error)?;
    session.logout().map_err(ck_error)?;
    Ok(true)
}
