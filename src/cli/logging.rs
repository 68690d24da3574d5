//! The process log: `tracing` to stderr, one event per line, whatever a client sent.
//!
//! Values that came from a request (an id in a path, an error naming it) can hold line
//! breaks, terminal escapes or an API-token secret pasted in the wrong place. Rather than
//! trusting every log call site to escape them, every formatted event passes through
//! [`sanitize`] on its way out: control characters inside a line are escaped, so an event
//! can never forge a second line, and anything shaped like a keygate API-token secret is cut
//! to its prefix.

use std::borrow::Cow;
use std::io::{IsTerminal, Write};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::authority::API_TOKEN_PREFIX as PREFIX;

/// Shortest run after `kg_` treated as a secret (a secret has 43; ids and words are shorter).
const SECRET_MIN: usize = 16;

/// Installs the global subscriber: `KEYGATE_LOG` (an `EnvFilter`, else `default`),
/// `KEYGATE_LOG_FORMAT=json` for JSON lines.
pub fn init(default: &str) {
    let filter = EnvFilter::try_from_env("KEYGATE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(SafeStderr { ansi })
        .with_ansi(ansi);
    if std::env::var("KEYGATE_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// stderr through [`sanitize`]. tracing-subscriber formats each event into one buffer and
/// writes it with one `write_all`, so one `write` is one event.
#[derive(Clone, Copy)]
struct SafeStderr {
    /// Colours are on (a terminal): the formatter's own escape sequences pass.
    ansi: bool,
}

impl Write for SafeStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr()
            .lock()
            .write_all(sanitize(&text, self.ansi).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for SafeStderr {
    type Writer = SafeStderr;

    fn make_writer(&'a self) -> SafeStderr {
        *self
    }
}

/// One log event as it may be written: control characters other than a final newline
/// escaped (`\n`, `\r`, `\u{1b}`; escape characters kept when `ansi`), and API-token
/// secrets (`kg_` and 16 or more base64url characters) shortened to `kg_…`.
pub fn sanitize(event: &str, ansi: bool) -> Cow<'_, str> {
    let body = event.strip_suffix('\n').unwrap_or(event);
    let clean = !body.contains(PREFIX) && !body.chars().any(|c| c.is_control() && !(ansi && c == '\x1b'));
    if clean {
        return Cow::Borrowed(event);
    }
    let mut out = String::with_capacity(event.len() + 16);
    let mut rest = body;
    while let Some(c) = rest.chars().next() {
        if rest.starts_with(PREFIX) {
            let run = rest[PREFIX.len()..]
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
                .count();
            if run >= SECRET_MIN {
                out.push_str(PREFIX);
                out.push('…');
                rest = &rest[PREFIX.len() + run..];
                continue;
            }
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\x1b' if ansi => out.push(c),
            c if c.is_control() => out.push_str(&c.escape_unicode().to_string()),
            c => out.push(c),
        }
        rest = &rest[c.len_utf8()..];
    }
    if body.len() < event.len() {
        out.push('\n');
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_stays_one_line() {
        let s = sanitize("a\nb\r\nc\u{1b}[31m\n", false);
        assert_eq!(s, "a\\nb\\r\\nc\\u{1b}[31m\n");
        assert_eq!(s.matches('\n').count(), 1);
        // colours of the formatter itself pass when they are on
        assert_eq!(sanitize("\u{1b}[2mx\u{1b}[0m\n", true), "\u{1b}[2mx\u{1b}[0m\n");
        assert_eq!(sanitize("x\u{7}y", true), "x\\u{7}y");
    }

    #[test]
    fn secrets_are_cut_and_clean_lines_borrowed() {
        let secret = format!("kg_{}", "A1b2-_".repeat(7));
        let line = format!("api token {secret} not found; tokens start kg_ and kg_short\n");
        let s = sanitize(&line, false);
        assert_eq!(s, "api token kg_… not found; tokens start kg_ and kg_short\n");
        assert!(matches!(sanitize("plain line\n", false), Cow::Borrowed(_)));
        assert_eq!(sanitize("é kg_", false), "é kg_");
    }
}
