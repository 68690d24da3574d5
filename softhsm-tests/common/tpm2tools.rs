//! Stock tpm2-tools as the client side of attestation, against a swtpm: the EK, AKs,
//! ActivateCredential with the EK's policy session, quotes. Files live in a folder of the
//! test's own.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use keygate::keys::tpm::ek::ek_policy::{POLICY_A_SHA384, POLICY_C_SHA384};

/// Runs a tool (`args[0]`) in `dir` on the TPM `tcti`, then flushes transient objects:
/// swtpm has no resource manager.
pub fn tool(tcti: &str, dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .env("TPM2TOOLS_TCTI", tcti)
        .output()
        .unwrap();
    let _ = Command::new("tpm2_flushcontext")
        .arg("-t")
        .env("TPM2TOOLS_TCTI", tcti)
        .output();
    out
}

pub fn ok(out: Output) -> Output {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Runs `tpm2_activatecredential` on `blob` (AK `ak.ctx`, EK `ek.ctx`) with the policy
/// session of an EK made by `tpm2_createek -G <ek_alg>`; the recovered secret. `rsa` and
/// `ecc` need PolicySecret(endorsement) in a SHA-256 session; `ecc384` a SHA-384 session and
/// the PolicyOR of the high-range templates.
pub fn activate_with(tcti: &str, dir: &Path, blob: &[u8], ek_alg: &str) -> Option<Vec<u8>> {
    std::fs::write(dir.join("cred.blob"), blob).unwrap();
    let _ = std::fs::remove_file(dir.join("secret.out"));
    let high = ek_alg == "ecc384";
    let hash = if high { "sha384" } else { "sha256" };
    // The session must survive until activatecredential: no flush in between.
    let run = |args: &[&str]| {
        ok(Command::new(args[0])
            .args(&args[1..])
            .current_dir(dir)
            .env("TPM2TOOLS_TCTI", tcti)
            .output()
            .unwrap())
    };
    run(&[
        "tpm2_startauthsession",
        "--policy-session",
        "-g",
        hash,
        "-S",
        "s.ctx",
    ]);
    run(&["tpm2_policysecret", "-S", "s.ctx", "-c", "e"]);
    if high {
        std::fs::write(dir.join("policy_a"), hex::decode(POLICY_A_SHA384).unwrap()).unwrap();
        std::fs::write(dir.join("policy_c"), hex::decode(POLICY_C_SHA384).unwrap()).unwrap();
        run(&["tpm2_policyor", "-S", "s.ctx", "-l", "sha384:policy_a,policy_c"]);
    }
    let out = Command::new("tpm2_activatecredential")
        .args([
            "-c",
            "ak.ctx",
            "-C",
            "ek.ctx",
            "-i",
            "cred.blob",
            "-o",
            "secret.out",
            "-P",
            "session:s.ctx",
        ])
        .current_dir(dir)
        .env("TPM2TOOLS_TCTI", tcti)
        .output()
        .unwrap();
    let _ = tool(tcti, dir, &["tpm2_flushcontext", "s.ctx"]);
    out.status
        .success()
        .then(|| std::fs::read(dir.join("secret.out")).unwrap())
}

/// `tpm2_createak` under the EK: an ECDSA P-256 AK in `<stem>.ctx`, `.pub` (TPM2B_PUBLIC),
/// `.name` and `.priv`.
pub fn create_ak(tcti: &str, dir: &Path, stem: &str) {
    let f = |ext: &str| format!("{stem}.{ext}");
    let (ctx, public, name, private) = (f("ctx"), f("pub"), f("name"), f("priv"));
    ok(tool(
        tcti,
        dir,
        &[
            "tpm2_createak",
            "-C",
            "ek.ctx",
            "-c",
            &ctx,
            "-G",
            "ecc",
            "-g",
            "sha256",
            "-s",
            "ecdsa",
            "-u",
            &public,
            "-n",
            &name,
            "-r",
            &private,
        ],
    ));
}

/// `tpm2_quote` by AK `<stem>.ctx` in `dir` over `selection` (like `sha256:0,1,2`) with
/// `nonce`: (TPMS_ATTEST, TPMT_SIGNATURE, the quoted PCR values by index as hex).
pub fn quote(
    tcti: &str,
    dir: &Path,
    stem: &str,
    nonce: &[u8],
    selection: &str,
) -> (Vec<u8>, Vec<u8>, BTreeMap<String, String>) {
    let ctx = format!("{stem}.ctx");
    let nonce = hex::encode(nonce);
    ok(tool(
        tcti,
        dir,
        &[
            "tpm2_quote",
            "-c",
            &ctx,
            "-l",
            selection,
            "-q",
            &nonce,
            "-m",
            "quote.msg",
            "-s",
            "quote.sig",
            "-o",
            "quote.pcrs",
            "-F",
            "values",
            "-g",
            "sha256",
        ],
    ));
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let values = read("quote.pcrs");
    let (_, list) = selection.split_once(':').unwrap();
    let size = values.len() / list.split(',').count();
    let pcrs = list
        .split(',')
        .zip(values.chunks(size))
        .map(|(i, v)| (i.to_owned(), hex::encode(v)))
        .collect();
    (read("quote.msg"), read("quote.sig"), pcrs)
}

/// A tpm2-tools client on one TPM, working in its own folder.
pub struct Client {
    pub tcti: String,
    pub dir: tempfile::TempDir,
    /// `tpm2_createek -G` value of the EK in use.
    pub ek_alg: String,
}

impl Client {
    pub fn new(tcti: &str) -> Client {
        Client {
            tcti: tcti.to_owned(),
            dir: tempfile::tempdir().unwrap(),
            ek_alg: "rsa".into(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path().join(file)).unwrap()
    }

    /// Creates the EK (`rsa`, `ecc` for P-256, `ecc384`) into ek.ctx; its TPM2B_PUBLIC.
    pub fn create_ek(&mut self, alg: &str) -> Vec<u8> {
        ok(tool(
            &self.tcti,
            self.path(),
            &[
                "tpm2_createek",
                "-c",
                "ek.ctx",
                "-G",
                alg,
                "-u",
                "ek.pub",
                "-f",
                "tss",
            ],
        ));
        self.ek_alg = alg.into();
        self.read("ek.pub")
    }

    /// The EK certificate in NV for the current EK, if the TPM has one.
    pub fn ek_certificate(&self) -> Option<Vec<u8>> {
        let index = match self.ek_alg.as_str() {
            "rsa" => "0x01c00002",
            "ecc384" => "0x01c00016",
            _ => "0x01c0000a",
        };
        let out = tool(&self.tcti, self.path(), &["tpm2_nvread", index, "-o", "ek.crt"]);
        out.status.success().then(|| self.read("ek.crt"))
    }

    /// A new AK `<stem>` under the EK; its TPM2B_PUBLIC.
    pub fn create_ak(&self, stem: &str) -> Vec<u8> {
        create_ak(&self.tcti, self.path(), stem);
        self.read(&format!("{stem}.pub"))
    }

    /// ActivateCredential of a `tpm2_activatecredential -i` file with the AK `ak`.
    pub fn activate(&self, blob: &[u8]) -> Option<Vec<u8>> {
        activate_with(&self.tcti, self.path(), blob, &self.ek_alg)
    }

    /// A quote by AK `<stem>` over `selection` (like `sha256:0,1,2`) with `nonce`:
    /// (TPMS_ATTEST, TPMT_SIGNATURE, PCR values by index as hex).
    pub fn quote(
        &self,
        stem: &str,
        nonce: &[u8],
        selection: &str,
    ) -> (Vec<u8>, Vec<u8>, BTreeMap<String, String>) {
        quote(&self.tcti, self.path(), stem, nonce, selection)
    }

    /// Extends PCR `index` of the sha256 bank (a changed boot state).
    pub fn extend(&self, index: u32) {
        let arg = format!("{index}:sha256={}", "ab".repeat(32));
        ok(tool(&self.tcti, self.path(), &["tpm2_pcrextend", &arg]));
    }
}
