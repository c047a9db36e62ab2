//! `evmesh`: run a mesh node, and talk to one.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod auth;
mod commands;
mod config;
mod ops;
mod output;
mod schema;
mod serve;

#[derive(Parser)]
#[command(
    name = "evmesh",
    version,
    about = "A gRPC event mesh with typed schemas: run a node (`evmesh serve`), and talk to one"
)]
struct Cli {
    /// Also accepted before the command (`evmesh --server URL groups list`), as
    /// it always was; the commands that talk to a node list it in their help.
    #[arg(long, hide = true, value_name = "URL")]
    server: Option<String>,
    #[command(subcommand)]
    command: Command,
}

impl Command {
    /// The node a client command talks to; `None` for `serve`.
    fn node(&mut self) -> Option<&mut commands::NodeArg> {
        match self {
            Command::Serve(_) => None,
            Command::Publish(a) => Some(&mut a.node),
            Command::Subscribe(a) => Some(&mut a.node),
            Command::Chain(a) => Some(&mut a.node),
            Command::Groups(a) => Some(&mut a.node),
            Command::Dlq(a) => Some(&mut a.node),
            Command::Schema(a) => Some(&mut a.node),
            Command::Health(a) => Some(&mut a.node),
            Command::Nodes(a) => Some(&mut a.node),
            Command::Backup(a) => Some(&mut a.node),
            Command::Restore(_) | Command::Config(_) | Command::Auth(_) => None,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a mesh node.
    Serve(ServeArgs),
    /// Publish one event.
    Publish(commands::PublishArgs),
    /// Print events as JSON lines, one per event.
    Subscribe(commands::SubscribeArgs),
    /// Show every event of a workflow as its causation tree.
    Chain(commands::ChainArgs),
    /// Durable consumer groups.
    Groups(commands::GroupsArgs),
    /// Dead letters of a group.
    Dlq(commands::DlqArgs),
    /// Payload schemas: register, check, list, show.
    Schema(schema::SchemaArgs),
    /// Whether a node answers and serves: SERVING, or why not.
    Health(commands::HealthArgs),
    /// The nodes of the mesh and the durable groups each one serves.
    Nodes(commands::NodesArgs),
    /// Write a consistent snapshot of a running node's log to a file.
    Backup(ops::BackupArgs),
    /// Lay out a backup as a data directory that `evmesh serve --data DIR` starts on.
    Restore(ops::RestoreArgs),
    /// The configuration file of `evmesh serve --config`.
    Config(config::ConfigArgs),
    /// Tokens and the auth file of `evmesh serve --auth`.
    Auth(auth::AuthArgs),
}

#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "EVMESH_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// A TOML file with a key for any of these flags (its name without the dashes);
    /// flags and the environment win over it. SIGHUP reads it again.
    #[arg(long, env = "EVMESH_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the settings the node would run with, each with where it came from
    /// (secrets redacted), and exit.
    #[arg(long)]
    print_config: bool,
    /// What the node logs: a level (error, warn, info, debug, trace) or
    /// tracing-subscriber directives (evmesh_store=debug,info).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
    /// Address of the HTTP listener (/metrics, /healthz, /readyz), or `off`.
    #[arg(long, env = "EVMESH_HTTP_LISTEN", default_value = "127.0.0.1:50080")]
    http_listen: serve::HttpListen,
    /// Directory of the embedded log.
    #[arg(long, env = "EVMESH_DATA", default_value = "./evmesh-data")]
    data: PathBuf,
    /// How logs are written to stderr: text for people, json (one object per line)
    /// for log collectors.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Store events of types with no registered schema, unvalidated, instead of
    /// rejecting them (for development). Types with a schema are always validated.
    #[arg(long)]
    allow_unregistered: bool,
    /// Largest payload accepted, in bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    max_payload_bytes: usize,
    /// Largest schema (encoded descriptor set) a registration may send, in bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    max_schema_bytes: usize,
    /// Most messages and enums one schema may declare.
    #[arg(long, default_value_t = 10_000)]
    max_schema_types: usize,
    /// Most versions one event type may have.
    #[arg(long, default_value_t = 100)]
    max_schema_versions: usize,
    /// Most client connections open at once; the node closes any over it (and
    /// logs that it did).
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Start without reading the log through SQLite's quick_check first (done by
    /// default on logs up to 1 GiB; it reads every page). Reads that reach a
    /// damaged page still end with DATA_LOSS.
    #[arg(long)]
    skip_integrity_check: bool,
    /// Most concurrent RPCs (HTTP/2 streams) on one connection.
    #[arg(long, default_value_t = 1024)]
    max_streams_per_connection: u32,
    /// Keep events, groups and schemas on NATS JetStream at these servers
    /// (comma-separated URLs) instead of the embedded log.
    #[arg(long, env = "EVMESH_NATS", value_delimiter = ',')]
    nats: Vec<String>,
    /// The node's name in the mesh, unique among its nodes (default: the host's
    /// name and the port it listens on).
    #[arg(long, env = "EVMESH_NODE_NAME", value_name = "NAME")]
    node_name: Option<String>,
    /// Where clients reach the node, as `evmesh nodes` shows it (default: the
    /// address it listens on, the host's name when that is 0.0.0.0).
    #[arg(long, env = "EVMESH_ADVERTISE", value_name = "URL")]
    advertise: Option<String>,
    /// Replicas of the streams and buckets the node creates on NATS.
    #[arg(
        long,
        env = "EVMESH_NATS_REPLICAS",
        default_value_t = 1,
        requires = "nats"
    )]
    nats_replicas: usize,
    /// NATS user, with --nats-password.
    #[arg(long, env = "EVMESH_NATS_USER", requires_all = ["nats", "nats_password"])]
    nats_user: Option<String>,
    /// NATS password, with --nats-user.
    #[arg(
        long,
        env = "EVMESH_NATS_PASSWORD",
        requires = "nats_user",
        hide_env_values = true
    )]
    nats_password: Option<String>,
    /// NATS token.
    #[arg(
        long,
        env = "EVMESH_NATS_TOKEN",
        requires = "nats",
        conflicts_with = "nats_user",
        hide_env_values = true
    )]
    nats_token: Option<String>,
    /// NATS credentials file (a user JWT and its NKey seed).
    #[arg(long, env = "EVMESH_NATS_CREDS", requires = "nats", conflicts_with_all = ["nats_user", "nats_token"])]
    nats_creds: Option<PathBuf>,
    /// CA certificate (PEM) to verify the NATS servers' TLS certificates with.
    #[arg(long, env = "EVMESH_NATS_CA", requires = "nats")]
    nats_ca: Option<PathBuf>,
    /// Delete events older than this (e.g. 7d, 12h). On NATS, the events stream's max age.
    #[arg(long, env = "EVMESH_RETENTION_MAX_AGE", value_parser = serve::positive_duration)]
    retention_max_age: Option<std::time::Duration>,
    /// Keep at most this many events, the newest.
    #[arg(long, env = "EVMESH_RETENTION_MAX_EVENTS", value_parser = clap::value_parser!(u64).range(1..))]
    retention_max_events: Option<u64>,
    /// Keep the log within this size (e.g. 20GiB, 500MB): the database's pages in
    /// use, without its write-ahead file.
    #[arg(long, env = "EVMESH_RETENTION_MAX_BYTES", value_parser = serve::size)]
    retention_max_bytes: Option<u64>,
    /// Principals, their credentials and permissions (TOML); without it, every
    /// client may do everything. SIGHUP reads it again.
    #[arg(long, env = "EVMESH_AUTH", value_name = "FILE")]
    auth: Option<PathBuf>,
    /// The node's TLS certificate chain (PEM), leaf first: gRPC over TLS only.
    #[arg(
        long,
        env = "EVMESH_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(
        long,
        env = "EVMESH_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// mTLS: a CA certificate (PEM); a client must present a certificate it signed
    /// and that has not expired, or the handshake fails.
    #[arg(
        long,
        env = "EVMESH_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_client_ca: Option<PathBuf>,
    /// Every setting with its source, filled in after parsing.
    #[arg(skip)]
    settings: Vec<config::Setting>,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

/// mimalloc: the node allocates and frees a few small buffers per event, and glibc's
/// malloc was a fifth of its CPU time under load (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A reader that goes away (`evmesh subscribe … | head -1`) ends the command
/// quietly with 141, as SIGPIPE ends other Unix tools: Rust ignores SIGPIPE, so a
/// print to the closed pipe panics instead, which would print a panic message.
fn quiet_on_broken_pipe() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        report(info);
    }));
}

fn main() -> ExitCode {
    quiet_on_broken_pipe();
    // One crypto provider for every TLS connection the process makes or takes.
    evmesh_node::tls::install_provider();
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line: clap's message without the usage block that follows it
            // (a list of missing flags joined onto the line that announces it).
            let rendered = e.render().to_string();
            let message: Vec<&str> = rendered
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty())
                .collect();
            let message = message.join(" ");
            let message = if message.is_empty() {
                "invalid arguments"
            } else {
                &message
            };
            eprintln!("evmesh: {}", message.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    if let Command::Serve(args) = &cli.command {
        // The config file, under the flags and the environment.
        match config::apply(&argv, args.config.as_deref()) {
            Ok((mut merged, settings)) => {
                if let Command::Serve(args) = &mut merged.command {
                    args.settings = settings;
                }
                cli = merged;
            }
            Err(e) => {
                let message = format!("{e:#}");
                let first = message.lines().next().unwrap_or("invalid configuration");
                eprintln!("evmesh: {}", first.trim_start_matches("error: "));
                return ExitCode::from(2);
            }
        }
    }
    if let Some(server) = cli.server.take() {
        match cli.command.node() {
            Some(node) => node.server = server,
            None => {
                eprintln!("evmesh: --server names a node to talk to; serve listens on --listen");
                return ExitCode::from(2);
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("evmesh: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Publish(args) => commands::publish(args).await,
            Command::Subscribe(args) => commands::subscribe(args).await,
            Command::Chain(args) => commands::chain(args).await,
            Command::Groups(args) => commands::groups(args).await,
            Command::Dlq(args) => commands::dlq(args).await,
            Command::Schema(args) => schema::run(args).await,
            Command::Health(args) => commands::health(args).await,
            Command::Nodes(args) => commands::nodes(args).await,
            Command::Backup(args) => ops::backup(args).await,
            Command::Restore(args) => ops::restore(args).await,
            Command::Config(args) => config::run(args),
            Command::Auth(args) => auth::run(args),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("evmesh: {e:#}");
            ExitCode::FAILURE
        }
    }
}
