//! The HTTP client the CLI commands share: the server address as users type it, the API
//! token, and one-line errors from problem documents.

use anyhow::{Context, bail};
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use super::ClientArgs;
use crate::api::Problem;

/// The base URL for `--server`: a URL as given (http or https), or a bare `host[:port]`,
/// which means `http://` on a loopback address (keygate's default listen address serves
/// plain HTTP there) and `https://` anywhere else.
pub fn server_url(server: &str) -> anyhow::Result<String> {
    let raw = server.trim();
    let s = raw.trim_end_matches('/');
    if s.is_empty() {
        bail!("--server is empty: give a URL like https://keygate.example.com or 127.0.0.1:8080");
    }
    let full = match raw.split_once("://") {
        Some((scheme, rest))
            if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") =>
        {
            if rest.trim_end_matches('/').is_empty() {
                bail!("--server {raw:?} names no host");
            }
            s.to_owned()
        }
        Some((scheme, _)) => bail!("--server {s:?}: the scheme {scheme:?} is not http or https"),
        None => {
            let host = s.split('/').next().unwrap_or(s);
            let host = match host.rsplit_once(':') {
                Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
                _ => host,
            };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = host.eq_ignore_ascii_case("localhost")
                || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            format!("{}://{s}", if loopback { "http" } else { "https" })
        }
    };
    let url = reqwest::Url::parse(&full).map_err(|e| anyhow::anyhow!("--server {s:?} is not a URL: {e}"))?;
    if url.host_str().is_none_or(str::is_empty) {
        bail!("--server {s:?} names no host");
    }
    if url.query().is_some() || url.fragment().is_some() {
        bail!("--server {s:?}: give the base URL only, without ? or #");
    }
    Ok(full)
}

/// A keygate server, and the API token when the command needs one.
pub struct Api {
    base: String,
    http: reqwest::Client,
    token: Option<Zeroizing<String>>,
}

impl Api {
    /// A client that sends the API token (from `--token-file` or `KEYGATE_TOKEN`).
    pub fn new(c: &ClientArgs) -> anyhow::Result<Api> {
        let mut api = Api::anonymous(&c.server)?;
        api.token = Some(api_token(c)?);
        Ok(api)
    }

    /// A client for the endpoints that need no API token (redemption, discovery).
    pub fn anonymous(server: &str) -> anyhow::Result<Api> {
        Ok(Api {
            base: server_url(server)?,
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()?,
            token: None,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, self.url(path));
        match &self.token {
            Some(t) => r.bearer_auth(t.as_str()),
            None => r,
        }
    }

    /// Sends `r` (built on [`Api::request`] for `path`) and turns a refusal into one line.
    pub async fn send(&self, path: &str, r: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let res = r
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.url(path)))?;
        check(res).await
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let res = self.send(path, self.request(reqwest::Method::GET, path)).await?;
        decode(res).await
    }

    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<T> {
        let res = self
            .send(path, self.request(reqwest::Method::POST, path).json(body))
            .await?;
        decode(res).await
    }

    /// POST with extra headers (a DPoP proof).
    pub async fn post_with<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<T> {
        let mut r = self.request(reqwest::Method::POST, path).json(body);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        decode(self.send(path, r).await?).await
    }

    /// POST as an HTML form (RFC 7662 introspection).
    pub async fn post_form<T: DeserializeOwned>(
        &self,
        path: &str,
        form: &[(&str, &str)],
    ) -> anyhow::Result<T> {
        let res = self
            .send(path, self.request(reqwest::Method::POST, path).form(form))
            .await?;
        decode(res).await
    }

    /// GET a binary answer (a DER CRL).
    pub async fn get_bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let res = self.send(path, self.request(reqwest::Method::GET, path)).await?;
        Ok(res.bytes().await?.to_vec())
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.send(path, self.request(reqwest::Method::DELETE, path))
            .await?;
        Ok(())
    }
}

fn api_token(c: &ClientArgs) -> anyhow::Result<Zeroizing<String>> {
    if let Some(path) = &c.token_file {
        let s = Zeroizing::new(
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
        );
        return Ok(Zeroizing::new(s.trim().to_owned()));
    }
    match std::env::var("KEYGATE_TOKEN") {
        Ok(s) if !s.is_empty() => Ok(Zeroizing::new(s)),
        _ => bail!("no API token: set KEYGATE_TOKEN or pass --token-file"),
    }
}

/// Turns a non-2xx answer into a one-line error from its problem document.
async fn check(res: reqwest::Response) -> anyhow::Result<reqwest::Response> {
    if res.status().is_success() {
        return Ok(res);
    }
    let status = res.status();
    match res.json::<Problem>().await {
        Ok(p) => bail!("{} {}: {}", p.status, p.title, p.detail),
        Err(_) => bail!("server answered {status}"),
    }
}

async fn decode<T: DeserializeOwned>(res: reqwest::Response) -> anyhow::Result<T> {
    let url = res.url().to_string();
    let text = res
        .text()
        .await
        .with_context(|| format!("cannot read the answer of {url}"))?;
    // 204 and the like: a unit type reads `null`
    let text = if text.trim().is_empty() { "null" } else { &text };
    serde_json::from_str(text).with_context(|| format!("unexpected answer from {url}"))
}

/// A path segment as given (ids, kids), refused when it could change the path.
pub fn segment<'a>(what: &str, v: &'a str) -> anyhow::Result<&'a str> {
    if v.is_empty()
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        bail!("{v:?} is not {what}");
    }
    Ok(v)
}

/// A value given on the command line, or `-` for standard input (trimmed).
pub fn arg_or_stdin(value: &str, what: &str) -> anyhow::Result<Zeroizing<String>> {
    if value != "-" {
        return Ok(Zeroizing::new(value.trim().to_owned()));
    }
    let mut s = Zeroizing::new(String::new());
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
        .with_context(|| format!("cannot read the {what} from standard input"))?;
    let t = Zeroizing::new(s.trim().to_owned());
    if t.is_empty() {
        bail!("no {what} on standard input");
    }
    Ok(t)
}

/// Prints `rows` under `header` in columns as wide as their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::server_url;

    #[test]
    fn server_addresses_as_users_type_them() {
        for (given, want) in [
            ("127.0.0.1:8080", "http://127.0.0.1:8080"),
            ("localhost:8080/", "http://localhost:8080"),
            ("[::1]:8080", "http://[::1]:8080"),
            ("keygate.example.com", "https://keygate.example.com"),
            ("keygate.example.com:8443", "https://keygate.example.com:8443"),
            ("HTTPS://k.example.com/", "HTTPS://k.example.com"),
            ("http://10.0.0.5:8080", "http://10.0.0.5:8080"),
        ] {
            assert_eq!(server_url(given).unwrap(), want, "{given}");
        }
        for (given, why) in [
            ("", "empty"),
            ("ftp://x", "not http or https"),
            ("http://", "names no host"),
            ("http://x?y=1", "base URL only"),
            ("a b:80", "not a URL"),
        ] {
            let e = server_url(given).unwrap_err().to_string();
            assert!(e.contains(why), "{given}: {e}");
        }
    }
}
