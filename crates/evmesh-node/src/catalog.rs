//! The registered schemas, compiled, and the reflection index over them and the
//! node's own API. A catalog is immutable; a registration swaps in a new one, so
//! the publish path reads a consistent snapshot without waiting.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use evmesh_schema::Schema;
use prost::Message;
use prost_types::{DescriptorProto, FileDescriptorProto, FileDescriptorSet};
use semver::Version;

/// One registered version.
#[derive(Debug)]
pub(crate) struct Entry {
    pub schema: Schema,
    pub registered_at: SystemTime,
}

/// Event type → version → schema, and what reflection serves.
#[derive(Default)]
pub(crate) struct Catalog {
    pub types: BTreeMap<String, BTreeMap<Version, Arc<Entry>>>,
    pub reflection: ReflectionIndex,
}

impl Catalog {
    /// The given version of a type's schema, or its latest.
    pub(crate) fn resolve(
        &self,
        event_type: &str,
        version: Option<&Version>,
    ) -> Option<(&Version, &Arc<Entry>)> {
        let versions = self.types.get(event_type)?;
        match version {
            Some(v) => versions.get_key_value(v),
            None => versions.iter().next_back(),
        }
    }
}

/// The current catalog; swapped whole on every registration.
pub(crate) struct Catalogs {
    base: Vec<FileDescriptorSet>,
    current: RwLock<Arc<Catalog>>,
}

impl Catalogs {
    /// `base`: the encoded descriptor sets of the services the node serves.
    pub(crate) fn new(base: &[&[u8]]) -> Result<Self, prost::DecodeError> {
        let base = base
            .iter()
            .map(|bytes| FileDescriptorSet::decode(*bytes))
            .collect::<Result<Vec<_>, _>>()?;
        let catalogs = Self {
            base,
            current: RwLock::new(Arc::default()),
        };
        catalogs.replace(BTreeMap::new());
        Ok(catalogs)
    }

    pub(crate) fn load(&self) -> Arc<Catalog> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Installs these schemas, rebuilding the reflection index: the node's own files
    /// first, then the latest version of each type.
    pub(crate) fn replace(&self, types: BTreeMap<String, BTreeMap<Version, Arc<Entry>>>) {
        let mut reflection = ReflectionIndex::default();
        for set in &self.base {
            reflection.add(set);
        }
        for versions in types.values() {
            if let Some(latest) = versions.values().next_back() {
                match FileDescriptorSet::decode(latest.schema.encoded()) {
                    Ok(set) => reflection.add(&set),
                    Err(e) => tracing::error!(error = %e, "a stored schema does not decode"),
                }
            }
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(Catalog { types, reflection });
    }

    /// A copy of the current types with one more version, to install with `replace`.
    pub(crate) fn with(
        &self,
        event_type: &str,
        version: Version,
        entry: Entry,
    ) -> BTreeMap<String, BTreeMap<Version, Arc<Entry>>> {
        let mut types = self.load().types.clone();
        types
            .entry(event_type.to_owned())
            .or_default()
            .insert(version, Arc::new(entry));
        types
    }
}

struct IndexedFile {
    encoded: Vec<u8>,
    dependencies: Vec<String>,
}

/// Files by name and the file defining each symbol, for server reflection.
#[derive(Default)]
pub(crate) struct ReflectionIndex {
    files: HashMap<String, IndexedFile>,
    symbols: HashMap<String, String>,
}

fn qualify(package: &str, name: &str) -> String {
    if package.is_empty() {
        name.to_owned()
    } else {
        format!("{package}.{name}")
    }
}

impl ReflectionIndex {
    /// Adds the files of `set`; a file name already present keeps its first content.
    fn add(&mut self, set: &FileDescriptorSet) {
        for file in &set.file {
            let name = file.name().to_owned();
            let encoded = file.encode_to_vec();
            if let Some(existing) = self.files.get(&name) {
                if existing.encoded != encoded {
                    tracing::warn!(file = %name, "two schemas hold different files of one name; reflection serves the first");
                }
                continue;
            }
            self.symbols_of(file, &name);
            self.files.insert(
                name,
                IndexedFile {
                    encoded,
                    dependencies: file.dependency.clone(),
                },
            );
        }
    }

    fn symbols_of(&mut self, file: &FileDescriptorProto, name: &str) {
        let package = file.package();
        fn messages(
            index: &mut ReflectionIndex,
            scope: &str,
            list: &[DescriptorProto],
            file: &str,
        ) {
            for m in list {
                let full = qualify(scope, m.name());
                for e in &m.enum_type {
                    index
                        .symbols
                        .insert(qualify(&full, e.name()), file.to_owned());
                }
                messages(index, &full, &m.nested_type, file);
                index.symbols.entry(full).or_insert_with(|| file.to_owned());
            }
        }
        messages(self, package, &file.message_type, name);
        for e in &file.enum_type {
            self.symbols
                .entry(qualify(package, e.name()))
                .or_insert_with(|| name.to_owned());
        }
        for s in &file.service {
            let service = qualify(package, s.name());
            for m in &s.method {
                self.symbols
                    .insert(qualify(&service, m.name()), name.to_owned());
            }
            self.symbols
                .entry(service)
                .or_insert_with(|| name.to_owned());
        }
    }

    /// The file and everything it imports, transitively, the file first.
    pub(crate) fn file_with_imports(&self, name: &str) -> Option<Vec<Vec<u8>>> {
        self.files.get(name)?;
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut todo = vec![name.to_owned()];
        while let Some(next) = todo.pop() {
            if !seen.insert(next.clone()) {
                continue;
            }
            if let Some(file) = self.files.get(&next) {
                out.push(file.encoded.clone());
                todo.extend(file.dependencies.iter().cloned());
            }
        }
        Some(out)
    }

    pub(crate) fn file_defining(&self, symbol: &str) -> Option<Vec<Vec<u8>>> {
        let symbol = symbol.strip_prefix('.').unwrap_or(symbol);
        self.file_with_imports(self.symbols.get(symbol)?)
    }
}
