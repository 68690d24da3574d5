//! Throwaway X.509 material made with openssl: CAs and the certificates they sign.

use std::path::{Path, PathBuf};

/// `-newkey` arguments for a P-256 key without a passphrase.
const P256: [&str; 5] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];

/// A self-signed CA in `dir`: `{name}.key` and `{name}.pem`.
pub fn ca(dir: &Path, name: &str) -> PathBuf {
    let (key, pem, subj) = (
        format!("{name}.key"),
        format!("{name}.pem"),
        format!("/CN=keygate test {name}"),
    );
    let mut args = vec!["req", "-x509"];
    args.extend(P256);
    args.extend(["-keyout", &key, "-out", &pem, "-days", "2", "-subj", &subj]);
    super::openssl(dir, &args);
    dir.join(pem)
}

/// A certificate for `cn` signed by the CA `ca` (made by [`ca`] in `dir`), with the
/// extensions `ext` (openssl extfile lines): `{name}.key` and `{name}.crt`.
pub fn issue(dir: &Path, ca: &str, name: &str, cn: &str, ext: &str) -> (PathBuf, PathBuf) {
    let (key, csr, crt, extfile) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
        format!("{name}.ext"),
    );
    let subj = format!("/CN={cn}");
    let mut args = vec!["req", "-new"];
    args.extend(P256);
    args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
    super::openssl(dir, &args);
    std::fs::write(dir.join(&extfile), ext).unwrap();
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    super::openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            &extfile,
        ],
    );
    (dir.join(crt), dir.join(key))
}

/// openssl extfile lines of a server certificate for 127.0.0.1 and localhost.
pub const SERVER_EXT: &str = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n";
/// openssl extfile lines of a client certificate.
pub const CLIENT_EXT: &str = "extendedKeyUsage=clientAuth\n";
