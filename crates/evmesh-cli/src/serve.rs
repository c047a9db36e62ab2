//! `evmesh serve`: the node with its embedded log, or on NATS JetStream.

use std::io::IsTerminal;

use anyhow::Context;
use evmesh_node::auth::Auth;
use evmesh_node::{ConnectionLimits, Limits, NodeConfig, RegistryLimits};
use evmesh_schema::SchemaLimits;
use evmesh_store::jetstream::{Credentials, JetStreamConfig, JetStreamStore};
use evmesh_store::sqlite::{Config, SqliteStore};

use crate::{LogFormat, ServeArgs};

/// Changes what the node logs while it runs.
type SetFilter = Box<dyn Fn(&str) -> anyhow::Result<()> + Send + Sync>;

fn filter(directives: &str) -> anyhow::Result<tracing_subscriber::EnvFilter> {
    tracing_subscriber::EnvFilter::try_new(directives)
        .map_err(|e| anyhow::anyhow!("--log-level {directives:?}: {e}"))
}

fn init_logging(format: LogFormat, level: &str) -> anyhow::Result<SetFilter> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let (layer, handle) = tracing_subscriber::reload::Layer::new(filter(level)?);
    let ansi = std::io::stderr().is_terminal();
    let registry = tracing_subscriber::registry().with(layer);
    match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_ansi(false),
            )
            .init(),
    }
    Ok(Box::new(move |level: &str| {
        let new = filter(level)?;
        handle
            .reload(new)
            .map_err(|e| anyhow::anyhow!("changing the log level: {e}"))
    }))
}

/// The checks `serve` makes of its settings beyond each flag's own.
pub(crate) fn check(args: &ServeArgs) -> anyhow::Result<()> {
    for (flag, value) in [
        ("--max-payload-bytes", args.max_payload_bytes),
        ("--max-schema-bytes", args.max_schema_bytes),
        ("--max-schema-types", args.max_schema_types),
        ("--max-schema-versions", args.max_schema_versions),
        ("--max-connections", args.max_connections),
        (
            "--max-streams-per-connection",
            args.max_streams_per_connection as usize,
        ),
    ] {
        if value == 0 {
            anyhow::bail!("{flag} must be at least 1");
        }
    }
    if args.nats_replicas == 0 {
        anyhow::bail!("--nats-replicas must be at least 1");
    }
    filter(&args.log_level)?;
    Ok(())
}

fn retention(args: &ServeArgs) -> evmesh_store::Retention {
    evmesh_store::Retention {
        max_age: args.retention_max_age,
        max_events: args.retention_max_events,
        max_bytes: args.retention_max_bytes,
    }
}

/// On SIGHUP: reads the config file again and applies what a running node can
/// change (the log level, retention); says what else changed and waits for a
/// restart.
async fn reload_on_hangup<S: evmesh_store::Store + Clone>(
    store: S,
    set_filter: Option<SetFilter>,
    live: std::sync::Arc<evmesh_node::LiveLimits>,
    mut running: Vec<crate::config::Setting>,
    config: Option<std::path::PathBuf>,
    auth: Option<std::sync::Arc<Auth>>,
) {
    #[cfg(unix)]
    {
        let mut hangups =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGHUP");
                    return;
                }
            };
        while hangups.recv().await.is_some() {
            if let Some(auth) = &auth {
                reload_auth(auth);
            }
            let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
            let Some(path) = &config else {
                if auth.is_none() {
                    tracing::info!("SIGHUP: no --config or --auth file to read again");
                }
                continue;
            };
            let (cli, settings) = match crate::config::apply(&argv, Some(path)) {
                Ok(loaded) => loaded,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "SIGHUP: the config file is refused; the node keeps its settings");
                    continue;
                }
            };
            let crate::Command::Serve(args) = cli.command else {
                continue;
            };
            let mut applied = Vec::new();
            let mut pending = Vec::new();
            for new in &settings {
                let old = running.iter().find(|s| s.key == new.key);
                if old.is_some_and(|old| old.value == new.value) {
                    continue;
                }
                if crate::config::RELOADABLE.contains(&new.key.as_str()) {
                    applied.push(new.key.clone());
                } else {
                    pending.push(new.key.clone());
                }
            }
            if applied.iter().any(|k| k == "log-level")
                && let Some(set) = &set_filter
                && let Err(e) = set(&args.log_level)
            {
                tracing::error!(error = %e, "SIGHUP: the log level stays");
            }
            if let Err(e) = check(&args) {
                tracing::error!(error = %e, "SIGHUP: the config file is refused; the node keeps its settings");
                continue;
            }
            live.set_max_connections(args.max_connections);
            live.set_max_schema_versions(args.max_schema_versions);
            if applied.iter().any(|k| k.starts_with("retention-"))
                && let Err(e) = store.set_retention(retention(&args)).await
            {
                tracing::error!(error = %e, "SIGHUP: changing retention");
            }
            tracing::info!(changed = ?applied, needs_restart = ?pending, "configuration read again");
            running = settings;
        }
    }
}
/// Reads the auth file again: what it changed applies to every call from now on,
/// on streams already open too; a file that does not check leaves the principals
/// as they were.
fn reload_auth(auth: &Auth) {
    match auth.reload() {
        Ok(r) => tracing::info!(
            file = %auth.path().display(),
            added = ?r.added,
            removed = ?r.removed,
            changed = ?r.changed,
            "auth file read again"
        ),
        Err(e) => tracing::error!(
            error = %e,
            "SIGHUP: the auth file is refused; the principals stay as they were"
        ),
    }
}

async fn signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

pub(crate) async fn run(mut args: ServeArgs) -> anyhow::Result<()> {
    // With an OTLP endpoint configured, the node's spans join the publishers' traces.
    let exporting = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
    if args.print_config {
        print!("{}", crate::config::print(&args.settings));
        return Ok(());
    }
    check(&args)?;
    let (_telemetry, set_filter) = if exporting {
        let json = matches!(args.log_format, LogFormat::Json);
        let telemetry = evmesh_client::telemetry::init_with("evmesh", None, json)
            .context("setting up OTLP export")?;
        (Some(telemetry), None)
    } else {
        (None, Some(init_logging(args.log_format, &args.log_level)?))
    };
    let live = std::sync::Arc::new(evmesh_node::LiveLimits::default());
    let config = NodeConfig {
        limits: Limits {
            max_payload_bytes: args.max_payload_bytes,
            ..Limits::default()
        },
        registry: RegistryLimits {
            schema: SchemaLimits {
                max_bytes: args.max_schema_bytes,
                max_types: args.max_schema_types,
                ..SchemaLimits::default()
            },
            max_versions: args.max_schema_versions,
        },
        connections: ConnectionLimits {
            max_connections: args.max_connections,
            max_streams_per_connection: args.max_streams_per_connection,
            ..ConnectionLimits::default()
        },
        allow_unregistered: args.allow_unregistered,
        trace_events: exporting,
        node_name: args.node_name.clone(),
        advertise: args.advertise.clone(),
        live: live.clone(),
        ..NodeConfig::default()
    };
    let auth = match &args.auth {
        None => None,
        Some(path) => {
            let auth = Auth::load(path)?;
            tracing::info!(file = %path.display(), principals = auth.policy().principals().count(), "auth");
            Some(auth)
        }
    };
    let config = NodeConfig {
        tls: tls(&args)?,
        auth,
        ..config
    };
    let retention = retention(&args);
    let settings = std::mem::take(&mut args.settings);
    if retention.limits() {
        tracing::info!(max_age = ?retention.max_age, max_events = ?retention.max_events, max_bytes = ?retention.max_bytes, "retention");
    }
    if args.nats.is_empty() {
        let mut store_config = Config::new(&args.data);
        store_config.integrity_check = !args.skip_integrity_check;
        store_config.retention = retention;
        let store = SqliteStore::open(store_config)
            .await
            .with_context(|| format!("cannot open the log in {}", args.data.display()))?;
        run_node(store, config, &args, set_filter, live, settings).await?;
    } else {
        let mut nats = nats_config(&args);
        nats.retention = retention;
        let store = JetStreamStore::open(&nats)
            .await
            .with_context(|| format!("cannot use NATS at {}", args.nats.join(",")))?;
        run_node(store, config, &args, set_filter, live, settings).await?;
    }
    Ok(())
}

/// Listens, serves `store` until SIGINT or SIGTERM, and reloads the config file on
/// SIGHUP meanwhile.
async fn run_node<S: evmesh_store::Store + Clone>(
    store: S,
    config: NodeConfig,
    args: &ServeArgs,
    set_filter: Option<SetFilter>,
    live: std::sync::Arc<evmesh_node::LiveLimits>,
    settings: Vec<crate::config::Setting>,
) -> anyhow::Result<()> {
    let listener = listen(args).await?;
    let http = listen_http(args).await?;
    let (addr, http_at) = (listener.local_addr()?, http_addr(http.as_ref()));
    let tls = match (&args.tls_cert, &args.tls_client_ca) {
        (None, _) => "off",
        (Some(_), None) => "on",
        (Some(_), Some(_)) => "mutual",
    };
    if args.nats.is_empty() {
        tracing::info!(%addr, http = %http_at, tls, data = %args.data.display(), "serving");
    } else {
        tracing::info!(%addr, http = %http_at, tls, nats = %args.nats.join(","), "serving");
    }
    if config.auth.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "no --auth: whoever reaches this address may publish, read every event, register schemas and purge dead letters");
    }
    let reload = tokio::spawn(reload_on_hangup(
        store.clone(),
        set_filter,
        live,
        settings,
        args.config.clone(),
        config.auth.clone(),
    ));
    let served = evmesh_node::serve_with_http(store, config, listener, http, signal()).await;
    reload.abort();
    Ok(served?)
}

/// The TLS configuration of --tls-cert, --tls-key and --tls-client-ca.
fn tls(args: &ServeArgs) -> anyhow::Result<Option<std::sync::Arc<evmesh_node::tls::ServerConfig>>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let files = evmesh_node::tls::TlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: args.tls_client_ca.clone(),
    };
    let config = evmesh_node::tls::server_config(&files)?;
    Ok(Some(config))
}

/// A duration of at least a second, as `7d`, `12h` or `90s`.
pub(crate) fn positive_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration such as 7d, 12h or 90s ({e})"))?;
    if d < std::time::Duration::from_secs(1) {
        return Err(format!("{s:?} is less than a second"));
    }
    Ok(d)
}

/// A size in bytes, as `20GiB`, `500MB` or `1048576`; at least 1 MiB.
pub(crate) fn size(s: &str) -> Result<u64, String> {
    let bytes = s
        .parse::<bytesize::ByteSize>()
        .map_err(|_| format!("{s:?} is not a size such as 20GiB, 500MB or 1048576"))?
        .as_u64();
    if bytes < 1 << 20 {
        return Err(format!("{s:?} is less than 1MiB"));
    }
    Ok(bytes)
}

/// `--http-listen`: an address, or `off`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HttpListen(Option<std::net::SocketAddr>);

impl std::str::FromStr for HttpListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "off" {
            return Ok(Self(None));
        }
        s.parse()
            .map(|a| Self(Some(a)))
            .map_err(|_| format!("{s:?} is neither an address (127.0.0.1:50080) nor off"))
    }
}

async fn listen_http(args: &ServeArgs) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = args.http_listen.0 else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for HTTP on {addr} (--http-listen, or off)"))?;
    Ok(Some(listener))
}

fn http_addr(listener: Option<&tokio::net::TcpListener>) -> String {
    listener
        .and_then(|l| l.local_addr().ok())
        .map_or_else(|| "off".to_owned(), |a| a.to_string())
}

async fn listen(args: &ServeArgs) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))
}

fn nats_config(args: &ServeArgs) -> JetStreamConfig {
    let mut config = JetStreamConfig::new(args.nats.clone());
    config.replicas = args.nats_replicas;
    config.tls_ca = args.nats_ca.clone();
    config.credentials = match (
        &args.nats_user,
        &args.nats_password,
        &args.nats_token,
        &args.nats_creds,
    ) {
        (Some(user), Some(password), _, _) => Credentials::UserPassword {
            user: user.clone(),
            password: password.clone(),
        },
        (_, _, Some(token), _) => Credentials::Token(token.clone()),
        (_, _, _, Some(creds)) => Credentials::CredsFile(creds.clone()),
        _ => Credentials::None,
    };
    config
}
