//! `Backup`: a snapshot the store wrote beside its log, streamed in chunks with
//! its SHA-256 at the end, then removed (also when the client goes away).

use std::io::Read;

use evmesh_proto::v1 as pb;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tonic::Status;

/// Bytes per chunk: well under the transport's message limit.
const CHUNK: usize = 256 * 1024;

/// Removes the snapshot file when dropped.
struct Remove(std::path::PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            tracing::warn!(path = %self.0.display(), error = %e, "removing a backup snapshot");
        }
    }
}

/// Sends the snapshot on `tx` (a blocking thread's work), then its digest.
pub(crate) fn stream(
    snapshot: evmesh_store::Snapshot,
    tx: &mpsc::Sender<Result<pb::BackupChunk, Status>>,
) {
    let _remove = Remove(snapshot.path.clone());
    let mut file = match std::fs::File::open(&snapshot.path) {
        Ok(file) => file,
        Err(e) => {
            let _ = tx.blocking_send(Err(Status::internal(format!("reading the snapshot: {e}"))));
            return;
        }
    };
    let mut digest = Sha256::new();
    let mut first = Some((snapshot.bytes, snapshot.head_sequence));
    let mut sent = 0u64;
    loop {
        let mut data = vec![0; CHUNK];
        let n = match read_full(&mut file, &mut data) {
            Ok(n) => n,
            Err(e) => {
                let _ =
                    tx.blocking_send(Err(Status::internal(format!("reading the snapshot: {e}"))));
                return;
            }
        };
        if n == 0 {
            break;
        }
        data.truncate(n);
        digest.update(&data);
        sent += n as u64;
        let (total_bytes, head_sequence) = first.take().unwrap_or_default();
        let chunk = pb::BackupChunk {
            total_bytes,
            head_sequence,
            data,
            sha256: Vec::new(),
        };
        if tx.blocking_send(Ok(chunk)).is_err() {
            tracing::info!(sent, "backup abandoned by its client");
            return;
        }
    }
    let (total_bytes, head_sequence) = first.take().unwrap_or_default();
    let _ = tx.blocking_send(Ok(pb::BackupChunk {
        total_bytes,
        head_sequence,
        data: Vec::new(),
        sha256: digest.finalize().to_vec(),
    }));
    tracing::info!(bytes = sent, "backup sent");
}

/// Reads until `buf` is full or the file ends.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}
