//! What the tests of the `evmesh` binary share: `evmesh serve` as a child process,
//! stopped by its PID.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_evmesh");

pub struct Served {
    pub child: Child,
    pub addr: String,
    /// The HTTP listener's address.
    pub http: String,
    /// Its log lines after the "serving" one, as they come.
    log: mpsc::Receiver<String>,
    logged: std::cell::RefCell<Vec<serde_json::Value>>,
}

impl Served {
    /// A lenient `evmesh serve` (`--allow-unregistered`): the storage tests publish
    /// opaque payloads.
    pub fn start(data: &Path) -> Self {
        Self::start_with(data, &["--allow-unregistered"])
    }

    /// `evmesh serve` on an ephemeral port over `data`; waits for its "serving" line.
    pub fn start_with(data: &Path, extra: &[&str]) -> Self {
        Self::start_on("127.0.0.1:0", data, extra)
    }

    /// `evmesh serve` listening on `listen` over `data`; waits for its "serving"
    /// line.
    pub fn start_on(listen: &str, data: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", listen, "--log-format", "json"])
            // Nodes run side by side: none takes the default HTTP port.
            .args(if extra.contains(&"--http-listen") {
                &[][..]
            } else {
                &["--http-listen", "127.0.0.1:0"][..]
            })
            .args(extra)
            .env("EVMESH_DATA", data)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn evmesh serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (addr, http) = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("serve logs a serving line");
            let v: serde_json::Value = serde_json::from_str(&line).expect("json logs");
            if v["fields"]["message"] == "serving" {
                break (
                    v["fields"]["addr"].as_str().unwrap().to_owned(),
                    v["fields"]["http"].as_str().unwrap_or("off").to_owned(),
                );
            }
        };
        Self {
            child,
            addr,
            http,
            log: rx,
            logged: Default::default(),
        }
    }

    /// The log lines (JSON) since the "serving" one whose message is `message`.
    pub fn logged(&self, message: &str) -> Vec<serde_json::Value> {
        self.all_logged()
            .into_iter()
            .filter(|v| v["fields"]["message"] == message)
            .collect()
    }

    /// Every log line (JSON) since the "serving" one.
    pub fn all_logged(&self) -> Vec<serde_json::Value> {
        let mut logged = self.logged.borrow_mut();
        while let Ok(line) = self.log.try_recv() {
            logged.extend(serde_json::from_str::<serde_json::Value>(&line).ok());
        }
        logged.clone()
    }

    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("EVMESH_SERVER", &self.addr)
            .output()
            .expect("run evmesh")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "evmesh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The node's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGHUP: the node reads its config and auth files again.
    pub fn hangup(&self) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill");
        assert!(sent.success());
    }

    /// SIGKILL: the process ends with nothing cleaned up.
    pub fn kill_9(mut self) {
        let pid = self.child.id().to_string();
        let killed = Command::new("kill")
            .args(["-9", &pid])
            .status()
            .expect("kill");
        assert!(killed.success());
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let killed = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(killed.success());
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("evmesh serve did not exit after SIGTERM");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every event of `ty` in the log, read through `node`, of which there are
/// `expected`: each id with its sequence; panics when an id is there twice.
pub async fn stored(node: &str, ty: &str, expected: usize) -> HashMap<String, u64> {
    let mut client = evmesh_tests::v1::mesh_client::MeshClient::connect(node.to_owned())
        .await
        .unwrap();
    let mut sub = evmesh_tests::Sub::open(
        &mut client,
        evmesh_tests::v1::SubscribeOpen {
            auto_ack: true,
            ..evmesh_tests::open(&[ty])
        },
    )
    .await
    .unwrap();
    let mut ids = HashMap::new();
    for _ in 0..expected {
        let d = sub.next().await;
        let event = d.event.unwrap();
        if let Some(first) = ids.insert(event.id.clone(), d.sequence) {
            panic!("{} stored twice: at {first} and {}", event.id, d.sequence);
        }
    }
    // Nothing more.
    if let Some(extra) = sub.try_next(Duration::from_millis(500)).await {
        panic!("more events than published: {extra:?}");
    }
    ids
}

/// Publishes order `o-{i}` (the test shop's `OrderPlaced`, 100 cents) on its own
/// aggregate.
pub async fn place_order(mesh: &evmesh_client::Mesh, i: usize) -> evmesh_client::pb::PublishAck {
    let order = evmesh_tests::shop::OrderPlaced {
        order_id: format!("o-{i}"),
        total_cents: 100,
    };
    let meta = evmesh_client::Meta {
        aggregate_id: format!("o-{i}"),
        ..evmesh_client::Meta::default()
    };
    mesh.publish(&order, meta).await.unwrap()
}

/// `evmesh nodes --json` through `server`: one value per node.
pub fn nodes_json(server: &str) -> Vec<serde_json::Value> {
    let out = Command::new(BIN)
        .args(["nodes", "--json", "--server", server])
        .output()
        .unwrap();
    assert_ok(&out);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `GET path` on `addr`: the status code, the headers and the body.
pub fn get(addr: &str, path: &str) -> (u16, String, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

/// The value of the sample named exactly `series` (name and labels as printed).
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// `evmesh serve ARGS` over `data`, which must fail: its stderr.
pub fn serve_refused(data: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("serve")
        .args(args)
        .env("EVMESH_DATA", data)
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve {args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A command that succeeded, or a panic showing its stderr.
#[track_caller]
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loopback port nothing listens on (bound, then freed).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}
