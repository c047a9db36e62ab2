//! The nodes under test: one in this process on runtime threads of its own, or one in
//! a child process (this binary, run with `--serve-node`) whose memory and start-up
//! can be read from the outside.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use evmesh_store::Retention;
use evmesh_store::jetstream::{JetStreamConfig, JetStreamStore};
use evmesh_store::sqlite::{Config, SqliteStore};
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// Serves a node over `data` (or the JetStream cluster `nats` names) on `listen`
/// until standard input closes: what `evmesh serve --allow-unregistered` does, minus
/// logging. The child half of [`NodeProcess`].
pub fn serve_child(
    data: &Path,
    nats: Option<JetStreamConfig>,
    listen: SocketAddr,
    integrity_check: bool,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let (closed, stdin_closed) = oneshot::channel::<()>();
        std::thread::spawn(move || {
            use std::io::Read;
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            let _ = closed.send(());
        });
        let stdin_closed = async move {
            let _ = stdin_closed.await;
        };
        match nats {
            Some(nats) => {
                let store = JetStreamStore::open(&nats).await?;
                evmesh_node::serve(store, unvalidated(), listener, stdin_closed).await?;
            }
            None => {
                let mut config = Config::new(data);
                config.integrity_check = integrity_check;
                let store = SqliteStore::open(config).await?;
                evmesh_node::serve(store, unvalidated(), listener, stdin_closed).await?;
            }
        }
        anyhow::Ok(())
    })
}

/// Unregistered types pass unvalidated: the scenarios that measure validation
/// register their schema first.
fn unvalidated() -> evmesh_node::NodeConfig {
    evmesh_node::NodeConfig {
        allow_unregistered: true,
        ..evmesh_node::NodeConfig::default()
    }
}

/// Where the node keeps its log: a temporary directory unless one was given.
fn data_dir(data: Option<PathBuf>) -> anyhow::Result<(Option<tempfile::TempDir>, PathBuf)> {
    Ok(match data {
        Some(data) => (None, data),
        None => {
            let dir = tempfile::tempdir()?;
            let data = dir.path().to_owned();
            (Some(dir), data)
        }
    })
}

pub async fn connect(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

/// A connection that sends `token` on every call, when there is one.
pub async fn connect_as(
    addr: SocketAddr,
    token: Option<&str>,
) -> anyhow::Result<evmesh_client::Transport> {
    let mut credentials = evmesh_client::Credentials::default();
    if let Some(token) = token {
        credentials = credentials.token(token)?;
    }
    Ok(credentials.authorize(connect(addr).await?))
}

/// A node on its own runtime in this process; dropping it stops it, then the
/// nats-servers it ran over, if any.
pub struct Node {
    pub addr: SocketAddr,
    /// The HTTP listener (`/metrics`), when the node keeps metrics.
    pub http: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    _dir: Option<tempfile::TempDir>,
    pub nats: Option<evmesh_testkit::NatsCluster>,
}

impl Node {
    /// A node over `data` (a fresh directory when `None`), or over the JetStream
    /// cluster `nats` names.
    pub fn start(data: Option<PathBuf>, nats: Option<JetStreamConfig>) -> anyhow::Result<Self> {
        Self::start_metered(data, nats, false)
    }

    /// As [`Node::start`], with the HTTP listener and its metrics when `metrics`
    /// (its address in `http`).
    pub fn start_metered(
        data: Option<PathBuf>,
        nats: Option<JetStreamConfig>,
        metrics: bool,
    ) -> anyhow::Result<Self> {
        Self::start_retained(data, nats, metrics, Retention::default())
    }

    /// As [`Node::start_metered`], the embedded log kept within `retention`.
    pub fn start_retained(
        data: Option<PathBuf>,
        nats: Option<JetStreamConfig>,
        metrics: bool,
        retention: Retention,
    ) -> anyhow::Result<Self> {
        Self::start_configured(data, nats, metrics, retention, unvalidated())
    }

    /// An embedded node in a fresh directory whose callers authenticate against
    /// `auth`.
    pub fn start_with_auth(auth: std::sync::Arc<evmesh_node::auth::Auth>) -> anyhow::Result<Self> {
        let config = evmesh_node::NodeConfig {
            auth: Some(auth),
            ..unvalidated()
        };
        Self::start_configured(None, None, false, Retention::default(), config)
    }

    fn start_configured(
        data: Option<PathBuf>,
        nats: Option<JetStreamConfig>,
        metrics: bool,
        retention: Retention,
        config: evmesh_node::NodeConfig,
    ) -> anyhow::Result<Self> {
        let (dir, data) = data_dir(data)?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let addr = listener.local_addr()?;
                let http = match metrics {
                    true => Some(tokio::net::TcpListener::bind("127.0.0.1:0").await?),
                    false => None,
                };
                let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
                let stopped = async move {
                    let _ = stopped.await;
                };
                match nats {
                    Some(nats) => {
                        let store = JetStreamStore::open(&nats).await?;
                        let _ = ready_tx.send((addr, http_addr));
                        evmesh_node::serve_with_http(store, config, listener, http, stopped)
                            .await?;
                    }
                    None => {
                        let mut store_config = Config::new(&data);
                        store_config.retention = retention;
                        let store = SqliteStore::open(store_config).await?;
                        let _ = ready_tx.send((addr, http_addr));
                        evmesh_node::serve_with_http(store, config, listener, http, stopped)
                            .await?;
                    }
                }
                Ok(())
            })
        });
        let (addr, http) = match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addrs) => addrs,
            // The thread ended: its error says why.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(match thread.join() {
                    Ok(Err(e)) => e.context("the node did not start"),
                    _ => anyhow::anyhow!("the node did not start (its thread panicked)"),
                });
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                bail!("the node did not start within 30 s")
            }
        };
        Ok(Self {
            addr,
            http,
            stop: Some(stop),
            thread: Some(thread),
            _dir: dir,
            nats: None,
        })
    }

    fn shut_down(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => bail!("the node thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Err(e) = self.shut_down() {
            eprintln!("stopping the node: {e:#}");
        }
    }
}

/// A node in a child process. Dropping it closes the child's standard input, which
/// stops it gracefully; a child that outlives the grace period is killed.
pub struct NodeProcess {
    pub addr: SocketAddr,
    child: Child,
    /// From spawning the process to its health check answering SERVING.
    pub started_in: Duration,
    _dir: Option<tempfile::TempDir>,
}

impl NodeProcess {
    /// A node over `data` (a fresh directory when `None`); `integrity_check` as
    /// `evmesh serve` without or with `--skip-integrity-check`.
    pub async fn start(data: Option<PathBuf>, integrity_check: bool) -> anyhow::Result<Self> {
        Self::start_on(data, None, integrity_check).await
    }

    /// A node over the JetStream cluster `nats` names, or over `data`.
    pub async fn start_on(
        data: Option<PathBuf>,
        nats: Option<&JetStreamConfig>,
        integrity_check: bool,
    ) -> anyhow::Result<Self> {
        let (dir, data) = data_dir(data)?;
        // A free port, chosen here so that start-up counts from the spawn.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let began = Instant::now();
        let mut command = Command::new(std::env::current_exe()?);
        if !integrity_check {
            command.arg("--skip-integrity-check");
        }
        if let Some(nats) = nats {
            command
                .arg("--serve-nats")
                .arg(nats.servers.join(","))
                .arg("--serve-nats-replicas")
                .arg(nats.replicas.to_string());
        }
        let mut child = command
            .arg("--serve-node")
            .arg(&data)
            .arg("--listen")
            .arg(addr.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .context("starting the node process")?;
        match wait_serving(addr, &mut child).await {
            Ok(()) => Ok(Self {
                addr,
                started_in: began.elapsed(),
                child,
                _dir: dir,
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's resident set, in bytes.
    pub fn rss(&self) -> anyhow::Result<u64> {
        rss_of(self.pid())
    }

    /// SIGKILL: the node dies with nothing cleaned up.
    pub fn kill_9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        drop(self.child.stdin.take());
    }

    /// Stops the node gracefully and waits for it to exit.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> anyhow::Result<()> {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("the node process exited with {status}");
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("the node process did not stop within 15 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if self.child.stdin.is_some() {
            let _ = self.shut_down();
        }
    }
}

/// Polls the node's health until `evmesh.v1.Mesh` is SERVING.
async fn wait_serving(addr: SocketAddr, child: &mut Child) -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the node process exited with {status} before serving");
        }
        if let Ok(channel) = connect(addr).await {
            let request = HealthCheckRequest {
                service: "evmesh.v1.Mesh".into(),
            };
            if let Ok(response) = HealthClient::new(channel).check(request).await
                && response.into_inner().status == ServingStatus::Serving as i32
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the node process did not serve within 120 s");
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// A process's resident set, in bytes, from `/proc/PID/status`.
pub fn rss_of(pid: u32) -> anyhow::Result<u64> {
    let field = "VmRSS:";
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}
