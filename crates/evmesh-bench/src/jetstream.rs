//! The peer: NATS JetStream, driven directly with async-nats. A `nats-server -js`
//! child with file storage; a stream of one replica; async publishes with acks,
//! [`WINDOW`] in flight per connection, as evmesh's publishers keep.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream;
use tokio::sync::{Semaphore, mpsc};

use crate::load::WINDOW;

/// A `nats-server` with JetStream over a temporary directory, stopped on drop or
/// when this process ends.
pub struct NatsServer {
    addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        // Fail clearly when it is not installed.
        Command::new("nats-server")
            .arg("--version")
            .output()
            .context(
                "cannot run nats-server (Debian package nats-server; scripts/test installs it)",
            )?;
        // Under a shell that stops it once this process's end of its stdin closes,
        // however this process ends.
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"nats-server "$@" & pid=$!; trap 'kill $pid; wait $pid' EXIT; cat >/dev/null"#)
            .arg("nats-server")
            .args(["--jetstream", "--addr", "127.0.0.1", "--port"])
            .arg(addr.port().to_string())
            .arg("--store_dir")
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nats-server")?;
        let server = Self {
            addr,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if Instant::now() > deadline {
                bail!("nats-server did not listen on {addr} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(server)
    }

    async fn context(&self) -> anyhow::Result<jetstream::Context> {
        let client = async_nats::connect(self.addr.to_string()).await?;
        Ok(jetstream::context::ContextBuilder::new()
            .max_ack_inflight(WINDOW)
            .build(client))
    }

    /// `streams` connections publishing `n` messages of `payload` bytes in all to
    /// a fresh stream; returns how many were acked and how long it took.
    pub async fn publish(
        &self,
        streams: u64,
        n: u64,
        payload: usize,
    ) -> anyhow::Result<(u64, Duration)> {
        let admin = self.context().await?;
        let name = format!("BENCH{streams}");
        admin
            .create_stream(jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![format!("bench{streams}.>")],
                storage: jetstream::stream::StorageType::File,
                num_replicas: 1,
                ..Default::default()
            })
            .await
            .context("creating the JetStream stream")?;
        let mut contexts = Vec::new();
        for _ in 0..streams {
            contexts.push(self.context().await?);
        }
        let subject = format!("bench{streams}.order.placed");
        let per = n / streams;
        let start = Instant::now();
        let tasks: Vec<_> = contexts
            .into_iter()
            .map(|js| tokio::spawn(publisher(js, subject.clone(), per, payload)))
            .collect();
        let mut acked = 0;
        for t in tasks {
            acked += t.await??;
        }
        let elapsed = start.elapsed();
        admin.delete_stream(&name).await?;
        Ok((acked, elapsed))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // Closing its stdin ends the shell, whose exit stops nats-server.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// One connection's publishes: the sender keeps at most [`WINDOW`] unacked, the
/// receiver awaits the acks in order.
async fn publisher(
    js: jetstream::Context,
    subject: String,
    n: u64,
    payload: usize,
) -> anyhow::Result<u64> {
    let body = vec![0xab_u8; payload];
    let credits = std::sync::Arc::new(Semaphore::new(WINDOW));
    let (tx, mut rx) = mpsc::channel::<jetstream::context::PublishAckFuture>(WINDOW);
    let acks = {
        let credits = credits.clone();
        tokio::spawn(async move {
            let mut acked = 0u64;
            while let Some(ack) = rx.recv().await {
                ack.await.context("JetStream publish ack")?;
                acked += 1;
                credits.add_permits(1);
            }
            anyhow::Ok(acked)
        })
    };
    for _ in 0..n {
        credits.acquire().await?.forget();
        let ack = js
            .publish(subject.clone(), body.clone().into())
            .await
            .context("JetStream publish")?;
        if tx.send(ack).await.is_err() {
            break;
        }
    }
    drop(tx);
    acks.await?
}
