//! The ERROR lines that every request would repeat while the store or the key device is
//! unavailable (the database unreachable, the store's write queue full, the device gone):
//! the `store failed` and `key backend failed` lines of `error.rs`. Each distinct line
//! (message and error text, cut to 256 bytes) is written the first time it occurs in a
//! window of 10 s; its repeats are counted, and when the window ends one line per repeated
//! error says how many more there were (`repeated`, over `seconds`). Past 64 distinct lines
//! in a window (`authority::refusals::MAX_KINDS`) the rest are only counted, in one line
//! "store or key backend failures of other kinds". So these two lines no longer come once
//! per refused request; other lines still do (the access log's `answered`). The writer's
//! `store commit failed` is aggregated the same way, in the store (`store/failures.rs`). Errors that answer 500 are not aggregated: each
//! is logged with its request. Every refusal is counted in `keygate_requests_failed_total`.
//! The aggregation is `authority::Repeats`, as for refusals, with a window of its own.
//! `/readyz`, which anyone may call, writes its WARN lines (`readiness: …`) the same way.

use std::fmt::Display;
use std::sync::LazyLock;
use std::time::Duration;

use tracing::Level;

use crate::authority::{Ended, Repeats};

/// How long the repeats of one error line are counted before their summary line.
const WINDOW: Duration = Duration::from_secs(10);

/// (level, message, error text) of the lines of this window.
static FAILURES: LazyLock<Repeats<(Level, &'static str, String)>> = LazyLock::new(|| Repeats::new(WINDOW));

/// Logs `message` with `error` at ERROR when it is the first such line in the window;
/// counts it otherwise.
pub(super) fn failure(message: &'static str, error: &dyn Display) {
    if FAILURES.admit((Level::ERROR, message, kind_text(error))) {
        tracing::error!(error = %error, "{message}");
    }
}

/// As [`failure`], at WARN (a readiness probe that fails).
pub(super) fn warning(message: &'static str, error: &dyn Display) {
    if FAILURES.admit((Level::WARN, message, kind_text(error))) {
        tracing::warn!(error = %error, "{message}");
    }
}

/// Longest error text kept as (part of) a kind.
const MAX_TEXT: usize = 256;

/// The error's text as a kind: its first [`MAX_TEXT`] bytes (on a character boundary).
fn kind_text(error: &dyn Display) -> String {
    let mut text = error.to_string();
    if text.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Writes one line per error line repeated in a window that has ended (with `force`: the
/// current one, at shutdown). The periodic tasks call this every second.
pub fn flush_failure_lines(force: bool) {
    let Some(Ended {
        repeated,
        overflow,
        secs,
    }) = FAILURES.take(force)
    else {
        return;
    };
    for ((level, message, error), n) in repeated {
        if level == Level::WARN {
            tracing::warn!(error = %error, repeated = n, seconds = secs, "{message}");
        } else {
            tracing::error!(error = %error, repeated = n, seconds = secs, "{message}");
        }
    }
    if overflow > 0 {
        tracing::error!(
            repeated = overflow,
            seconds = secs,
            "store or key backend failures of other kinds"
        );
    }
}

/// How many repeats of `message` with `error` the current window has counted (None: none
/// of them logged in it).
#[cfg(test)]
pub(super) fn repeats_of(message: &'static str, error: &dyn Display) -> Option<u64> {
    FAILURES.repeats_of(&(Level::ERROR, message, kind_text(error)))
}

/// As [`repeats_of`], for the lines of [`warning`].
#[cfg(test)]
pub(super) fn warning_repeats_of(message: &'static str, error: &dyn Display) -> Option<u64> {
    FAILURES.repeats_of(&(Level::WARN, message, kind_text(error)))
}
