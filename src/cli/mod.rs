//! Command line (clap). `anyhow` lives here and in `main.rs` only.

mod admin;
mod audit;
mod bench;
mod client;
mod config_check;
mod enroll;
mod enroll_tpm;
mod init;
pub mod logging;
mod periodic;
mod prove;
mod prove_out;
mod serve;
mod tokens;
mod verify;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Config;

pub use init::{InitOutcome, init};
pub use serve::{Service, build_service};

/// keygate: hardware-backed issuer of provisioning tokens.
#[derive(Debug, Parser)]
#[command(name = "keygate", version, about, propagate_version = true)]
pub struct Cli {
    /// Configuration file (TOML). Without one, keygate runs on its embedded defaults.
    #[arg(long, global = true, env = "KEYGATE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the data folder, the token (embedded SoftHSM2 default), the signing key, the
    /// database and the first admin API token (printed once).
    Init {
        /// Mint a new admin token even if one exists.
        #[arg(long)]
        new_admin_token: bool,
        /// Embedded SoftHSM2 token: keep its SO PIN in `<data_dir>/so.pin` (0600). By
        /// default it is used once to initialise the token and never written.
        #[arg(long)]
        keep_so_pin: bool,
    },
    /// Run the HTTP service.
    Serve,
    /// Provisioning tokens: issue, revoke, introspect, redeem (HTTP API), inspect (offline).
    #[command(subcommand)]
    Token(tokens::TokenCommand),
    /// Operator API tokens (through the HTTP API).
    #[command(subcommand, name = "api-token")]
    ApiToken(admin::ApiTokenCommand),
    /// Machines allowed to enroll with their TPM (through the HTTP API).
    #[command(subcommand)]
    Machines(admin::MachinesCommand),
    /// Certificates keygate issued: revoke one, fetch a CRL.
    #[command(subcommand, name = "cert")]
    Cert(admin::CertCommand),
    /// Signing keys (through the HTTP API).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Verify a provisioning token offline with a JWKS (exit 0, or 1 with a one-line reason).
    Verify(verify::VerifyArgs),
    /// Measure raw backend sign rate, end-to-end issuance and offline verification.
    Bench(bench::BenchArgs),
    /// Enroll this machine: prove with its TPM (EK, AK, credential activation, quote) that it
    /// is genuine, and receive a provisioning token and an AK certificate.
    Enroll(enroll::EnrollArgs),
    /// Configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to standard
    /// output, e.g. `keygate completions bash > /etc/bash_completion.d/keygate`.
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (keygate.1 and one per subcommand) into a folder.
    Man {
        /// The folder (created if missing).
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration and print what `keygate serve` would use (device, store,
    /// addresses, TLS, enrollment) without opening the device or the database. Exit 1 with
    /// one line when it is invalid.
    Check {
        /// The file (default: --config / KEYGATE_CONFIG, or the embedded defaults).
        file: Option<PathBuf>,
    },
}

/// Where the server is and which API token to use.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The keygate server: a URL, or host:port (http:// on a loopback address, https://
    /// elsewhere).
    #[arg(long, env = "KEYGATE_ADDR", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// File holding the API token (else the KEYGATE_TOKEN environment variable).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain and the signed checkpoints of the configured store offline;
    /// exit 1 with one line naming the first bad entry.
    Verify(audit::VerifyArgs),
    /// List audit entries over the HTTP API (scope audit:read), oldest first.
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// Entries with a seq above this one.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=1000))]
        limit: i64,
        /// The full page as JSON, checkpoints included.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// List signing keys (scope keys:read).
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// Print the full JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Create a new signing key (scope keys:rotate): published now, signing after the
    /// publish lead, or at once with --activate-now.
    Rotate {
        #[command(flatten)]
        client: ClientArgs,
        /// Emergency: sign with the new key at once.
        #[arg(long)]
        activate_now: bool,
    },
    /// Remove a retired key from the hardware (scope keys:rotate); refused while a token it
    /// signed is unexpired.
    Destroy {
        #[command(flatten)]
        client: ClientArgs,
        /// The key's kid (base64url: it may start with '-').
        #[arg(allow_hyphen_values = true)]
        kid: String,
    },
    /// Check from the outside that the server's signing keys live in hardware: a TPM key
    /// must pass every step of a key proof against the manufacturer CAs of --tpm-ca; a
    /// PKCS#11 key is reported as not proven. Exit 0 only when every key is proven.
    Prove(prove::ProveArgs),
}

/// Runs a parsed command line.
pub async fn run(cli: Cli, config: Config) -> anyhow::Result<()> {
    match cli.command {
        Command::Init {
            new_admin_token,
            keep_so_pin,
        } => {
            let out = init::init_with(&config, new_admin_token, keep_so_pin).await?;
            out.report();
            Ok(())
        }
        Command::Serve => serve::serve(config).await,
        Command::Token(cmd) => tokens::run(cmd).await,
        Command::ApiToken(cmd) => admin::api_tokens(cmd).await,
        Command::Machines(cmd) => admin::machines(cmd).await,
        Command::Cert(cmd) => admin::certificates(cmd).await,
        Command::Keys(KeysCommand::List { client, json }) => admin::list_keys(client, json).await,
        Command::Keys(KeysCommand::Rotate { client, activate_now }) => {
            admin::rotate_key(client, activate_now).await
        }
        Command::Keys(KeysCommand::Destroy { client, kid }) => admin::destroy_key(client, &kid).await,
        Command::Keys(KeysCommand::Prove(args)) => prove::run(args).await,
        Command::Verify(args) => verify::run(args, &config).await,
        Command::Bench(args) => bench::run(args, config).await,
        Command::Audit(AuditCommand::Verify(args)) => audit::verify(args, &config).await,
        Command::Audit(AuditCommand::List {
            client,
            after,
            limit,
            json,
        }) => admin::audit_list(client, after, limit, json).await,
        Command::Enroll(args) => enroll::run(args).await,
        Command::Config(ConfigCommand::Check { file }) => {
            // validated on load (by main, or here for another file)
            match file {
                Some(f) => config_check::report(&Config::load(Some(&f))?, Some(&f)),
                None => config_check::report(&config, cli.config.as_deref()),
            }
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "keygate", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { out_dir } => {
            std::fs::create_dir_all(&out_dir)?;
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::generate_to(cmd, &out_dir)?;
            println!("man pages written to {}", out_dir.display());
            Ok(())
        }
    }
}
