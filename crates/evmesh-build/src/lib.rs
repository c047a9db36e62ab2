//! For a service's `build.rs`: compiles its .proto files with protox (no protoc) and
//! prost, embeds their descriptor set, and implements `evmesh_client::Event` for every
//! message marked with an event type:
//!
//! ```proto
//! import "evmesh/v1/options.proto";
//! message OrderPlaced {
//!   option (evmesh.v1.event_type) = "shop.order.placed";
//!   string order_id = 1;
//! }
//! ```
//!
//! ```no_run
//! // in build.rs's main:
//! evmesh_build::compile(&["proto/shop/v1/shop.proto"], &["proto"])?;
//! # Ok::<(), evmesh_build::Error>(())
//! ```
//!
//! and in the crate: `include!(concat!(env!("OUT_DIR"), "/shop.v1.rs"));` inside a
//! module, as with prost. `evmesh/v1/options.proto` is provided; it need not be on the
//! include path. This crate has no feature flags. It runs at build time only.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use heck::ToUpperCamelCase;
use prost::Message;
use prost_reflect::{DescriptorPool, Value};

/// The option file services import to mark their event messages.
pub const OPTIONS_PROTO: &str = include_str!("../../../proto/evmesh/v1/options.proto");

/// The name of the descriptor set file written to OUT_DIR.
pub const DESCRIPTOR_FILE: &str = "evmesh_descriptor_set.bin";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("OUT_DIR is not set: run from a build script")]
    NoOutDir,
    #[error("compiling protos: {0}")]
    Compile(String),
    #[error("generating Rust: {0}")]
    Generate(#[from] std::io::Error),
    #[error("message {message}: event type {event_type:?} is not dotted lowercase tokens")]
    BadEventType { message: String, event_type: String },
}

/// Compiles `files` (found under `includes`) into OUT_DIR: prost's `{package}.rs`
/// files, each with the `Event` impls of its marked messages appended.
pub fn compile(files: &[impl AsRef<Path>], includes: &[impl AsRef<Path>]) -> Result<(), Error> {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or(Error::NoOutDir)?);
    compile_into(files, includes, &out_dir)
}

/// Like [`compile`], into `out_dir`.
pub fn compile_into(
    files: &[impl AsRef<Path>],
    includes: &[impl AsRef<Path>],
    out_dir: &Path,
) -> Result<(), Error> {
    let own = out_dir.join("evmesh-build-include");
    std::fs::create_dir_all(own.join("evmesh/v1"))?;
    std::fs::write(own.join("evmesh/v1/options.proto"), OPTIONS_PROTO)?;
    let mut include_dirs: Vec<PathBuf> = includes.iter().map(|p| p.as_ref().to_owned()).collect();
    include_dirs.push(own);
    for file in files {
        println!("cargo:rerun-if-changed={}", file.as_ref().display());
    }
    for dir in includes {
        println!("cargo:rerun-if-changed={}", dir.as_ref().display());
    }

    let mut compiler =
        protox::Compiler::new(&include_dirs).map_err(|e| Error::Compile(e.to_string()))?;
    compiler.include_imports(true).include_source_info(true);
    compiler
        .open_files(files.iter().map(AsRef::as_ref))
        .map_err(|e| Error::Compile(e.to_string()))?;
    let pool = compiler.descriptor_pool();
    let set = compiler.file_descriptor_set();
    std::fs::write(out_dir.join(DESCRIPTOR_FILE), set.encode_to_vec())?;

    // Well-known types map to prost-types, and evmesh's option file holds no
    // messages: prost writes only the service's own packages.
    let mut config = prost_build::Config::new();
    config.out_dir(out_dir);
    config
        .compile_fds(set)
        .map_err(|e| Error::Compile(e.to_string()))?;

    append_event_impls(&pool, out_dir)
}

fn append_event_impls(pool: &DescriptorPool, out_dir: &Path) -> Result<(), Error> {
    let Some(extension) = pool.get_extension_by_name("evmesh.v1.event_type") else {
        return Ok(()); // no file imports the option: nothing is marked
    };
    let mut by_package: std::collections::BTreeMap<String, String> = Default::default();
    for message in pool.all_messages() {
        let options = message.options();
        if !options.has_extension(&extension) {
            continue;
        }
        let Value::String(event_type) = options.get_extension(&extension).into_owned() else {
            continue;
        };
        let valid = !event_type.is_empty()
            && event_type.split('.').all(|t| {
                !t.is_empty()
                    && t.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                    })
            });
        if !valid {
            return Err(Error::BadEventType {
                message: message.full_name().to_owned(),
                event_type,
            });
        }
        // The Rust path of the message inside its package module.
        let package = message.package_name().to_owned();
        let within = message
            .full_name()
            .strip_prefix(&format!("{package}."))
            .unwrap_or(message.full_name());
        let mut parts: Vec<&str> = within.split('.').collect();
        let last = parts.pop().unwrap_or_default().to_upper_camel_case();
        let path: Vec<String> = parts
            .iter()
            .map(|p| heck::ToSnakeCase::to_snake_case(*p))
            .chain([last])
            .collect();
        let code = by_package.entry(package).or_default();
        let _ = write!(
            code,
            "\nimpl ::evmesh_client::Event for {path} {{\n    const TYPE: &'static str = {event_type:?};\n    const MESSAGE: &'static str = {message:?};\n    fn descriptor_set() -> &'static [u8] {{\n        include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{DESCRIPTOR_FILE}\"))\n    }}\n}}\n",
            path = path.join("::"),
            message = message.full_name(),
        );
    }
    for (package, code) in by_package {
        let file = out_dir.join(format!(
            "{}.rs",
            if package.is_empty() { "_" } else { &package }
        ));
        let mut text = std::fs::read_to_string(&file).unwrap_or_default();
        text.push_str("\n// evmesh-build: Event impls for messages with (evmesh.v1.event_type)\n");
        text.push_str(&code);
        std::fs::write(file, text)?;
    }
    Ok(())
}
