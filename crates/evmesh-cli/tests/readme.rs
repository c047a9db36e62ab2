//! README.md, run as printed. Every ```sh block runs in order, as its own
//! `bash -euo pipefail`, in one scratch directory, against the binaries this build
//! made; a ```text block right after it is the output it must print. What a newcomer
//! pastes is what CI runs, so a README that drifts from the code fails the build.
//!
//! The README annotates blocks with HTML comments, which GitHub does not show:
//! - `<!-- readme-test: skip, REASON -->`: not run (Docker, the test command itself);
//! - `<!-- readme-test: tail -->`: runs until stopped; its first seconds are checked;
//! - `<!-- readme-test: ids from the output above -->`: the 32-hex-digit ids in the
//!   block stand for the ones the previous block printed, in order.
//!
//! In expected output, `…` matches anything within a line, and a line of `…` alone
//! any number of lines.
//!
//! Stand-ins on PATH, each recording its PID so that the test stops what it started:
//! `evmesh` and the shop's binaries are the ones this build made (also as
//! `target/release/…` in the scratch directory); `cargo build` is a no-op and
//! `cargo run [-p P --bin B] -- ARGS` runs that binary; `grpcurl` is the real one,
//! pointed at this test's node. The node listens on a free port instead of 50051
//! (EVMESH_LISTEN and EVMESH_SERVER), and outputs say 50051 again before they are
//! compared.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_evmesh");
/// The binaries a `cargo run -p evmesh-shop --bin B` may name.
const SHOP_BINS: [&str; 6] = [
    "shop",
    "order",
    "payment",
    "inventory",
    "shipping",
    "order-status",
];
/// How long one block may take.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a `tail` block runs before it is stopped.
const TAIL_FOR: Duration = Duration::from_secs(3);

#[derive(Debug, Default)]
struct Block {
    /// Line of the README where the block starts, for messages.
    line: usize,
    script: String,
    expected: Option<String>,
    marker: Option<String>,
}

/// The ```sh blocks of the README, with the ```text block after each and the
/// readme-test comment before it.
fn blocks(readme: &str) -> Vec<Block> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut out: Vec<Block> = Vec::new();
    let mut marker: Option<String> = None;
    // An sh block just ended, with only blank lines since: a text block here is its
    // output.
    let mut after_sh = false;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim_end();
        let was_after_sh = std::mem::replace(&mut after_sh, false);
        if line.is_empty() {
            after_sh = was_after_sh;
        } else if let Some(rest) = line.strip_prefix("<!-- readme-test:") {
            marker = Some(rest.trim_end_matches("-->").trim().to_owned());
        } else if line == "```sh" || line == "```text" {
            let start = i + 1;
            let mut body = String::new();
            i += 1;
            while i < lines.len() && lines[i].trim_end() != "```" {
                body.push_str(lines[i]);
                body.push('\n');
                i += 1;
            }
            if line == "```sh" {
                out.push(Block {
                    line: start,
                    script: body,
                    expected: None,
                    marker: marker.take(),
                });
                after_sh = true;
            } else if was_after_sh && let Some(block) = out.last_mut() {
                block.expected = Some(body);
            }
        } else if line.starts_with("```") {
            // Another language: skip to its end; a marker never reaches past it.
            i += 1;
            while i < lines.len() && lines[i].trim_end() != "```" {
                i += 1;
            }
            marker = None;
        }
        i += 1;
    }
    out
}

/// Whether `text` matches `pattern`, where `…` matches any characters.
fn line_matches(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('…').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &text[first.len()..];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// Whether the lines of `text` match the lines of `pattern`.
fn output_matches(pattern: &[&str], text: &[&str]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((&"…", rest)) => (0..=text.len()).any(|skip| output_matches(rest, &text[skip..])),
        Some((p, rest)) => text
            .split_first()
            .is_some_and(|(t, text)| line_matches(p, t) && output_matches(rest, text)),
    }
}

/// The 32-hex-digit ids in `text`, in order.
fn hex_ids(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_ascii_hexdigit())
        .filter(|w| w.len() == 32)
        .map(str::to_owned)
        .collect()
}

/// Stops every process the stand-ins recorded, also when the test fails.
struct Pids(PathBuf);

impl Drop for Pids {
    fn drop(&mut self) {
        let Ok(pids) = std::fs::read_to_string(&self.0) else {
            return;
        };
        let pids: Vec<&str> = pids.split_whitespace().collect();
        for pid in &pids {
            let _ = Command::new("kill")
                .args(["-TERM", pid])
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for pid in &pids {
            while Instant::now() < deadline
                && Path::new(&format!("/proc/{pid}")).exists()
                && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z "))
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = Command::new("kill")
                .args(["-KILL", pid])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_script(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The stand-ins, in `dir`.
fn stand_ins(dir: &Path, pids: &Path, port: u16) {
    let built = Path::new(BIN).parent().unwrap();
    let record = format!("echo $$ >> '{}'\n", pids.display());
    write_script(
        &dir.join("evmesh"),
        &format!("#!/usr/bin/env bash\n{record}exec '{BIN}' \"$@\"\n"),
    );
    for bin in SHOP_BINS {
        let real = built.join(bin);
        assert!(
            real.exists(),
            "{} is not built: run the tests with `cargo test --workspace` (or `cargo build -p evmesh-shop` first)",
            real.display()
        );
        write_script(
            &dir.join(bin),
            &format!(
                "#!/usr/bin/env bash\n{record}exec '{}' \"$@\"\n",
                real.display()
            ),
        );
    }
    let grpcurl = evmesh_tests::require_tool("grpcurl");
    write_script(
        &dir.join("grpcurl"),
        &format!(
            "#!/usr/bin/env bash\n{record}args=()\nfor a in \"$@\"; do\n  a=${{a//localhost:50051/127.0.0.1:{port}}}\n  args+=(\"${{a//127.0.0.1:50051/127.0.0.1:{port}}}\")\ndone\nexec '{}' \"${{args[@]}}\"\n",
            grpcurl.display()
        ),
    );
    let shop_cases: Vec<String> = SHOP_BINS
        .iter()
        .map(|b| format!("evmesh-shop:{b}"))
        .collect();
    write_script(
        &dir.join("cargo"),
        &format!(
            r#"#!/usr/bin/env bash
# cargo, as the README uses it: the binaries are built already.
set -euo pipefail
sub=$1; shift
case "$sub" in
  build|install) exit 0 ;;
  run) ;;
  *) echo "readme test: the README runs cargo $sub, which this stand-in does not know" >&2; exit 1 ;;
esac
pkg=evmesh-cli; bin=
while [ $# -gt 0 ]; do
  case "$1" in
    --release) shift ;;
    -p|--package) pkg=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "readme test: cargo run $1 is not a flag this stand-in knows" >&2; exit 1 ;;
  esac
done
case "$pkg:$bin" in
  evmesh-cli:|evmesh-cli:evmesh) exec '{dir}/evmesh' "$@" ;;
  {shop_cases}) exec '{dir}'/"$bin" "$@" ;;
  *) echo "error: cargo run -p $pkg ${{bin:+--bin $bin}}: no such binary" >&2; exit 101 ;;
esac
"#,
            dir = dir.display(),
            shop_cases = shop_cases.join("|"),
        ),
    );
}

/// Runs one block; its stdout, stderr and whether it exited 0.
fn run(block: &Block, script: &str, dir: &Path, env: &[(&str, String)]) -> (String, String, bool) {
    let stdout = dir.join(".block.out");
    let stderr = dir.join(".block.err");
    let mut command = Command::new("bash");
    command
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .process_group(0);
    for key in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_SERVICE_NAME",
        "RUST_LOG",
    ] {
        command.env_remove(key);
    }
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().unwrap();
    let tail = block.marker.as_deref() == Some("tail");
    let limit = if tail { TAIL_FOR } else { BLOCK_TIMEOUT };
    let started = Instant::now();
    let ok = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.success();
        }
        if started.elapsed() > limit {
            // The block's whole process group, by the block's PID (grpcurl does not
            // stop on SIGTERM while it streams).
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            assert!(
                tail,
                "README.md:{}: the block did not finish within {limit:?}:\n{script}",
                block.line
            );
            break true;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        std::fs::read_to_string(stdout).unwrap(),
        std::fs::read_to_string(stderr).unwrap(),
        ok,
    )
}

#[test]
fn readme_runs_as_printed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    let shims = dir.join(".bin");
    std::fs::create_dir_all(&shims).unwrap();
    std::fs::create_dir_all(dir.join("target")).unwrap();
    std::os::unix::fs::symlink(&shims, dir.join("target/release")).unwrap();
    std::os::unix::fs::symlink(root.join("examples"), dir.join("examples")).unwrap();
    let pids = Pids(dir.join(".pids"));
    let port = free_port();
    stand_ins(&shims, &pids.0, port);
    let path = format!(
        "{}:{}",
        shims.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let env = [
        ("PATH", path),
        ("EVMESH_LISTEN", format!("127.0.0.1:{port}")),
        ("EVMESH_HTTP_LISTEN", "127.0.0.1:0".to_owned()),
        ("EVMESH_SERVER", format!("http://127.0.0.1:{port}")),
    ];

    let blocks = blocks(&readme);
    assert!(
        blocks.len() >= 10,
        "README.md has only {} sh blocks",
        blocks.len()
    );
    let mut ran = 0;
    let mut previous = String::new();
    for block in &blocks {
        let marker = block.marker.as_deref().unwrap_or("");
        if marker.starts_with("skip") {
            continue;
        }
        let mut script = block.script.clone();
        if marker == "ids from the output above" {
            let printed = hex_ids(&previous);
            for (i, id) in hex_ids(&block.script).iter().enumerate() {
                let real = printed.get(i).unwrap_or_else(|| {
                    panic!(
                        "README.md:{}: the block uses id {id}, but the output above has only {} ids:\n{previous}",
                        block.line,
                        printed.len()
                    )
                });
                script = script.replacen(id.as_str(), real, 1);
            }
        }
        let (stdout, stderr, ok) = run(block, &script, dir, &env);
        let stdout = stdout
            .replace(&format!("127.0.0.1:{port}"), "127.0.0.1:50051")
            .replace(&format!("localhost:{port}"), "localhost:50051");
        assert!(
            ok,
            "README.md:{}: the block failed:\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            block.line
        );
        if let Some(expected) = &block.expected {
            let pattern: Vec<&str> = expected.lines().map(str::trim_end).collect();
            let text: Vec<&str> = stdout.lines().map(str::trim_end).collect();
            assert!(
                output_matches(&pattern, &text),
                "README.md:{}: the output differs from the README's:\n{script}\n--- README\n{expected}\n--- printed\n{stdout}\n--- stderr\n{stderr}",
                block.line
            );
        }
        previous = stdout;
        ran += 1;
    }
    assert!(ran >= 10, "only {ran} README blocks ran");
}

/// `cargo run --release -- serve` in the root runs the `evmesh` binary: the
/// workspace's default members are exactly the package that has it.
#[test]
fn cargo_run_in_the_root_is_evmesh() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let defaults = meta["workspace_default_members"].as_array().unwrap();
    let bins: Vec<&str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| defaults.contains(&p["id"]))
        .flat_map(|p| p["targets"].as_array().unwrap())
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(bins, ["evmesh"], "{defaults:?}");
}

#[test]
fn expected_output_patterns() {
    assert!(line_matches("a…c", "abbbc"));
    assert!(line_matches("…", ""));
    assert!(!line_matches("a…c", "abbb"));
    assert!(!line_matches("abc", "abcd"));
    assert!(output_matches(&["x", "…", "z"], &["x", "y", "y", "z"]));
    assert!(output_matches(&["x", "…"], &["x"]));
    assert!(!output_matches(&["x", "z"], &["x", "y", "z"]));
    assert_eq!(
        hex_ids("(evmesh chain 4b54409905e1c0b8326f145ac929cd77)"),
        ["4b54409905e1c0b8326f145ac929cd77"]
    );
}
