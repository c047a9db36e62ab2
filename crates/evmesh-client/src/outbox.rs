//! The outbox relay: publishes what handlers wrote to `evmesh_outbox`, in order, and
//! deletes each row once the node has acked it. Ids were fixed when the rows were
//! written, so a row sent twice (after a crash between the ack and the delete) is a
//! duplicate that the node absorbs.

use std::sync::Arc;
use std::time::Duration;

use evmesh_proto::v1 as pb;
use prost::Message;
use sqlx::{Row, SqlitePool};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::{Error, Publisher};

/// Rows sent at a time.
const BATCH: i64 = 512;
/// How long the relay waits before looking again when nothing woke it.
const IDLE: Duration = Duration::from_secs(1);

/// A running relay.
pub struct Relay {
    notify: Arc<Notify>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Relay {
    pub(crate) fn start(pool: SqlitePool, publisher: Publisher) -> Self {
        let notify = Arc::new(Notify::new());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(pool, publisher, notify.clone(), stopped));
        Self { notify, stop, task }
    }

    /// Tells the relay that rows were committed.
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Stops after the batch in flight.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}

async fn run(
    pool: SqlitePool,
    publisher: Publisher,
    notify: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        match relay_once(&pool, &publisher).await {
            Ok(0) => {
                tokio::select! {
                    () = notify.notified() => {}
                    () = tokio::time::sleep(IDLE) => {}
                    _ = stop.changed() => {}
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "outbox relay; retrying");
                tokio::select! {
                    () = tokio::time::sleep(IDLE) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

/// Sends one batch; returns how many rows were acked and deleted.
async fn relay_once(pool: &SqlitePool, publisher: &Publisher) -> Result<usize, Error> {
    let rows = sqlx::query("SELECT seq, envelope FROM evmesh_outbox ORDER BY seq LIMIT ?")
        .bind(BATCH)
        .fetch_all(pool)
        .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut sends = Vec::with_capacity(rows.len());
    for row in &rows {
        let seq: i64 = row.get(0);
        let envelope = pb::Event::decode(row.get::<&[u8], _>(1)).map_err(|e| {
            Error::InvalidArgument(format!("outbox row {seq} does not decode: {e}"))
        })?;
        // All go out on the one stream at once, in order; acks come back in order.
        sends.push(async move { (seq, publisher.publish(envelope).await) });
    }
    crate::failpoint("relay_before_publish");
    let results = futures_util::future::join_all(sends).await;
    let mut acked = Vec::new();
    let mut first_error = None;
    for (seq, result) in results {
        match result {
            Ok(_) => acked.push(seq),
            Err(e) => {
                tracing::error!(outbox_seq = seq, error = %e, "outbox event not published; kept for a retry");
                first_error.get_or_insert(e);
            }
        }
    }
    crate::failpoint("relay_before_delete");
    // Usually every row was acked: one range delete. Otherwise row by row.
    if acked.len() == rows.len() {
        let last = acked.last().copied().unwrap_or(0);
        sqlx::query("DELETE FROM evmesh_outbox WHERE seq <= ?")
            .bind(last)
            .execute(pool)
            .await?;
    } else {
        let mut tx = pool.begin().await?;
        for seq in &acked {
            sqlx::query("DELETE FROM evmesh_outbox WHERE seq = ?")
                .bind(seq)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
    }
    match first_error {
        Some(e) if acked.is_empty() => Err(e),
        _ => Ok(acked.len()),
    }
}
