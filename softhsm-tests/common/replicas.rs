//! Several `keygate serve` processes on one PostgreSQL database and one key device: each on
//! its own loopback port, all with the same `KEYGATE_ISSUER` and `KEYGATE_PUBLIC_URL`, as a
//! load balancer would put them.

use std::path::PathBuf;

use super::{Env, Server, free_port};

/// The issuer and public URL every replica is given.
pub const PUBLIC_URL: &str = "https://keygate.test";

/// One replica: its address, log, and process (None once killed or stopped).
pub struct Replica {
    pub base: String,
    pub log: PathBuf,
    pub server: Option<Server>,
    listen: String,
    extra: Vec<(String, String)>,
}

impl Replica {
    /// SIGKILL: the process dies at once, with whatever it was doing.
    pub fn kill(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
    }

    /// SIGTERM, and waits for the process to end.
    pub fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Replicas of one env, numbered from 0.
pub struct Replicas {
    pub list: Vec<Replica>,
}

impl std::ops::Index<usize> for Replicas {
    type Output = Replica;
    fn index(&self, i: usize) -> &Replica {
        &self.list[i]
    }
}

impl std::ops::IndexMut<usize> for Replicas {
    fn index_mut(&mut self, i: usize) -> &mut Replica {
        &mut self.list[i]
    }
}

impl Replicas {
    /// Starts `n` replicas of `env` (whose store must be PostgreSQL) and waits until each is
    /// ready. `extra` environment goes to all of them.
    pub async fn start(env: &Env, n: usize, extra: &[(&str, &str)]) -> Replicas {
        let mut r = Replicas { list: Vec::new() };
        for _ in 0..n {
            r.add(env, extra).await;
        }
        r
    }

    /// Starts one more replica; returns its index.
    pub async fn add(&mut self, env: &Env, extra: &[(&str, &str)]) -> usize {
        assert!(env.pg_url.is_some(), "replicas share a PostgreSQL database");
        let i = self.list.len();
        let port = free_port();
        let mut rep = Replica {
            base: format!("http://127.0.0.1:{port}"),
            log: env.dir.path().join(format!("replica-{i}.log")),
            server: None,
            listen: format!("127.0.0.1:{port}"),
            extra: extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        rep.server = Some(Replicas::spawn(env, &rep).await);
        self.list.push(rep);
        i
    }

    async fn spawn(env: &Env, rep: &Replica) -> Server {
        let mut vars: Vec<(&str, &str)> = vec![
            ("KEYGATE_LISTEN", rep.listen.as_str()),
            ("KEYGATE_ISSUER", PUBLIC_URL),
            ("KEYGATE_PUBLIC_URL", PUBLIC_URL),
        ];
        vars.extend(rep.extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        Server::start_at(env, &rep.log, &vars, &rep.base).await
    }

    pub fn bases(&self) -> Vec<String> {
        self.list.iter().map(|r| r.base.clone()).collect()
    }
}

/// The `keygate_leader{task="…"}` gauge of a replica: Some(true) when it runs `task`, None
/// when it does not answer.
pub async fn leads(base: &str, task: &str) -> Option<bool> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let series = format!("keygate_leader{{task=\"{task}\"}} ");
    Some(
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .is_some_and(|v| v.trim() == "1"),
    )
}
