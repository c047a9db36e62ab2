//! The registered schemas, compiled, and the reflection index over them and the
//! node's own API. A catalog is immutable; a registration swaps in a new one, so
//! the publish path reads a consistent snapshot without waiting.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use evmesh_schema::{Held, Schema, SchemaError, quoted};
use prost::Message;
use prost_types::{DescriptorProto, FileDescriptorProto, FileDescriptorSet};
use semver::Version;

/// One registered version. The latest version of each type holds its schema
/// compiled; an older one holds only its stored bytes and is compiled when an event
/// names it, through [`Catalog::schema`]. A compiled schema is many times its
/// encoded size (prost-reflect's pool), so a type with many versions costs one
/// compiled version, not all of them.
#[derive(Debug)]
pub(crate) struct Entry {
    pub message_name: String,
    /// The normalised descriptor set, as stored.
    pub encoded: Vec<u8>,
    pub registered_at: SystemTime,
    compiled: Option<Arc<Schema>>,
}

impl Entry {
    /// An entry that holds its compiled schema: the latest version of its type.
    pub(crate) fn compiled(schema: Schema, registered_at: SystemTime) -> Self {
        Self {
            message_name: schema.message_name().to_owned(),
            encoded: schema.encoded().to_vec(),
            registered_at,
            compiled: Some(Arc::new(schema)),
        }
    }

    /// An entry holding only its stored bytes: an older version.
    pub(crate) fn stored(
        message_name: String,
        encoded: Vec<u8>,
        registered_at: SystemTime,
    ) -> Self {
        Self {
            message_name,
            encoded,
            registered_at,
            compiled: None,
        }
    }

    /// Compiles a stored entry's schema and holds it: it is the latest version now.
    pub(crate) fn promoted(self) -> Result<Self, SchemaError> {
        let schema = Schema::stored(&self.encoded, &self.message_name)?;
        Ok(Self {
            compiled: Some(Arc::new(schema)),
            ..self
        })
    }

    /// The schema as the registry's policy holds it: compiled when resident, else as
    /// stored, compiled while compared.
    pub(crate) fn held(&self) -> Held<'_> {
        match &self.compiled {
            Some(schema) => Held::Compiled(schema),
            None => Held::Stored {
                descriptor_set: &self.encoded,
                message_name: &self.message_name,
            },
        }
    }
}

type Versions = BTreeMap<Version, Arc<Entry>>;

/// Event type → version → schema, and what reflection serves.
#[derive(Default)]
pub(crate) struct Catalog {
    pub types: BTreeMap<String, Versions>,
    pub reflection: ReflectionIndex,
    pub(crate) older: Arc<OlderVersions>,
}

impl Catalog {
    /// A catalog of one type with one version, 1.0.0: for tests and fuzzing.
    pub(crate) fn single(event_type: &str, schema: Schema) -> Self {
        let mut versions = BTreeMap::new();
        versions.insert(
            Version::new(1, 0, 0),
            Arc::new(Entry::compiled(schema, SystemTime::now())),
        );
        Self {
            types: [(event_type.to_owned(), versions)].into_iter().collect(),
            ..Self::default()
        }
    }

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

    /// The compiled schema of one version: its own when it is the latest, else from
    /// the cache of older versions, compiling it on a miss.
    pub(crate) fn schema(
        &self,
        event_type: &str,
        version: &Version,
        entry: &Entry,
    ) -> Result<Arc<Schema>, SchemaError> {
        match &entry.compiled {
            Some(schema) => Ok(schema.clone()),
            None => self.older.get(event_type, version, entry),
        }
    }

    /// Whether [`Catalog::schema`] would compile: the version is neither the latest
    /// nor in the cache.
    pub(crate) fn would_compile(&self, event_type: &str, version: &Version) -> bool {
        self.resolve(event_type, Some(version))
            .is_some_and(|(_, entry)| {
                entry.compiled.is_none() && !self.older.holds(event_type, version)
            })
    }
}

/// Compiled older versions, the most recently used kept within a budget of encoded
/// bytes: events naming an older version compile it once, not per event.
pub(crate) struct OlderVersions {
    held: Mutex<Cached>,
    /// One compile at a time: many publishers naming one cold version compile it
    /// once, and no burst of them holds many large compiles in memory at once.
    compiling: Mutex<()>,
    /// Encoded bytes kept at most, and versions.
    budget: (usize, usize),
}

impl Default for OlderVersions {
    fn default() -> Self {
        Self::within(OLDER_VERSIONS_BYTES, OLDER_VERSIONS_COUNT)
    }
}

#[derive(Default)]
struct Cached {
    schemas: HashMap<(String, Version), (Arc<Schema>, u64)>,
    bytes: usize,
    clock: u64,
}

/// Encoded bytes of the older versions kept compiled (a compiled schema takes about
/// 100 times its encoded size in memory: one largest schema), and how many at most.
const OLDER_VERSIONS_BYTES: usize = 1024 * 1024;
const OLDER_VERSIONS_COUNT: usize = 64;

impl OlderVersions {
    fn within(bytes: usize, count: usize) -> Self {
        Self {
            held: Mutex::default(),
            compiling: Mutex::default(),
            budget: (bytes, count),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cached> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn holds(&self, event_type: &str, version: &Version) -> bool {
        self.lock()
            .schemas
            .contains_key(&(event_type.to_owned(), version.clone()))
    }

    fn get(
        &self,
        event_type: &str,
        version: &Version,
        entry: &Entry,
    ) -> Result<Arc<Schema>, SchemaError> {
        let key = (event_type.to_owned(), version.clone());
        if let Some(schema) = self.cached(&key) {
            return Ok(schema);
        }
        let _compiling = self.compiling.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(schema) = self.cached(&key) {
            return Ok(schema); // compiled while this one waited
        }
        let schema = Arc::new(Schema::stored(&entry.encoded, &entry.message_name)?);
        self.keep(key, schema.clone());
        Ok(schema)
    }

    fn cached(&self, key: &(String, Version)) -> Option<Arc<Schema>> {
        let mut cached = self.lock();
        cached.clock += 1;
        let now = cached.clock;
        let (schema, used) = cached.schemas.get_mut(key)?;
        *used = now;
        Some(schema.clone())
    }

    /// Keeps a compiled older version, evicting the least recently used beyond the
    /// budget; one larger than the whole budget is not kept.
    fn keep(&self, key: (String, Version), schema: Arc<Schema>) {
        let size = schema.encoded().len();
        let (max_bytes, max_count) = self.budget;
        if size > max_bytes {
            return;
        }
        let mut cached = self.lock();
        cached.clock += 1;
        let now = cached.clock;
        if cached.schemas.insert(key, (schema, now)).is_none() {
            cached.bytes += size;
        }
        while cached.bytes > max_bytes || cached.schemas.len() > max_count {
            let Some(oldest) = cached
                .schemas
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((gone, _)) = cached.schemas.remove(&oldest) {
                cached.bytes -= gone.encoded().len();
            }
        }
    }
}

/// The current catalog; swapped whole on every registration.
pub(crate) struct Catalogs {
    /// The node's own files: what reflection serves before any schema.
    base: ReflectionIndex,
    current: RwLock<Arc<Catalog>>,
    older: Arc<OlderVersions>,
    /// One change at a time: each builds on the catalog the last one installed.
    writing: std::sync::Mutex<()>,
}

impl Catalogs {
    /// `base`: the encoded descriptor sets of the services the node serves.
    pub(crate) fn new(base: &[&[u8]]) -> Result<Self, prost::DecodeError> {
        let mut index = ReflectionIndex::default();
        for bytes in base {
            for file in FileDescriptorSet::decode(*bytes)?.file {
                index.add_file(file, None);
            }
        }
        let catalogs = Self {
            base: index,
            current: RwLock::new(Arc::default()),
            older: Arc::default(),
            writing: std::sync::Mutex::new(()),
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
    pub(crate) fn replace(&self, types: BTreeMap<String, Versions>) {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        self.install(types);
    }

    /// Installs the current schemas and one more version ([`Catalogs::with`]).
    pub(crate) fn add(&self, event_type: &str, version: Version, entry: Entry) {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        self.install(self.with(event_type, version, entry));
    }

    fn install(&self, types: BTreeMap<String, Versions>) {
        let mut reflection = self.base.clone();
        for (event_type, versions) in &types {
            if let Some((version, latest)) = versions.iter().next_back() {
                match FileDescriptorSet::decode(latest.encoded.as_slice()) {
                    Ok(set) => reflection.add_schema(set, event_type, version),
                    Err(e) => tracing::error!(error = %e, "a stored schema does not decode"),
                }
            }
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Catalog {
            types,
            reflection,
            older: self.older.clone(),
        });
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

    /// A copy of the current types with one more version.
    /// Only the latest version of the type stays compiled: a version that is no
    /// longer the latest moves its compiled schema to the cache of older versions.
    fn with(&self, event_type: &str, version: Version, entry: Entry) -> BTreeMap<String, Versions> {
        let mut types = self.load().types.clone();
        let versions = types.entry(event_type.to_owned()).or_default();
        versions.insert(version, Arc::new(entry));
        let latest = versions.keys().next_back().cloned();
        for (v, e) in versions.iter_mut() {
            if Some(v) == latest.as_ref() {
                continue;
            }
            if let Some(schema) = &e.compiled {
                self.older
                    .keep((event_type.to_owned(), v.clone()), schema.clone());
                *e = Arc::new(Entry::stored(
                    e.message_name.clone(),
                    e.encoded.clone(),
                    e.registered_at,
                ));
            }
        }
        types
    }
}

#[derive(Clone)]
struct IndexedFile {
    encoded: Vec<u8>,
    dependencies: Vec<String>,
    /// The event types whose schemas hold the file; none for the node's own.
    owners: Vec<String>,
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
    /// Adds one file of `owner`'s schema (`None`: the node's own); a file name
    /// already present keeps its first content, and gains the owner.
    fn add_file(&mut self, file: FileDescriptorProto, owner: Option<&str>) {
        let name = file.name().to_owned();
        if let Some(indexed) = self.files.get_mut(&name) {
            if let Some(owner) = owner
                && !indexed.owners.iter().any(|o| o == owner)
            {
                indexed.owners.push(owner.to_owned());
            }
            return;
        }
        self.symbols_of(&file, &name);
        self.files.insert(
            name,
            IndexedFile {
                encoded: file.encode_to_vec(),
                dependencies: file.dependency,
                owners: owner.map(str::to_owned).into_iter().collect(),
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
            self.add_file(file, Some(event_type));
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
        self.file_with_imports(self.file_of(symbol)?)
    }

    /// The name of the file that defines `symbol`.
    pub(crate) fn file_of(&self, symbol: &str) -> Option<&String> {
        let symbol = symbol.strip_prefix('.').unwrap_or(symbol);
        self.symbols.get(symbol)
    }

    /// Whether a caller that may read the event types `readable` says yes to may
    /// see the file: the node's own files, and those of a schema of a type it
    /// may read.
    pub(crate) fn visible(&self, name: &str, readable: &dyn Fn(&str) -> bool) -> bool {
        self.files
            .get(name)
            .is_some_and(|f| f.owners.is_empty() || f.owners.iter().any(|o| readable(o)))
    }
}

#[cfg(test)]
mod tests {
    use evmesh_schema::fixtures::{CHAIN_ROOT, chain_with};

    use super::*;

    fn entry(messages: usize, added: usize) -> Entry {
        let schema = Schema::new(&chain_with(messages, added), CHAIN_ROOT).expect("a schema");
        Entry::compiled(schema, SystemTime::now())
    }

    fn compiled(catalog: &Catalog, event_type: &str) -> Vec<Version> {
        catalog.types[event_type]
            .iter()
            .filter(|(_, e)| e.compiled.is_some())
            .map(|(v, _)| v.clone())
            .collect()
    }

    #[test]
    fn only_the_latest_version_stays_compiled() {
        let catalogs = Catalogs::new(&[]).expect("no base");
        let v = |minor| Version::new(1, minor, 0);
        for (minor, added) in [(0, 0), (2, 2), (3, 3)] {
            catalogs.add("t", v(minor), entry(3, added));
            assert_eq!(compiled(&catalogs.load(), "t"), [v(minor)]);
        }
        // One registered between two others is not the latest either.
        catalogs.add("t", v(1), entry(3, 1));
        let catalog = catalogs.load();
        assert_eq!(compiled(&catalog, "t"), [v(3)]);
        // Each older version still resolves to its own content.
        for minor in 0..=3 {
            let (version, held) = catalog.resolve("t", Some(&v(minor))).expect("registered");
            let schema = catalog.schema("t", version, held).expect("compiles");
            let last = schema
                .pool()
                .get_message_by_name(&format!("big.v1.M{}", 2))
                .expect("the last message");
            assert_eq!(last.fields().count(), 10 + minor as usize, "1.{minor}.0");
        }
    }

    #[test]
    fn older_versions_are_cached_within_a_budget() {
        let schema = |messages| {
            Arc::new(Schema::new(&chain_with(messages, 0), CHAIN_ROOT).expect("a schema"))
        };
        let (big, small) = (schema(40), schema(2));
        let size = big.encoded().len();
        let older = OlderVersions::within(10 * size + size / 2, 16);
        for n in 0..100u64 {
            older.keep(("t".into(), Version::new(1, n, 0)), big.clone());
            let cached = older.lock();
            assert!(cached.bytes <= 10 * size + size / 2, "{}", cached.bytes);
            assert_eq!(cached.bytes, cached.schemas.len() * size);
        }
        assert_eq!(older.lock().schemas.len(), 10);
        // The most recently kept or used are the ones held.
        assert!(older.holds("t", &Version::new(1, 99, 0)));
        assert!(older.holds("t", &Version::new(1, 90, 0)));
        assert!(!older.holds("t", &Version::new(1, 89, 0)));
        let entry = Entry::compiled((*big).clone(), SystemTime::now());
        older
            .get("t", &Version::new(1, 90, 0), &entry)
            .expect("cached");
        older.keep(("t".into(), Version::new(1, 100, 0)), big.clone());
        assert!(older.holds("t", &Version::new(1, 90, 0)));
        assert!(!older.holds("t", &Version::new(1, 91, 0)));
        // Small ones: at most the count.
        for n in 0..200u64 {
            older.keep(("s".into(), Version::new(2, n, 0)), small.clone());
        }
        assert_eq!(older.lock().schemas.len(), 16);
        // One over the whole budget is compiled for its event but not kept.
        let huge = schema(40 * 12);
        older.keep(("h".into(), Version::new(1, 0, 0)), huge);
        assert!(!older.holds("h", &Version::new(1, 0, 0)));
        assert_eq!(older.lock().schemas.len(), 16);
    }
}
