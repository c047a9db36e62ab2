//! Real nats-servers for tests and the bench: one server, or a cluster of three on
//! loopback, each over a store directory of its own, each stopped by its PID. A
//! server can be killed (SIGKILL) and started again on the same ports over the same
//! store, as an operator's restart would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{PATIENCE, require_tool};

/// How the servers store what JetStream acks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sync {
    /// The server's default: fsync every two minutes (acks before fsync).
    #[default]
    Default,
    /// `sync_interval: always`: every ack after fsync.
    Always,
}

/// A `nats-server` with JetStream on loopback over a store directory, stopped by its
/// PID when dropped.
pub struct NatsServer {
    pub addr: SocketAddr,
    /// `n1`, `n2`, …: the name JetStream reports leaders by.
    pub name: String,
    monitor: SocketAddr,
    config: PathBuf,
    store_dir: PathBuf,
    binary: PathBuf,
    jetstream: Option<Sync>,
    child: Option<std::process::Child>,
    _dir: Option<tempfile::TempDir>,
}

/// What a server's configuration file says.
struct Layout<'a> {
    name: &'a str,
    store_dir: &'a Path,
    /// `None`: the server picks (the first start); then the port it picked.
    client: Option<u16>,
    monitor: Option<u16>,
    /// `None`: JetStream off.
    jetstream: Option<Sync>,
    /// This server's route port, and every server's.
    cluster: Option<(u16, &'a [u16])>,
}

impl Layout<'_> {
    fn write(&self) -> PathBuf {
        let port = |p: Option<u16>| p.map_or_else(|| "-1".to_owned(), |p| p.to_string());
        let mut text = format!(
            "server_name: {name}\nlisten: \"127.0.0.1:{client}\"\nhttp: \"127.0.0.1:{monitor}\"\nports_file_dir: {dir:?}\n",
            name = self.name,
            client = port(self.client),
            monitor = port(self.monitor),
            dir = self.store_dir,
        );
        if let Some(sync) = self.jetstream {
            text.push_str(&format!(
                "jetstream {{\n  store_dir: {dir:?}\n{sync}}}\n",
                dir = self.store_dir,
                sync = match sync {
                    Sync::Default => "",
                    Sync::Always => "  sync_interval: always\n",
                },
            ));
        }
        if let Some((route, routes)) = self.cluster {
            let routes: Vec<String> = routes
                .iter()
                .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect();
            text.push_str(&format!(
                "cluster {{\n  name: evmesh-test\n  listen: \"127.0.0.1:{route}\"\n  routes: [{}]\n}}\n",
                routes.join(", ")
            ));
        }
        let path = self.store_dir.join("nats-server.conf");
        std::fs::create_dir_all(self.store_dir).expect("store dir");
        std::fs::write(&path, text).expect("write nats-server.conf");
        path
    }
}

impl NatsServer {
    /// Starts one over a temporary store directory and waits until it listens.
    pub async fn start() -> Self {
        Self::start_with(Sync::Default).await
    }

    /// The same, storing as `sync` says.
    pub async fn start_with(sync: Sync) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = Self::start_in_with(dir.path(), sync).await;
        server._dir = Some(dir);
        server
    }

    /// Starts one over `store_dir` (what an earlier server there stored, it finds
    /// again) and waits until it listens. The server picks its own ports and writes
    /// them to a ports file: a port chosen here and freed for it could be taken by
    /// another test's server meanwhile, and both tests would talk to that one.
    pub async fn start_in(store_dir: &Path) -> Self {
        Self::start_in_with(store_dir, Sync::Default).await
    }

    async fn start_in_with(store_dir: &Path, sync: Sync) -> Self {
        Self::start_custom(store_dir, &require_tool("nats-server"), Some(sync)).await
    }

    /// One with JetStream off, over a temporary directory.
    pub async fn start_without_jetstream() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = Self::start_custom(dir.path(), &require_tool("nats-server"), None).await;
        server._dir = Some(dir);
        server
    }

    /// One run from `binary` (another version of nats-server), JetStream on, over a
    /// temporary directory.
    pub async fn start_binary(binary: &Path) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = Self::start_custom(dir.path(), binary, Some(Sync::Default)).await;
        server._dir = Some(dir);
        server
    }

    async fn start_custom(store_dir: &Path, binary: &Path, jetstream: Option<Sync>) -> Self {
        let layout = Layout {
            name: "n1",
            store_dir,
            client: None,
            monitor: None,
            jetstream,
            cluster: None,
        };
        let mut server = Self::spawn(&layout, binary)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        server.pin_ports(None);
        server
    }

    /// Starts a server as `layout` says; an error when it exits before it listens.
    async fn spawn(layout: &Layout<'_>, binary: &Path) -> Result<Self, String> {
        let config = layout.write();
        let mut starting = Starting(Some(
            std::process::Command::new(binary)
                .arg("--config")
                .arg(&config)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start nats-server"),
        ));
        let ports = layout
            .store_dir
            .join(format!("nats-server_{}.ports", starting.child().id()));
        let deadline = Instant::now() + PATIENCE;
        let (addr, monitor) = loop {
            let listed = std::fs::read(&ports)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
            let addr = |key: &str, scheme: &str| {
                listed
                    .as_ref()
                    .and_then(|v| v[key][0].as_str())
                    .and_then(|u| u.strip_prefix(scheme))
                    .and_then(|a| a.parse::<SocketAddr>().ok())
            };
            if let (Some(client), Some(monitor)) =
                (addr("nats", "nats://"), addr("monitoring", "http://"))
            {
                break (client, monitor);
            }
            if let Ok(Some(status)) = starting.child().try_wait() {
                return Err(format!(
                    "nats-server exited with {status} before it listened"
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "nats-server wrote no ports file within {PATIENCE:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let child = starting.listening();
        Ok(Self {
            addr,
            name: layout.name.to_owned(),
            monitor,
            config,
            store_dir: layout.store_dir.to_owned(),
            binary: binary.to_owned(),
            jetstream: layout.jetstream,
            child: Some(child),
            _dir: None,
        })
    }

    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Kills it with SIGKILL, as a crash would, and waits until it has exited.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops it with SIGTERM, as an operator would, and waits until it has exited.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = std::process::Command::new("kill")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts it again on the same ports over the same store.
    pub async fn restart(&mut self) {
        self.stop();
        let child = std::process::Command::new(&self.binary)
            .arg("--config")
            .arg(&self.config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + PATIENCE;
        while tokio::net::TcpStream::connect(self.addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen again on {} within {PATIENCE:?}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Keeps the ports it picked on its first start, so that a restart listens
    /// where its peers and clients look for it.
    fn pin_ports(&mut self, cluster: Option<(u16, &[u16])>) {
        let layout = Layout {
            name: &self.name,
            store_dir: &self.store_dir,
            client: Some(self.addr.port()),
            monitor: Some(self.monitor.port()),
            jetstream: self.jetstream,
            cluster,
        };
        self.config = layout.write();
    }

    /// The server's monitoring endpoint `path`, as JSON.
    pub async fn monitor(&self, path: &str) -> Option<serde_json::Value> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(self.monitor).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.monitor);
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut response))
            .await
            .ok()?
            .ok()?;
        let text = String::from_utf8(response).ok()?;
        let (_, body) = text.split_once("\r\n\r\n")?;
        serde_json::from_str(body).ok()
    }
}

/// A nats-server spawned and not listening yet: killed and reaped if its start is
/// abandoned (an error, or the starting future dropped, as an interrupted bench
/// drops it), so that no server outlives the one who started it.
struct Starting(Option<std::process::Child>);

impl Starting {
    fn child(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("a starting server has its process")
    }

    /// It listens: its process is the server's now.
    fn listening(mut self) -> std::process::Child {
        self.0.take().expect("a starting server has its process")
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    /// Stops it by its PID: SIGTERM, so that it closes its store cleanly, then
    /// SIGKILL if it has not exited within 5 s.
    fn drop(&mut self) {
        self.stop();
    }
}

/// Three nats-servers in one cluster on loopback, each over a store directory of its
/// own.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `n` servers routed to each other and waits until JetStream has a meta
    /// leader; `n == 1`: one server, not clustered.
    pub async fn start(n: usize, sync: Sync) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        if n == 1 {
            let server = NatsServer::start_in_with(&dir.path().join("n1"), sync).await;
            return Self {
                servers: vec![server],
                _dir: dir,
            };
        }
        // Route ports must be known before any server starts; one taken meanwhile
        // by another process makes that server exit, and the cluster starts again.
        let binary = require_tool("nats-server");
        let mut failure = String::new();
        for _attempt in 0..3 {
            let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
            let mut servers = Vec::with_capacity(n);
            for (i, route) in routes.iter().enumerate() {
                let name = format!("n{}", i + 1);
                let store_dir = dir.path().join(&name);
                let layout = Layout {
                    name: &name,
                    store_dir: &store_dir,
                    client: None,
                    monitor: None,
                    jetstream: Some(sync),
                    cluster: Some((*route, &routes)),
                };
                match NatsServer::spawn(&layout, &binary).await {
                    Ok(server) => servers.push(server),
                    Err(e) => {
                        failure = e;
                        break;
                    }
                }
            }
            if servers.len() < n {
                continue;
            }
            for (server, route) in servers.iter_mut().zip(&routes) {
                server.pin_ports(Some((*route, &routes)));
            }
            let cluster = Self { servers, _dir: dir };
            cluster.wait_for_meta_leader().await;
            return cluster;
        }
        panic!("a cluster of {n} nats-servers did not start in three attempts: {failure}");
    }

    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }

    /// Waits until the cluster's JetStream has a meta leader, as every server sees.
    pub async fn wait_for_meta_leader(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut agreed = true;
            for server in &self.servers {
                let leader = server
                    .monitor("/jsz")
                    .await
                    .and_then(|jsz| jsz["meta_cluster"]["leader"].as_str().map(str::to_owned));
                agreed &= leader.is_some_and(|l| !l.is_empty());
            }
            if agreed {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the nats cluster elected no meta leader within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The index of the server leading `stream`, once it has a leader.
    pub async fn leader_of(&self, stream: &str) -> usize {
        let client = async_nats::connect(self.urls())
            .await
            .expect("connect to the cluster");
        let js = async_nats::jetstream::new(client);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let leader = match js.get_stream(stream).await {
                Ok(mut s) => s
                    .info()
                    .await
                    .ok()
                    .and_then(|i| i.cluster.clone())
                    .and_then(|c| c.leader),
                Err(_) => None,
            };
            if let Some(i) =
                leader.and_then(|name| self.servers.iter().position(|s| s.name == name))
            {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "stream {stream} has no leader within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}
