//! Store URLs: `sqlite://path` or `postgres://user@host:port/db`, with the password (if any)
//! hidden in `Debug`, `Display` and every error.

use std::fmt;

use super::StoreError;

/// Which database a store URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// One file, one serving process (the embedded default).
    Sqlite,
    /// One database shared by any number of replicas.
    Postgres,
}

impl StoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgres => "postgres",
        }
    }
}

/// A parsed store URL. The text is kept whole for the driver; only [`StoreUrl::redacted`]
/// is ever shown.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUrl {
    kind: StoreKind,
    text: String,
}

impl StoreUrl {
    /// Parses `sqlite://…` (also `sqlite:…`) or `postgres://…` / `postgresql://…`.
    pub fn parse(text: &str) -> Result<StoreUrl, StoreError> {
        let kind = if text.starts_with("sqlite:") {
            StoreKind::Sqlite
        } else if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            StoreKind::Postgres
        } else {
            return Err(StoreError::Open {
                url: redact(text),
                reason: "a store URL starts with sqlite:// or postgres://".into(),
            });
        };
        Ok(StoreUrl {
            kind,
            text: text.to_owned(),
        })
    }

    pub fn kind(&self) -> StoreKind {
        self.kind
    }

    /// The URL as given, password included: for the driver only.
    pub(super) fn expose(&self) -> &str {
        &self.text
    }

    /// The URL as given, password included, for tools that open a store of their own
    /// (`keygate bench` makes a database and points a configuration at it). Never log it.
    pub fn expose_for_tools(&self) -> String {
        self.text.clone()
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact(&self.text)
    }

    /// The SQLite file path (without query parameters), for a SQLite URL.
    pub fn sqlite_path(&self) -> Option<&str> {
        if self.kind != StoreKind::Sqlite {
            return None;
        }
        let rest = self.text.trim_start_matches("sqlite:").trim_start_matches("//");
        Some(rest.split('?').next().unwrap_or(rest))
    }

    /// The same server with database `db` (PostgreSQL URLs: the path is replaced).
    pub fn with_database(&self, db: &str) -> StoreUrl {
        let (head, query) = match self.text.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (self.text.as_str(), None),
        };
        let scheme_end = head.find("://").map_or(0, |i| i + 3);
        let base = match head[scheme_end..].find('/') {
            Some(i) => &head[..scheme_end + i],
            None => head,
        };
        let text = match query {
            Some(q) => format!("{base}/{db}?{q}"),
            None => format!("{base}/{db}"),
        };
        StoreUrl {
            kind: self.kind,
            text,
        }
    }

    /// On SQLite, makes sure no other `keygate serve` uses this file (an exclusive lock on
    /// `<file>.serve.lock`, held while the returned guard lives): the API-token cache and
    /// the revocation feed of one process would not see another's writes at once. Several
    /// replicas run on PostgreSQL. A no-op there. Taken before the store is opened, so a
    /// second `serve` writes nothing before it refuses.
    pub fn lock_single_server(&self) -> Result<Option<std::fs::File>, StoreError> {
        let Some(path) = self.sqlite_path() else {
            return Ok(None);
        };
        let lock_path = format!("{path}.serve.lock");
        let open_err = |reason: String| StoreError::Open {
            url: self.redacted(),
            reason,
        };
        let mut o = std::fs::OpenOptions::new();
        o.create(true).truncate(false).write(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        let f = o
            .open(&lock_path)
            .map_err(|e| open_err(format!("cannot open {lock_path}: {e}")))?;
        match f.try_lock() {
            Ok(()) => Ok(Some(f)),
            Err(std::fs::TryLockError::WouldBlock) => Err(open_err(
                "another keygate serve uses this SQLite database; run several replicas on PostgreSQL (docs/adr/0011-replicas-on-postgresql.md)".into(),
            )),
            Err(std::fs::TryLockError::Error(e)) => Err(open_err(format!("cannot lock {lock_path}: {e}"))),
        }
    }

    /// True when the URL itself carries a password.
    pub fn has_password(&self) -> bool {
        redact(&self.text) != self.text
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StoreUrl").field(&self.redacted()).finish()
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Replaces the password of `scheme://user:password@host…` and any `password=` query
/// parameter with `***`. Anything else is kept, so the operator still sees which server.
pub fn redact(url: &str) -> String {
    let mut out = url.to_owned();
    // The user information ends at the LAST '@': a password may hold '/', '?', '#' or '@'
    // unencoded. (A URL without one but with an '@' in its query is over-redacted: it is
    // never under-redacted.)
    if let Some(scheme_end) = out.find("://") {
        let auth_start = scheme_end + 3;
        if let Some(at) = out.rfind('@').filter(|&a| a >= auth_start)
            && let Some(colon) = out[auth_start..at].find(':')
        {
            out.replace_range(auth_start + colon + 1..at, "***");
        }
    }
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect();
        out = format!("{head}{}", query.join("&"));
    }
    out
}

/// `text` with every occurrence of the secret parts of `url` hidden (driver errors sometimes
/// repeat what they were given).
pub(super) fn scrub(text: &str, url: &StoreUrl) -> String {
    let raw = url.expose();
    if raw == url.redacted() {
        return text.to_owned();
    }
    text.replace(raw, &url.redacted())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://kg:s3cret@db.example:5432/keygate"),
            "postgres://kg:***@db.example:5432/keygate"
        );
        assert_eq!(
            redact("postgres://kg@db:5432/keygate?sslmode=verify-full&password=s3cret"),
            "postgres://kg@db:5432/keygate?sslmode=verify-full&password=***"
        );
        assert_eq!(redact("postgres://kg@db/keygate"), "postgres://kg@db/keygate");
        // an @, / or ? in the password does not leak any part of it
        assert_eq!(redact("postgres://kg:a@b@db/x"), "postgres://kg:***@db/x");
        assert_eq!(redact("postgres://kg:ab/cd@db/x"), "postgres://kg:***@db/x");
        assert_eq!(
            redact("postgres://kg:a?b#c@db/x?sslmode=require"),
            "postgres://kg:***@db/x?sslmode=require"
        );
        let e = StoreUrl::parse("postgres://kg:ab/cd@db/x").unwrap().to_string();
        assert!(!e.contains("ab/cd") && !e.contains("cd@"), "{e}");
        let u = StoreUrl::parse("postgresql://kg:s3cret@db/keygate").unwrap();
        assert!(!format!("{u:?} {u}").contains("s3cret"));
        assert!(u.has_password());
        assert_eq!(u.kind(), StoreKind::Postgres);
    }

    #[test]
    fn another_database_on_the_same_server() {
        let u = StoreUrl::parse("postgres://kg:pw@db:5432/postgres?sslmode=require").unwrap();
        assert_eq!(
            u.with_database("bench").expose(),
            "postgres://kg:pw@db:5432/bench?sslmode=require"
        );
        let u = StoreUrl::parse("postgres://db").unwrap();
        assert_eq!(u.with_database("x").expose(), "postgres://db/x");
    }

    #[test]
    fn kinds_and_paths() {
        let u = StoreUrl::parse("sqlite:///var/lib/keygate/keygate.db?mode=ro").unwrap();
        assert_eq!(u.kind(), StoreKind::Sqlite);
        assert_eq!(u.sqlite_path(), Some("/var/lib/keygate/keygate.db"));
        assert_eq!(
            StoreUrl::parse("sqlite://keygate-data/keygate.db")
                .unwrap()
                .sqlite_path(),
            Some("keygate-data/keygate.db")
        );
        let e = StoreUrl::parse("mysql://root:pw@db/x").unwrap_err().to_string();
        assert!(
            e.contains("sqlite:// or postgres://") && !e.contains("pw@"),
            "{e}"
        );
    }
}
