//! `evmesh backup` and `evmesh restore`: a running node's log to a file, and a file
//! laid out as a data directory `evmesh serve` starts on.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use evmesh_proto::v1 as pb;
use sha2::{Digest as _, Sha256};

use crate::commands::{NodeArg, channel, rpc};

#[derive(clap::Args)]
pub(crate) struct BackupArgs {
    #[command(flatten)]
    pub(crate) node: NodeArg,
    /// Where to write the snapshot; a file already there is replaced once the new
    /// one is whole.
    #[arg(long, short)]
    output: PathBuf,
}

#[derive(clap::Args)]
pub(crate) struct RestoreArgs {
    /// A file `evmesh backup` wrote.
    file: PathBuf,
    /// The data directory to lay it out in; it must not hold a log already.
    #[arg(long, env = "EVMESH_DATA", default_value = "./evmesh-data")]
    data: PathBuf,
}

/// A progress bar over `total` bytes on stderr, drawn only on a terminal.
fn progress(total: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}

/// `path` with `suffix` added to its file name.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Makes a file's rename durable: syncs the directory that holds it.
fn sync_dir(file: &Path) -> anyhow::Result<()> {
    let dir = match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

pub(crate) async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let mut client = pb::mesh_client::MeshClient::new(channel(&args.node).await?)
        .max_decoding_message_size(4 * 1024 * 1024);
    let mut stream = client
        .backup(pb::BackupRequest {})
        .await
        .map_err(rpc)?
        .into_inner();
    let partial = beside(&args.output, ".partial");
    let written = async {
        let mut file = std::fs::File::create(&partial)
            .with_context(|| format!("cannot write {}", partial.display()))?;
        let mut digest = Sha256::new();
        let mut bar: Option<indicatif::ProgressBar> = None;
        let (mut bytes, mut head) = (0u64, 0u64);
        loop {
            let Some(chunk) = stream.message().await.map_err(rpc)? else {
                bail!("the node stopped sending the backup before its end");
            };
            if chunk.total_bytes > 0 {
                bar = Some(progress(chunk.total_bytes, "backup"));
                head = chunk.head_sequence;
            }
            if !chunk.sha256.is_empty() {
                if chunk.sha256 != digest.finalize().as_slice() {
                    bail!("the backup arrived damaged (its SHA-256 differs from the node's)");
                }
                break;
            }
            digest.update(&chunk.data);
            file.write_all(&chunk.data)
                .with_context(|| format!("writing {}", partial.display()))?;
            bytes += chunk.data.len() as u64;
            if let Some(bar) = &bar {
                bar.set_position(bytes);
            }
        }
        file.sync_all()
            .with_context(|| format!("syncing {}", partial.display()))?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        Ok((bytes, head))
    }
    .await;
    let (bytes, head) = match written {
        Ok(done) => done,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, &args.output).with_context(|| {
        format!(
            "renaming {} to {}",
            partial.display(),
            args.output.display()
        )
    })?;
    sync_dir(&args.output)?;
    println!(
        "backup of {bytes} bytes, events up to sequence {head}, in {}",
        args.output.display()
    );
    Ok(())
}

pub(crate) async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let summary = evmesh_store::sqlite::check_snapshot(&args.file)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("cannot create {}", args.data.display()))?;
    let target = args.data.join(evmesh_store::sqlite::DB_FILE);
    for existing in [target.clone(), beside(&target, "-wal")] {
        if existing.exists() {
            bail!(
                "{} already holds a log ({}): restore into an empty directory, or move it aside",
                args.data.display(),
                existing.display()
            );
        }
    }
    let partial = beside(&target, ".restoring");
    let copied = copy_with_progress(&args.file, &partial);
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, &target)
        .with_context(|| format!("renaming {} to {}", partial.display(), target.display()))?;
    sync_dir(&target)?;
    println!(
        "restored {} events (up to sequence {}), {} groups and {} schema versions into {}",
        summary.events,
        summary.head_sequence,
        summary.groups,
        summary.schemas,
        target.display()
    );
    Ok(())
}

/// Copies `from` to `to` (created), synced, with a progress bar.
fn copy_with_progress(from: &Path, to: &Path) -> anyhow::Result<()> {
    use std::io::Read as _;
    let mut source =
        std::fs::File::open(from).with_context(|| format!("cannot read {}", from.display()))?;
    let total = source.metadata()?.len();
    let mut target =
        std::fs::File::create(to).with_context(|| format!("cannot write {}", to.display()))?;
    let bar = progress(total, "restore");
    let mut buf = vec![0; 1 << 20];
    loop {
        let n = source
            .read(&mut buf)
            .with_context(|| format!("reading {}", from.display()))?;
        if n == 0 {
            break;
        }
        target
            .write_all(&buf[..n])
            .with_context(|| format!("writing {}", to.display()))?;
        bar.inc(n as u64);
    }
    target
        .sync_all()
        .with_context(|| format!("syncing {}", to.display()))?;
    bar.finish_and_clear();
    Ok(())
}
