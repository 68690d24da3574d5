//! The ERROR lines that every request would repeat while the store or the key device is
//! unavailable (the database unreachable, the store's write queue full, the device gone).
//! Each distinct line (message and error text) is written the first time it occurs in a
//! window of 10 s; its repeats are counted, and when the window ends one line per repeated
//! error says how many more there were (`repeated`, over `seconds`). An outage thus writes a
//! few ERROR lines every 10 s instead of one per refused request (the access log's
//! `answered` line stays one per request), and the cause of each kind of
//! failure still reaches the log at once. Errors that answer 500 are not aggregated: each
//! is logged with its request. Every refusal is counted in `keygate_requests_failed_total`.
//! The windows are those of `authority::Repeats`, as for aggregated refusals.

use std::fmt::Display;
use std::sync::LazyLock;
use std::time::Duration;

use crate::authority::{Ended, Repeats};

/// How long the repeats of one error line are counted before their summary line.
const WINDOW: Duration = Duration::from_secs(10);

/// (message, error text) of the lines of this window.
static FAILURES: LazyLock<Repeats<(&'static str, String)>> = LazyLock::new(|| Repeats::new(WINDOW));

/// Logs `message` with `error` at ERROR when it is the first such line in the window;
/// counts it otherwise.
pub(super) fn failure(message: &'static str, error: &dyn Display) {
    let text = error.to_string();
    if FAILURES.admit((message, text.clone())) {
        tracing::error!(error = %text, "{message}");
    }
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
    for ((message, error), n) in repeated {
        tracing::error!(error = %error, repeated = n, seconds = secs, "{message}");
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
pub(super) fn repeats_of(message: &'static str, error: &str) -> Option<u64> {
    FAILURES.repeats_of(&(message, error.to_owned()))
}
