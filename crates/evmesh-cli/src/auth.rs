//! `evmesh auth`: a new token and its line for the auth file, and a check of the
//! file that `evmesh serve --auth` reads.

use std::path::PathBuf;

use anyhow::anyhow;
use base64::Engine as _;
use clap::Subcommand;
use evmesh_node::auth::{Policy, TOKEN_PREFIX, token_line};

#[derive(clap::Args)]
pub(crate) struct AuthArgs {
    #[command(subcommand)]
    command: AuthCommand,
}

#[derive(Subcommand)]
enum AuthCommand {
    /// Print a new random token (256 bits), then the line that gives it to a
    /// principal of the auth file, which keeps only its SHA-256 digest.
    Token,
    /// Check an auth file and list its principals; the same check as `serve --auth`.
    Check {
        /// The auth file (TOML).
        file: PathBuf,
    },
}

pub(crate) fn run(args: AuthArgs) -> anyhow::Result<()> {
    match args.command {
        AuthCommand::Token => {
            let mut bytes = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                .map_err(|_| anyhow!("the system's random number generator failed"))?;
            let token = format!(
                "{TOKEN_PREFIX}{}",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
            );
            println!("{token}");
            println!("# in the principal's [[principal]] entry of the auth file:");
            println!("{}", token_line(&token));
            Ok(())
        }
        AuthCommand::Check { file } => {
            let policy = Policy::load(&file)?;
            for p in policy.principals() {
                println!("{}", p.summary());
            }
            Ok(())
        }
    }
}
