//! `keygate config check [FILE]`: validates a configuration and says what `serve` would use,
//! without opening the device or the database.

use crate::config::{BackendKind, Config};

/// Prints the settings in force (secrets never: a PIN or password shows where it is read
/// from) and warnings; the caller has already loaded (and so validated) `config`.
pub fn report(config: &Config, file: Option<&std::path::Path>) -> anyhow::Result<()> {
    let mut warnings = Vec::new();
    let source = match file {
        Some(f) => f.display().to_string(),
        None => "none (embedded defaults)".into(),
    };
    let mut lines = vec![("configuration file", source)];
    lines.push(("data folder", config.data_dir.display().to_string()));
    match config.backend {
        BackendKind::Pkcs11 if config.is_embedded() => {
            lines.push((
                "key backend",
                format!(
                    "embedded SoftHSM2 token under {} (a simulator: development only)",
                    config.data_dir.join("softhsm-tokens").display()
                ),
            ));
            warnings.push("the embedded SoftHSM2 token keeps its PIN next to the keys; use an HSM or a TPM in production (hsm-config/)".to_owned());
        }
        BackendKind::Pkcs11 => {
            let p = config.pkcs11();
            lines.push((
                "key backend",
                format!(
                    "PKCS#11 module {}, token {}, {} sessions, {}",
                    p.module.display(),
                    p.token_description(),
                    p.sessions,
                    p.pin.describe()
                ),
            ));
            if !p.module.exists() {
                warnings.push(format!(
                    "the PKCS#11 module {} does not exist here",
                    p.module.display()
                ));
            }
        }
        BackendKind::Tpm => {
            let tcti = config.tpm.as_ref().map(|t| t.tcti.clone()).unwrap_or_default();
            lines.push(("key backend", format!("TPM 2.0 at {tcti}")));
        }
    }
    let store = config.store_options()?;
    lines.push(("store", store.url.redacted()));
    if let Some(path) = store.url.sqlite_path()
        && !std::path::Path::new(path).exists()
    {
        warnings.push(format!(
            "no database at {path} yet: run `keygate init` (the embedded defaults do it on first serve)"
        ));
    }
    lines.push(("listen", config.listen.to_string()));
    let base = config.public_base_url();
    lines.push(("public URL", base.clone()));
    lines.push(("issuer", config.issuer()));
    lines.push((
        "TLS",
        match &config.tls {
            Some(t) => format!(
                "on: {} / {}{}",
                t.cert_file.display(),
                t.key_file.display(),
                t.client_ca_file
                    .as_ref()
                    .map(|c| format!(", client certificates from {}", c.display()))
                    .unwrap_or_default()
            ),
            None => "off (plain HTTP)".into(),
        },
    ));
    if config.tls.is_none() && !config.listen.ip().is_loopback() {
        warnings.push(format!(
            "plain HTTP on {}, a non-loopback address: tokens cross the network in clear; set [tls] or keep a TLS proxy in front",
            config.listen
        ));
    }
    if config.issuer() != base {
        warnings.push(format!(
            "issuer {:?} is not the public URL {base:?}: OIDC clients that discover from the issuer URL will not find /.well-known/openid-configuration",
            config.issuer()
        ));
    }
    lines.push((
        "enrollment",
        if config.enroll_configured {
            let dir = &config.enroll.ca_dir;
            if !dir.is_dir() {
                warnings.push(format!(
                    "the TPM manufacturer CA folder {} does not exist: every EK certificate will be refused",
                    dir.display()
                ));
            }
            match config.enroll.mode {
                crate::config::EnrollMode::EkCa => {
                    format!("ek-ca mode, manufacturer CAs in {}", dir.display())
                }
                crate::config::EnrollMode::Allowlist => {
                    "allowlist mode (machines registered by an operator)".into()
                }
            }
        } else {
            "not set up (no [enroll], KEYGATE_ENROLL_*): every EK certificate is refused".into()
        },
    ));
    for (k, v) in lines {
        println!("{k:<20} {v}");
    }
    for w in &warnings {
        println!("warning: {w}");
    }
    println!(
        "configuration is valid{}",
        if warnings.is_empty() {
            ""
        } else {
            " (see the warnings)"
        }
    );
    Ok(())
}
