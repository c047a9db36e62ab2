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
    /// `catalog` lacks; true when the catalog changed.
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
        let mut wanted: Vec<&str> = Vec::new();
        for event in requests.iter().filter_map(|r| r.event.as_ref()) {
            if wanted.len() == TYPES_PER_BATCH || wanted.contains(&event.r#type.as_str()) {
                continue;
            }
            let known = match catalog.types.get(&event.r#type) {
                None => false,
                Some(versions) => match Version::parse(&event.schema_version) {
                    Ok(version) => versions.contains_key(&version),
                    // The latest, or a version string the envelope check refuses.
                    Err(_) => true,
                },
            };
            if !known && !self.missed_lately(&event.r#type) {
                wanted.push(&event.r#type);
            }
        }
        let mut changed = false;
        for event_type in wanted {
            let before = catalogs.load().types.get(event_type).map(|v| v.len());
            if let Err(e) = registry::refresh(store, catalogs, event_type).await {
                tracing::warn!(event_type, error = %e.message(), "reading a schema through");
            }
            let after = catalogs.load().types.get(event_type).map(|v| v.len());
            if after == before {
                self.miss(event_type);
            } else {
                changed = true;
            }
        }
        changed
    }

    fn missed_lately(&self, event_type: &str) -> bool {
        let missed = self.missed.lock().unwrap_or_else(|e| e.into_inner());
        missed
            .get(event_type)
            .is_some_and(|at| at.elapsed() < MISS_FOR)
    }

    /// The type changed in the store: ask for it again.
    fn forget(&self, event_type: &str) {
        self.missed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(event_type);
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
            match change {
                Some(event_type) => {
                    read_through.forget(&event_type);
                    if let Err(e) = registry::refresh(&store, &catalogs, &event_type).await {
                        tracing::warn!(event_type, error = %e.message(), "reading a schema registered on another node");
                    }
                }
                None => {
                    read_through
                        .missed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clear();
                    match registry::load(&store, &catalogs).await {
                        Ok(schemas) => tracing::debug!(schemas, "schemas read again"),
                        Err(e) => tracing::warn!(error = %e, "reading the schemas again"),
                    }
                }
            }
        }
    });
}
