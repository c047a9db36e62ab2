//! Schemas registered by the other nodes of a mesh (on a store they share): the
//! catalog follows the store's feed of registrations, and a publish that names a
//! type or version the catalog does not hold yet reads it through from the store
//! before the event is judged, so that a schema registered on one node validates on
//! every node at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use evmesh_proto::v1 as pb;
use evmesh_store::Store;
use semver::Version;
use tokio::sync::mpsc;

use crate::catalog::{Catalog, Catalogs};
use crate::registry;

/// How long a type the store did not have is not asked for again: a stream of
/// events of an unregistered type costs a few reads a second, not one a batch. A
/// registration the feed reports ends it at once.
const MISS_FOR: Duration = Duration::from_millis(250);
/// Types read through for one batch at most; the rest are judged as they are.
const TYPES_PER_BATCH: usize = 8;
/// Misses remembered at most; beyond, they are forgotten all at once.
const MISSES_KEPT: usize = 10_000;

/// Whether `catalog` holds the schema `event` names: its type, and its version
/// when it names one (an empty or malformed version is the latest, or refused by
/// the envelope check).
fn knows(catalog: &Catalog, event: &pb::Event) -> bool {
    match catalog.types.get(&event.r#type) {
        None => false,
        Some(versions) => {
            Version::parse(&event.schema_version).map_or(true, |v| versions.contains_key(&v))
        }
    }
}

/// Read-through for publishes. Cloning shares it.
#[derive(Clone, Default)]
pub(crate) struct ReadThrough {
    /// Whether other nodes register schemas in this store at all.
    shared: bool,
    missed: Arc<Mutex<HashMap<String, Instant>>>,
}

impl ReadThrough {
    pub(crate) fn new(shared: bool) -> Self {
        Self {
            shared,
            missed: Arc::default(),
        }
    }

    /// Reads from the store the types (and versions) these requests name that
    /// `catalog` lacks; true when it read any (the catalog may have changed
    /// meanwhile, by this or by the feed of registrations: load it again).
    pub(crate) async fn before<S: Store>(
        &self,
        store: &S,
        catalogs: &Arc<Catalogs>,
        catalog: &Catalog,
        requests: &[pb::PublishRequest],
    ) -> bool {
        if !self.shared {
            return false;
        }
        let mut wanted: Vec<&pb::Event> = Vec::new();
        for event in requests.iter().filter_map(|r| r.event.as_ref()) {
            if wanted.len() == TYPES_PER_BATCH || wanted.iter().any(|w| w.r#type == event.r#type) {
                continue;
            }
            if !knows(catalog, event) && !self.missed_lately(&event.r#type) {
                wanted.push(event);
            }
        }
        for event in &wanted {
            if let Err(e) = registry::refresh(store, catalogs, &event.r#type).await {
                tracing::warn!(event_type = %event.r#type, error = %e.message(), "reading a schema through");
            }
            if !knows(&catalogs.load(), event) {
                self.miss(&event.r#type);
            }
        }
        !wanted.is_empty()
    }

    fn missed_lately(&self, event_type: &str) -> bool {
        let missed = self.missed.lock().unwrap_or_else(|e| e.into_inner());
        missed
            .get(event_type)
            .is_some_and(|at| at.elapsed() < MISS_FOR)
    }

    /// The type changed in the store (every type, for `None`): ask again.
    fn forget(&self, event_type: Option<&str>) {
        let mut missed = self.missed.lock().unwrap_or_else(|e| e.into_inner());
        match event_type {
            Some(event_type) => {
                missed.remove(event_type);
            }
            None => missed.clear(),
        }
    }

    fn miss(&self, event_type: &str) {
        let mut missed = self.missed.lock().unwrap_or_else(|e| e.into_inner());
        if missed.len() >= MISSES_KEPT {
            missed.clear();
        }
        missed.insert(event_type.to_owned(), Instant::now());
    }
}

/// Follows the store's feed of registrations made on other nodes, so that the
/// catalog (and reflection) holds them without a publish asking: a type's versions
/// read again as it changes, everything read again when the feed may have missed
/// some. Ends with the feed.
pub(crate) fn follow<S: Store>(
    store: S,
    catalogs: Arc<Catalogs>,
    read_through: ReadThrough,
    mut changes: mpsc::Receiver<Option<String>>,
) {
    tokio::spawn(async move {
        while let Some(change) = changes.recv().await {
            read_through.forget(change.as_deref());
            match change {
                Some(event_type) => {
                    if let Err(e) = registry::refresh(&store, &catalogs, &event_type).await {
                        tracing::warn!(event_type, error = %e.message(), "reading a schema registered on another node");
                    }
                }
                None => match registry::load(&store, &catalogs).await {
                    Ok(schemas) => tracing::debug!(schemas, "schemas read again"),
                    Err(e) => tracing::warn!(error = %e, "reading the schemas again"),
                },
            }
        }
    });
}
