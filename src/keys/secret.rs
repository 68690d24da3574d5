//! Where a PIN or auth value comes from: a file or an environment variable named in the
//! configuration, never the configuration text itself or a URI.

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::KeyError;

/// A reference to a secret. Holds only the file path or variable name, never the value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SecretSource {
    /// Read from this file; a single trailing newline is dropped.
    File(std::path::PathBuf),
    /// Read from this environment variable.
    Env(String),
}

impl SecretSource {
    /// Reads the secret. The error names where it looked, never what it found.
    pub fn read(&self) -> Result<SecretString, KeyError> {
        let value = match self {
            SecretSource::File(path) => {
                let mut s = std::fs::read_to_string(path).map_err(|e| KeyError::Secret {
                    what: format!("PIN file {}", path.display()),
                    reason: e.kind().to_string(),
                })?;
                if s.ends_with('\n') {
                    s.pop();
                    if s.ends_with('\r') {
                        s.pop();
                    }
                }
                s
            }
            SecretSource::Env(var) => std::env::var(var).map_err(|_| KeyError::Secret {
                what: format!("PIN variable {var}"),
                reason: "not set or not UTF-8".into(),
            })?,
        };
        if value.is_empty() {
            return Err(KeyError::Secret {
                what: self.describe(),
                reason: "empty".into(),
            });
        }
        Ok(SecretString::from(value))
    }

    /// `file /path` or `variable NAME`, for messages.
    pub fn describe(&self) -> String {
        match self {
            SecretSource::File(p) => format!("PIN file {}", p.display()),
            SecretSource::Env(v) => format!("PIN variable {v}"),
        }
    }
}
