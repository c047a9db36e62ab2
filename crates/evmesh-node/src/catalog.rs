//! The registered schemas, compiled, and the reflection index over them and the
//! node's own API. A catalog is immutable; a registration swaps in a new one, so
//! the publish path reads a consistent snapshot without waiting.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use evmesh_schema::{Schema, quoted};
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
    /// The node's own files: what reflection serves before any schema.
    base: ReflectionIndex,
    current: RwLock<Arc<Catalog>>,
}

impl Catalogs {
    /// `base`: the encoded descriptor sets of the services the node serves.
    pub(crate) fn new(base: &[&[u8]]) -> Result<Self, prost::DecodeError> {
        let mut index = ReflectionIndex::default();
        for bytes in base {
            for file in FileDescriptorSet::decode(*bytes)?.file {
                index.add_file(file);
            }
        }
        let catalogs = Self {
            base: index,
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
        let mut reflection = self.base.clone();
        for (event_type, versions) in &types {
            if let Some((version, latest)) = versions.iter().next_back() {
                match FileDescriptorSet::decode(latest.schema.encoded()) {
                    Ok(set) => reflection.add_schema(set, event_type, version),
                    Err(e) => tracing::error!(error = %e, "a stored schema does not decode"),
                }
            }
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(Catalog { types, reflection });
    }

    /// Why `schema` cannot be registered beside the node's own API: a file of the
    /// same name with other content, or a symbol the API defines (which would change
    /// what reflection says of `evmesh.v1.Mesh`, say).
    pub(crate) fn clash(&self, schema: &Schema) -> Option<String> {
        let set = FileDescriptorSet::decode(schema.encoded()).ok()?;
        for file in &set.file {
            let name = file.name();
            if let Some(own) = self.base.files.get(name) {
                if own.encoded != file.encode_to_vec() {
                    return Some(format!(
                        "descriptor_set: file {} is a file of the node's own API with other content; give your file another name",
                        quoted(name)
                    ));
                }
                continue;
            }
            let mut defined = ReflectionIndex::default();
            defined.symbols_of(file, name);
            let mut symbols: Vec<&String> = defined.symbols.keys().collect();
            symbols.sort();
            if let Some(symbol) = symbols
                .into_iter()
                .find(|s| self.base.symbols.contains_key(*s))
            {
                return Some(format!(
                    "descriptor_set: file {} defines {}, which the node's own API defines; use another package",
                    quoted(name),
                    quoted(symbol)
                ));
            }
        }
        None
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

#[derive(Clone)]
struct IndexedFile {
    encoded: Vec<u8>,
    dependencies: Vec<String>,
}

/// Files by name and the file defining each symbol, for server reflection.
#[derive(Default, Clone)]
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
    /// Adds one file; a file name already present keeps its first content.
    fn add_file(&mut self, file: FileDescriptorProto) {
        let name = file.name().to_owned();
        if self.files.contains_key(&name) {
            return;
        }
        self.symbols_of(&file, &name);
        self.files.insert(
            name,
            IndexedFile {
                encoded: file.encode_to_vec(),
                dependencies: file.dependency,
            },
        );
    }

    /// Adds the files of one type's schema. Two types may hold different files of
    /// one name (each its own `common.proto`): the later one's files that clash, and
    /// every file of its set that imports them, are served under a name of their own,
    /// `evmesh/types/{type}/{version}/{name}`, imports rewritten, so that each type
    /// resolves to its own content.
    fn add_schema(&mut self, set: FileDescriptorSet, event_type: &str, version: &Version) {
        let mut renamed: HashSet<String> = set
            .file
            .iter()
            .filter(|f| {
                self.files
                    .get(f.name())
                    .is_some_and(|indexed| indexed.encoded != f.encode_to_vec())
            })
            .map(|f| f.name().to_owned())
            .collect();
        loop {
            let before = renamed.len();
            for f in &set.file {
                if !renamed.contains(f.name()) && f.dependency.iter().any(|d| renamed.contains(d)) {
                    renamed.insert(f.name().to_owned());
                }
            }
            if renamed.len() == before {
                break;
            }
        }
        let prefix = format!("evmesh/types/{event_type}/{version}/");
        for mut file in set.file {
            if renamed.contains(file.name()) {
                file.name = Some(format!("{prefix}{}", file.name()));
            }
            for dependency in &mut file.dependency {
                if renamed.contains(dependency.as_str()) {
                    *dependency = format!("{prefix}{dependency}");
                }
            }
            self.add_file(file);
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
