//! `keygate enroll`: the built-in enrollment client (the HTTP contract, "Attestation-gated
//! enrollment"). The TPM work (`enroll_tpm.rs`) runs on a blocking thread of its own, which
//! also drives the two HTTP calls, so one tss-esapi `Context` serves the whole exchange.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use clap::Args;
use serde_json::{Value, json};

use super::enroll_tpm::{EkKind, Tpm};

#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// Base URL of the keygate server.
    #[arg(long, env = "KEYGATE_ADDR")]
    pub server: String,
    /// The TPM: device:/dev/tpmrm0, swtpm:host=H,port=P, tabrmd, ...
    #[arg(long, env = "TPM2TOOLS_TCTI", default_value = "device:/dev/tpmrm0")]
    pub tcti: String,
    /// Which EK, from the TCG EK Credential Profile templates.
    #[arg(long, value_enum, default_value = "rsa2048")]
    pub ek: EkKind,
    /// Folder for `token` (mode 0600), `certificate.pem` (the AK certificate, then the CA)
    /// and the AK (`ak.pub`, `ak.priv`, loadable again under the EK).
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
}

fn b64(b: &[u8]) -> String {
    STANDARD.encode(b)
}

fn field<'a>(v: &'a Value, name: &str) -> anyhow::Result<&'a str> {
    v[name]
        .as_str()
        .ok_or_else(|| anyhow!("the server's answer has no {name}"))
}

fn unb64(v: &Value, name: &str) -> anyhow::Result<Vec<u8>> {
    STANDARD
        .decode(field(v, name)?)
        .map_err(|_| anyhow!("the server's {name} is not base64"))
}

/// POSTs `body`; the JSON answer, or an error naming the server's problem detail.
async fn post(http: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<Value> {
    let r = http
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| anyhow!("cannot reach {url}: {e}"))?;
    let status = r.status();
    let answer: Value = r.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let detail = answer["detail"].as_str().unwrap_or("no detail");
        bail!("{url} answered {}: {detail}", status.as_u16());
    }
    Ok(answer)
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// One enrollment with `tpm` against `server`: the challenge, ActivateCredential and the
/// quote in the TPM, the completion. Returns the server's final answer and the time spent
/// in the TPM.
pub(super) fn exchange(
    rt: &tokio::runtime::Handle,
    http: &reqwest::Client,
    server: &str,
    tpm: &mut Tpm,
) -> anyhow::Result<(Value, std::time::Duration)> {
    let mut body = json!({"ek_pub": b64(&tpm.ek_pub), "ak_pub": b64(&tpm.ak_pub)});
    if let Some(cert) = &tpm.ek_certificate {
        body["ek_certificate"] = b64(cert).into();
    }
    let ch = rt.block_on(post(http, &format!("{server}/v1/enroll/challenge"), &body))?;
    let selection = field(&ch, "pcr_selection")?;
    let started = std::time::Instant::now();
    let secret =
        zeroize::Zeroizing::new(tpm.activate(&unb64(&ch, "id_object")?, &unb64(&ch, "encrypted_secret")?)?);
    let (quote, signature, values) = tpm.quote(selection, &unb64(&ch, "nonce")?)?;
    let in_tpm = started.elapsed();
    let bank = selection.split(':').next().unwrap_or("sha256");
    let pcrs: BTreeMap<String, String> = values
        .into_iter()
        .map(|(i, v)| (i.to_string(), hex::encode(v)))
        .collect();
    let body = json!({
        "enrollment_id": field(&ch, "enrollment_id")?,
        "secret": b64(&secret),
        "quote": b64(&quote),
        "signature": b64(&signature),
        "pcrs": {bank: pcrs},
    });
    let done = rt.block_on(post(http, &format!("{server}/v1/enroll/complete"), &body))?;
    Ok((done, in_tpm))
}

/// Runs the whole enrollment; prints the subject it enrolled as.
pub async fn run(args: EnrollArgs) -> anyhow::Result<()> {
    let handle = tokio::runtime::Handle::current();
    let subject = tokio::task::spawn_blocking(move || enroll_blocking(&handle, &args))
        .await
        .map_err(|e| anyhow!("enrollment thread failed: {e}"))??;
    println!("{subject}");
    Ok(())
}

fn enroll_blocking(rt: &tokio::runtime::Handle, args: &EnrollArgs) -> anyhow::Result<String> {
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let server = super::client::server_url(&args.server)?;
    let server = server.as_str();
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .context("HTTP client")?;
    let mut tpm = Tpm::open(&args.tcti, args.ek)?;
    let (done, _) = exchange(rt, &http, server, &mut tpm)?;
    let token = zeroize::Zeroizing::new(format!("{}\n", field(&done, "token")?));
    write_private(&args.out.join("token"), token.as_bytes())?;
    let write = |name: &str, bytes: &[u8]| {
        std::fs::write(args.out.join(name), bytes).with_context(|| format!("cannot write {name}"))
    };
    write("certificate.pem", field(&done, "certificate")?.as_bytes())?;
    write("ak.pub", &tpm.ak_pub)?;
    write_private(&args.out.join("ak.priv"), &tpm.ak_priv)?;
    Ok(field(&done, "subject")?.to_owned())
}
