//! The `evmesh.v1.SchemaRegistry` service: applies the semver policy of
//! evmesh-schema, stores versions through the store, and installs them in the
//! catalog that publish validation and reflection read.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use crate::auth::RegistryAccess;
use evmesh_proto::v1 as pb;
use evmesh_proto::v1::schema_registry_server::SchemaRegistry;
use evmesh_schema::{
    Bump, Decision, Outcome, Registered, Schema, SchemaError, SchemaLimits, decide, declared_bump,
    parse_version, quoted,
};
use evmesh_store::{SchemaRecord, Store};
use semver::Version;
use tokio::sync::{Mutex, Semaphore};
use tonic::{Request, Response, Status};

use crate::catalog::{Catalogs, Entry};
use crate::convert::status;

/// What the registry accepts.
#[derive(Debug, Clone)]
pub struct RegistryLimits {
    pub schema: SchemaLimits,
    /// Versions one event type may have.
    pub max_versions: usize,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        Self {
            schema: SchemaLimits::default(),
            max_versions: 100,
        }
    }
}

/// Longest payload message name accepted, in bytes.
const MAX_MESSAGE_NAME_LEN: usize = 1024;
/// Types in one ListSchemas reply, every version of each (at most 100 a type).
const MAX_LISTED_TYPES: usize = 100;
/// Changes and violations a response lists; the rest are counted.
const MAX_LISTED_CHANGES: usize = 1000;

pub(crate) struct RegistryService<S> {
    /// Where registrations are counted, when the node keeps metrics.
    metrics: Option<Arc<crate::metrics::Metrics>>,
    store: S,
    catalogs: Arc<Catalogs>,
    limits: Arc<RegistryLimits>,
    live: Arc<crate::LiveLimits>,
    /// Registrations are decided and stored one at a time.
    writing: Mutex<()>,
    /// Candidates compiled and compared at once (registrations and checks): each
    /// holds its schema compiled, many times its size, while it is judged.
    judging: Semaphore,
}

/// How many requests the registry judges at once; the rest wait their turn.
const JUDGED_AT_ONCE: usize = 2;

/// Runs the registry's CPU work (decoding, validating and comparing descriptor sets,
/// rebuilding the catalog) on a blocking thread: it never holds up the async runtime,
/// and a panic there fails this one request with INTERNAL.
async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => {
            tracing::error!(error = %e, "the registry panicked on a request");
            Err(Status::internal(
                "the registry failed on this request (the node's log has the panic); nothing was registered",
            ))
        }
        Err(_) => Err(Status::unavailable("node is shutting down")),
    }
}

fn schema_status(e: SchemaError) -> Status {
    match e {
        SchemaError::TooLarge(_) => Status::resource_exhausted(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}

/// Loads every stored schema into the catalog, compiling only the latest version of
/// each type (older ones compile when an event names them). A latest version that
/// no longer compiles is skipped with an error in the log, never a failed start, and
/// the version below it becomes the latest.
pub(crate) async fn load<S: Store>(
    store: &S,
    catalogs: &Catalogs,
) -> Result<usize, evmesh_store::StoreError> {
    let mut stored: BTreeMap<String, BTreeMap<Version, Entry>> = BTreeMap::new();
    for record in store.schemas().await? {
        stored.entry(record.event_type).or_default().insert(
            record.version,
            Entry::stored(
                record.message_name,
                record.descriptor_set,
                record.registered_at,
            ),
        );
    }
    let mut types = BTreeMap::new();
    let mut loaded = 0;
    for (event_type, mut versions) in stored {
        while let Some((version, latest)) = versions.pop_last() {
            match latest.promoted() {
                Ok(latest) => {
                    versions.insert(version, latest);
                    break;
                }
                Err(e) => {
                    tracing::error!(event_type = %event_type, version = %version, error = %e, "stored schema skipped")
                }
            }
        }
        if versions.is_empty() {
            continue;
        }
        loaded += versions.len();
        let versions: BTreeMap<Version, Arc<Entry>> = versions
            .into_iter()
            .map(|(v, e)| (v, Arc::new(e)))
            .collect();
        types.insert(event_type, versions);
    }
    catalogs.replace(types);
    Ok(loaded)
}

fn bump(b: Bump) -> pb::Bump {
    match b {
        Bump::None => pb::Bump::None,
        Bump::Patch => pb::Bump::Patch,
        Bump::Minor => pb::Bump::Minor,
        Bump::Major => pb::Bump::Major,
    }
}

struct Candidate {
    event_type: String,
    version: Option<Version>,
    schema: Schema,
}

fn event_type(ty: &str) -> Result<(), Status> {
    evmesh_store::validate_event_type(ty)
        .map_err(|e| Status::invalid_argument(format!("type {} {e}", quoted(ty))))
}

fn version(v: &str, field: &str) -> Result<Option<Version>, Status> {
    if v.is_empty() {
        return Ok(None);
    }
    parse_version(v)
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("{field} {e}")))
}

fn candidate(
    request: pb::RegisterSchemaRequest,
    limits: &SchemaLimits,
) -> Result<Candidate, Status> {
    event_type(&request.r#type)?;
    let version = version(&request.version, "version")?;
    if request.message_name.is_empty() {
        return Err(Status::invalid_argument(
            "message_name is required, e.g. shop.v1.OrderPlaced",
        ));
    }
    if request.message_name.len() > MAX_MESSAGE_NAME_LEN {
        return Err(Status::invalid_argument(format!(
            "message_name {} is {} bytes long, at most {MAX_MESSAGE_NAME_LEN} allowed",
            quoted(&request.message_name),
            request.message_name.len()
        )));
    }
    if request.descriptor_set.is_empty() {
        return Err(Status::invalid_argument(
            "descriptor_set is required: an encoded FileDescriptorSet",
        ));
    }
    let schema = Schema::with_limits(&request.descriptor_set, &request.message_name, limits)
        .map_err(schema_status)?;
    Ok(Candidate {
        event_type: request.r#type,
        version,
        schema,
    })
}

fn omitted(verdict: &evmesh_schema::Verdict) -> u32 {
    u32::try_from(verdict.changes.len().saturating_sub(MAX_LISTED_CHANGES)).unwrap_or(u32::MAX)
}

fn schema_message(
    event_type: &str,
    version: &Version,
    entry: &Entry,
    with_descriptors: bool,
) -> pb::Schema {
    pb::Schema {
        r#type: event_type.to_owned(),
        version: version.to_string(),
        message_name: entry.message_name.clone(),
        descriptor_set: if with_descriptors {
            entry.encoded.clone()
        } else {
            Vec::new()
        },
        registered_at: Some(entry.registered_at.into()),
    }
}

/// A registered version of a type (its latest when `version` is `None`), or
/// NOT_FOUND naming what is registered. `asked` is the version as the request wrote
/// it.
fn registered<'c>(
    catalog: &'c crate::catalog::Catalog,
    ty: &str,
    version: Option<&Version>,
    asked: &str,
) -> Result<(&'c Version, &'c Arc<Entry>), Status> {
    catalog
        .resolve(ty, version)
        .ok_or_else(|| match catalog.types.get(ty) {
            None => Status::not_found(format!("no schema is registered for type {}", quoted(ty))),
            Some(versions) => Status::not_found(format!(
                "version {asked} of {ty} is not registered; registered: {}",
                versions
                    .keys()
                    .map(Version::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        })
}

/// The first [`MAX_LISTED_CHANGES`] changes; the response counts the rest.
fn changes(verdict: &evmesh_schema::Verdict) -> Vec<pb::SchemaChange> {
    verdict
        .changes
        .iter()
        .take(MAX_LISTED_CHANGES)
        .map(|c| pb::SchemaChange {
            rule: c.rule.to_owned(),
            path: c.path.clone(),
            message: c.message.clone(),
            needs: bump(c.needs) as i32,
        })
        .collect()
}

/// One line per violation, for a status message: the first few, then how many more.
fn explain(event_type: &str, d: &Decision) -> String {
    const SHOWN: usize = 8;
    let mut lines: Vec<String> = d
        .violations
        .iter()
        .take(SHOWN)
        .map(|v| {
            format!(
                "{} {}: {} (needs {} against {})",
                v.rule, v.path, v.message, v.needs, v.against
            )
        })
        .collect();
    if d.violations.len() > SHOWN {
        lines.push(format!(
            "and {} more (evmesh schema check lists them all)",
            d.violations.len() - SHOWN
        ));
    }
    format!(
        "version {} of {event_type} is too small for its changes; the smallest valid version is {}: {}",
        d.version,
        d.suggested,
        lines.join("; ")
    )
}

impl<S: Store> RegistryService<S> {
    pub(crate) fn new(
        store: S,
        catalogs: Arc<Catalogs>,
        limits: RegistryLimits,
        live: Arc<crate::LiveLimits>,
    ) -> Self {
        Self {
            metrics: None,
            store,
            catalogs,
            limits: Arc::new(limits),
            live,
            writing: Mutex::new(()),
            judging: Semaphore::new(JUDGED_AT_ONCE),
        }
    }

    /// Counts registrations in `metrics`.
    pub(crate) fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Decodes and validates the candidate and decides on it against the current
    /// catalog, off the runtime.
    async fn judge(
        &self,
        request: pb::RegisterSchemaRequest,
    ) -> Result<(Candidate, Judged), Status> {
        let _turn = self
            .judging
            .acquire()
            .await
            .map_err(|_| Status::unavailable("node is shutting down"))?;
        let catalogs = self.catalogs.clone();
        let limits = self.limits.clone();
        off_runtime(move || {
            let c = candidate(request, &limits.schema)?;
            if let Some(clash) = catalogs.clash(&c.schema) {
                return Err(Status::invalid_argument(clash));
            }
            let judged = decide_on(&catalogs, &c);
            Ok((c, judged))
        })
        .await
    }
}

/// Times a registration is decided again because another one of its type came
/// first, before it is refused with ABORTED.
const STALE_ATTEMPTS: u32 = 8;

impl<S: Store> RegistryService<S> {
    /// The answer to a registration that stores nothing.
    fn answer(
        &self,
        c: &Candidate,
        decision: &Decision,
    ) -> Result<Response<pb::RegisterSchemaResponse>, Status> {
        match decision.outcome {
            Outcome::Existing => {
                let catalog = self.catalogs.load();
                let (version, entry) = catalog
                    .resolve(&c.event_type, Some(&decision.version))
                    .ok_or_else(|| Status::internal("a registered version vanished"))?;
                Ok(Response::new(pb::RegisterSchemaResponse {
                    schema: Some(schema_message(&c.event_type, version, entry, true)),
                    created: false,
                    changes: Vec::new(),
                    omitted_changes: 0,
                }))
            }
            Outcome::Conflict => Err(Status::already_exists(format!(
                "version {} of {} is registered with other content; the smallest valid version for this content is {}",
                decision.version, c.event_type, decision.suggested
            ))),
            Outcome::Rejected | Outcome::Accepted => Err(Status::failed_precondition(explain(
                &c.event_type,
                decision,
            ))),
        }
    }

    /// Installs a stored version in the catalog and answers its registration.
    async fn install(
        &self,
        c: Candidate,
        decision: &Decision,
        registered_at: SystemTime,
    ) -> Result<Response<pb::RegisterSchemaResponse>, Status> {
        let event_type = c.event_type;
        let entry = Entry::compiled(c.schema, registered_at);
        let schema = schema_message(&event_type, &decision.version, &entry, true);
        let catalogs = self.catalogs.clone();
        let (installed, version) = (event_type.clone(), decision.version.clone());
        off_runtime(move || {
            catalogs.add(&installed, version, entry);
            Ok(())
        })
        .await?;
        tracing::info!(event_type = %event_type, version = %decision.version, "schema registered");
        Ok(Response::new(pb::RegisterSchemaResponse {
            schema: Some(schema),
            created: true,
            changes: changes(&decision.verdict),
            omitted_changes: omitted(&decision.verdict),
        }))
    }

    /// Reads a type's versions from the store again (see [`refresh`]).
    async fn refresh(&self, event_type: &str) -> Result<(), Status> {
        refresh(&self.store, &self.catalogs, event_type).await
    }
}

/// A decision and the versions it was made against: a registration stores its
/// version only while the type's versions are still exactly these.
struct Judged {
    decision: Decision,
    known: Vec<Version>,
}

fn decide_on(catalogs: &Catalogs, c: &Candidate) -> Judged {
    let catalog = catalogs.load();
    let existing: Vec<Registered<'_>> = catalog
        .types
        .get(&c.event_type)
        .map(|versions| {
            versions
                .iter()
                .map(|(version, entry)| Registered {
                    version,
                    schema: entry.held(),
                })
                .collect()
        })
        .unwrap_or_default();
    Judged {
        decision: decide(&existing, &c.schema, c.version.as_ref()),
        known: existing.iter().map(|r| r.version.clone()).collect(),
    }
}

/// Whether the caller's principal (with `--auth`) has `needed` access to the
/// registry.
fn allowed<T>(request: &Request<T>, needed: RegistryAccess) -> Result<(), Status> {
    match request.extensions().get::<crate::auth::Caller>() {
        None => Ok(()),
        Some(caller) => caller.principal()?.check_registry(needed),
    }
}

impl<S: Store> RegistryService<S> {
    async fn register(
        &self,
        request: Request<pb::RegisterSchemaRequest>,
    ) -> Result<Response<pb::RegisterSchemaResponse>, Status> {
        allowed(&request, RegistryAccess::Write)?;
        let request = request.into_inner();
        let _writing = self.writing.lock().await;
        let mut attempt = 0;
        loop {
            attempt += 1;
            // The catalog may learn of another node's version between the
            // decision and the store: `known` is what the decision saw.
            let (c, Judged { decision, known }) = self.judge(request.clone()).await?;
            if !matches!(decision.outcome, Outcome::Accepted) {
                return self.answer(&c, &decision);
            }
            let max_versions = self.live.max_schema_versions();
            if known.len() >= max_versions {
                return Err(Status::resource_exhausted(format!(
                    "type {} has {} versions, at most {max_versions} allowed (--max-schema-versions)",
                    c.event_type,
                    known.len(),
                )));
            }
            let record = SchemaRecord {
                event_type: c.event_type.clone(),
                version: decision.version.clone(),
                message_name: c.schema.message_name().to_owned(),
                descriptor_set: c.schema.encoded().to_vec(),
                registered_at: SystemTime::now(),
            };
            let registered_at = record.registered_at;
            match self.store.put_schema(record, &known).await {
                Ok(()) => return self.install(c, &decision, registered_at).await,
                // Another registration of the type (on another node) came first:
                // decide again, against its version too.
                Err(evmesh_store::StoreError::Stale(why)) if attempt < STALE_ATTEMPTS => {
                    tracing::debug!(event_type = %c.event_type, %why, "deciding a registration again");
                    self.refresh(&c.event_type).await?;
                }
                Err(e) => return Err(status(e)),
            }
        }
    }
}

#[tonic::async_trait]
impl<S: Store> SchemaRegistry for RegistryService<S> {
    async fn register_schema(
        &self,
        request: Request<pb::RegisterSchemaRequest>,
    ) -> Result<Response<pb::RegisterSchemaResponse>, Status> {
        let result = self.register(request).await;
        if let Some(metrics) = &self.metrics {
            metrics.registration(match &result {
                Ok(r) if r.get_ref().created => "created",
                Ok(_) => "existing",
                Err(_) => "refused",
            });
        }
        result
    }

    async fn check_schema(
        &self,
        request: Request<pb::RegisterSchemaRequest>,
    ) -> Result<Response<pb::CheckSchemaResponse>, Status> {
        allowed(&request, RegistryAccess::Read)?;
        let (_, Judged { decision: d, .. }) = self.judge(request.into_inner()).await?;
        let declared = d
            .predecessor
            .as_ref()
            .map_or(Bump::None, |p| declared_bump(p, &d.version));
        Ok(Response::new(pb::CheckSchemaResponse {
            compatible: matches!(d.outcome, Outcome::Accepted | Outcome::Existing),
            version: d.version.to_string(),
            suggested_version: d.suggested.to_string(),
            predecessor: d
                .predecessor
                .as_ref()
                .map(Version::to_string)
                .unwrap_or_default(),
            required_bump: bump(d.verdict.needs) as i32,
            declared_bump: bump(declared) as i32,
            changes: changes(&d.verdict),
            omitted_changes: omitted(&d.verdict),
            omitted_violations: u32::try_from(
                d.violations.len().saturating_sub(MAX_LISTED_CHANGES),
            )
            .unwrap_or(u32::MAX),
            violations: d
                .violations
                .iter()
                .take(MAX_LISTED_CHANGES)
                .map(|v| pb::SchemaViolation {
                    rule: v.rule.clone(),
                    path: v.path.clone(),
                    message: v.message.clone(),
                    needs: bump(v.needs) as i32,
                    against_version: v.against.to_string(),
                })
                .collect(),
            already_registered: d.outcome == Outcome::Existing,
            conflict: d.outcome == Outcome::Conflict,
        }))
    }

    async fn compare_schemas(
        &self,
        request: Request<pb::CompareSchemasRequest>,
    ) -> Result<Response<pb::CompareSchemasResponse>, Status> {
        allowed(&request, RegistryAccess::Read)?;
        let request = request.into_inner();
        if request.r#type.is_empty() {
            return Err(Status::invalid_argument("type is required"));
        }
        event_type(&request.r#type)?;
        let (Some(from), Some(to)) = (
            version(&request.from_version, "from_version")?,
            version(&request.to_version, "to_version")?,
        ) else {
            return Err(Status::invalid_argument(
                "from_version and to_version are both required",
            ));
        };
        if from >= to {
            return Err(Status::invalid_argument(format!(
                "from_version {from} must be below to_version {to}"
            )));
        }
        let catalogs = self.catalogs.clone();
        let ty = request.r#type;
        off_runtime(move || {
            let catalog = catalogs.load();
            let compiled = |v: &Version, asked: &str| {
                let (v, entry) = registered(&catalog, &ty, Some(v), asked)?;
                catalog.schema(&ty, v, entry).map_err(|e| {
                    Status::internal(format!("version {v} of {ty} no longer compiles: {e}"))
                })
            };
            let old = compiled(&from, &request.from_version)?;
            let new = compiled(&to, &request.to_version)?;
            let verdict = evmesh_schema::compare(&old, &new);
            let declared = declared_bump(&from, &to);
            Ok(Response::new(pb::CompareSchemasResponse {
                compatible: verdict.allowed_by(declared),
                required_bump: bump(verdict.needs) as i32,
                declared_bump: bump(declared) as i32,
                changes: changes(&verdict),
                omitted_changes: omitted(&verdict),
                r#type: ty.clone(),
                from_version: from.to_string(),
                to_version: to.to_string(),
            }))
        })
        .await
    }

    async fn get_schema(
        &self,
        request: Request<pb::GetSchemaRequest>,
    ) -> Result<Response<pb::Schema>, Status> {
        allowed(&request, RegistryAccess::Read)?;
        let request = request.into_inner();
        if request.r#type.is_empty() {
            return Err(Status::invalid_argument("type is required"));
        }
        event_type(&request.r#type)?;
        let version = version(&request.version, "version")?;
        let catalog = self.catalogs.load();
        let (version, entry) = registered(
            &catalog,
            &request.r#type,
            version.as_ref(),
            &request.version,
        )?;
        Ok(Response::new(schema_message(
            &request.r#type,
            version,
            entry,
            true,
        )))
    }

    async fn list_schemas(
        &self,
        request: Request<pb::ListSchemasRequest>,
    ) -> Result<Response<pb::ListSchemasResponse>, Status> {
        allowed(&request, RegistryAccess::Read)?;
        let request = request.into_inner();
        let catalog = self.catalogs.load();
        let wanted = match request.limit {
            0 => MAX_LISTED_TYPES,
            n => (n as usize).min(MAX_LISTED_TYPES),
        };
        let after = request.after_type.as_str();
        let types: Vec<_> = catalog
            .types
            .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            .filter(|(ty, _)| request.r#type.is_empty() || **ty == request.r#type)
            .take(wanted)
            .collect();
        let more = types.len() == wanted;
        let schemas = types
            .into_iter()
            .flat_map(|(ty, versions)| {
                versions
                    .iter()
                    .map(move |(v, e)| schema_message(ty, v, e, false))
            })
            .collect();
        Ok(Response::new(pb::ListSchemasResponse { schemas, more }))
    }
}

/// Reads a type's versions from the store again and installs those the catalog
/// lacks (registered by another node): older ones as stored bytes, a new latest
/// compiled.
pub(crate) async fn refresh<S: Store>(
    store: &S,
    catalogs: &Arc<Catalogs>,
    event_type: &str,
) -> Result<(), Status> {
    let records = store.schemas_of(event_type).await.map_err(status)?;
    let catalogs = catalogs.clone();
    let event_type = event_type.to_owned();
    off_runtime(move || {
        let held = catalogs.load();
        let known = held.types.get(&event_type);
        let latest = records
            .iter()
            .map(|r| &r.version)
            .chain(known.into_iter().flat_map(|v| v.keys()))
            .max()
            .cloned();
        let mut missing: Vec<SchemaRecord> = records
            .into_iter()
            .filter(|r| known.is_none_or(|v| !v.contains_key(&r.version)))
            .collect();
        missing.sort_by(|a, b| a.version.cmp(&b.version));
        for record in missing {
            let mut entry = Entry::stored(
                record.message_name,
                record.descriptor_set,
                record.registered_at,
            );
            if Some(&record.version) == latest.as_ref() {
                entry = entry.promoted().map_err(|e| {
                    Status::internal(format!(
                        "version {} of {event_type}, registered on another node, does not compile here: {e}",
                        record.version
                    ))
                })?;
            }
            catalogs.add(&event_type, record.version, entry);
        }
        Ok(())
    })
    .await
}
