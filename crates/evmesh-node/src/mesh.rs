//! The `evmesh.v1.Mesh` service over a [`Store`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use evmesh_proto::v1 as pb;
use evmesh_proto::v1::mesh_server::Mesh;
use evmesh_schema::quoted;
use evmesh_store::{Feedback, Pattern, Store, Subscription, SubscriptionSpec};
use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Caller, Current, Principal};
use crate::catalog::{Catalog, Catalogs};
use crate::convert::{self, status};
use crate::envelope::{self, Limits, Rejection};
use crate::fairness::{self, Held, Kind};
use crate::validate;

/// Most events validated and appended as one batch from one publish stream.
const PUBLISH_BATCH: usize = 1024;
/// Batches of one publish stream in flight to the store at once.
const PUBLISH_PIPELINE: usize = 32;
const MAX_CHAIN: u32 = 10_000;
const MAX_DEAD_LETTERS: u32 = 1_000;
/// Groups in one ListGroups reply: each holds at most 64 patterns of 319 bytes.
const MAX_GROUPS: u32 = 100;
/// Patterns one subscription may carry.
pub(crate) const MAX_PATTERNS: usize = 64;
/// Longest pattern, its version requirement included, in bytes.
pub(crate) const MAX_PATTERN_LEN: usize = evmesh_store::MAX_TYPE_LEN + 64;
/// Longest ack timeout and nack delay accepted.
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest nack reason kept, in bytes; a longer one is cut at a character boundary.
pub(crate) const MAX_REASON_LEN: usize = 1024;
/// Bytes of events one chain or dead-letter reply carries at most, well under the
/// 4 MiB a client takes by default; at least one event is always sent.
const MAX_REPLY_BYTES: usize = 3 * 1024 * 1024;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub(crate) struct MeshService<S> {
    store: S,
    limits: Arc<Limits>,
    catalogs: Arc<Catalogs>,
    allow_unregistered: bool,
    trace_events: bool,
    shutdown: watch::Receiver<bool>,
    read_through: crate::follow::ReadThrough,
    identity: Arc<crate::nodes::Identity>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl<S: Store> MeshService<S> {
    pub(crate) fn new(
        store: S,
        config: &crate::NodeConfig,
        catalogs: Arc<Catalogs>,
        shutdown: watch::Receiver<bool>,
        read_through: crate::follow::ReadThrough,
        identity: Arc<crate::nodes::Identity>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            metrics,
            store,
            limits: Arc::new(config.limits.clone()),
            catalogs,
            allow_unregistered: config.allow_unregistered,
            trace_events: config.trace_events,
            shutdown,
            read_through,
            identity,
        }
    }

    fn clone_handle(&self) -> Self {
        Self {
            metrics: self.metrics.clone(),
            store: self.store.clone(),
            limits: self.limits.clone(),
            catalogs: self.catalogs.clone(),
            allow_unregistered: self.allow_unregistered,
            trace_events: self.trace_events,
            shutdown: self.shutdown.clone(),
            read_through: self.read_through.clone(),
            identity: self.identity.clone(),
        }
    }

    /// The catalog to judge these requests by, with what they name and it lacks read
    /// through from the store, when other nodes register there too.
    async fn catalog_for(&self, requests: &[pb::PublishRequest]) -> Arc<Catalog> {
        let catalog = self.catalogs.load();
        if self
            .read_through
            .before(&self.store, &self.catalogs, &catalog, requests)
            .await
        {
            return self.catalogs.load();
        }
        catalog
    }

    /// The envelope checks, then the payload against its registered schema. A panic
    /// in either rejects this one event with INTERNAL.
    fn accept(
        &self,
        catalog: &Catalog,
        event: Option<pb::Event>,
        principal: Option<&Principal>,
    ) -> Result<pb::Event, Rejection> {
        let id = event.as_ref().map(|e| e.id.clone()).unwrap_or_default();
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut event = envelope::accept(event, &self.limits)?;
            if let Some(principal) = principal
                && let Err(denied) = principal.check_publish(&event.r#type)
            {
                return Err(Rejection {
                    code: tonic::Code::PermissionDenied,
                    violations: vec![pb::Violation {
                        rule: "PERMISSION".into(),
                        path: "event.type".into(),
                        message: denied.message().to_owned(),
                    }],
                    event_id: event.id,
                });
            }
            validate::payload(catalog, &mut event, self.allow_unregistered)?;
            Ok(event)
        }));
        checked.unwrap_or_else(|_| {
            tracing::error!(event_id = %evmesh_schema::quoted(&id), "validation panicked on an event");
            Err(Rejection {
                code: tonic::Code::Internal,
                violations: vec![pb::Violation {
                    rule: "INTERNAL".into(),
                    path: "event".into(),
                    message: "the node failed while validating this event (its log has the panic); it was not stored".into(),
                }],
                event_id: id,
            })
        })
    }
}

/// Where each response of a publish batch comes from.
enum Slot {
    Rejected(Rejection),
    /// Index into the batch's appended results, the id, the correlation id, and the
    /// event's span, which ends when the event is answered.
    Appended(usize, String, String, tracing::Span),
}

struct Batch {
    slots: Vec<Slot>,
    appended: evmesh_store::Result<evmesh_store::AppendTicket>,
    /// The event type of each appended event, by its index, for the metrics.
    types: Vec<String>,
    arrived: std::time::Instant,
}

/// What a publish stream's caller may do, looked up again when the auth file is.
struct PublishRights {
    current: Current,
    /// The principal's rate limiter and its burst.
    limiter: Option<(Arc<fairness::RateLimiter>, u32)>,
    _held: Held,
}

impl PublishRights {
    fn open(caller: Caller) -> Result<Self, Status> {
        let mut current = Current::new(caller)?;
        let principal = current.get()?.clone();
        let holdings = current.holdings(&principal.name);
        let held = fairness::take(holdings.clone(), &principal, Kind::PublishStream)?;
        let limiter = fairness::limiter(&holdings, &principal).zip(principal.limits.publish_rate);
        Ok(Self {
            current,
            limiter,
            _held: held,
        })
    }
}

fn rejected(rejection: Rejection) -> pb::PublishResponse {
    pb::PublishResponse {
        result: Some(pb::publish_response::Result::Rejection(
            rejection.into_proto(),
        )),
    }
}

fn ack(event_id: String, correlation_id: String, a: evmesh_store::Appended) -> pb::PublishResponse {
    pb::PublishResponse {
        result: Some(pb::publish_response::Result::Ack(pb::PublishAck {
            event_id,
            sequence: a.sequence,
            duplicate: a.duplicate,
            correlation_id,
        })),
    }
}

impl<S: Store> MeshService<S> {
    /// Reads a publish stream: takes whatever has already arrived as one batch,
    /// validates it and queues it, in stream order.
    async fn read_publishes(
        &self,
        mut inbound: Streaming<pb::PublishRequest>,
        steps: mpsc::Sender<Step>,
        mut rights: Option<PublishRights>,
    ) {
        let mut shutdown = self.shutdown.clone();
        let mut changes = rights.as_ref().map(|r| r.current.changes());
        loop {
            let changed = async {
                match changes.as_mut() {
                    Some(c) => c.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let first = tokio::select! {
                m = inbound.message() => m,
                // Only the wait's end: its guard must not live on in this loop.
                () = async { let _ = shutdown.wait_for(|&down| down).await; } => break,
                true = changed => {
                    // The auth file was read again: a caller no longer known ends here.
                    if let Some(Err(status)) = rights.as_mut().map(|r| r.current.get().map(|_| ())) {
                        let _ = steps.send(Step::End(status)).await;
                        break;
                    }
                    continue;
                }
            };
            let first = match first {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    let _ = steps.send(Step::End(crate::transport::status(e))).await;
                    break;
                }
            };
            // Take whatever else has already arrived: one batch, one commit.
            let mut requests = vec![first];
            let mut end = None;
            while requests.len() < PUBLISH_BATCH {
                match inbound.message().now_or_never() {
                    Some(Ok(Some(m))) => requests.push(m),
                    Some(Ok(None)) => {
                        end = Some(None);
                        break;
                    }
                    Some(Err(e)) => {
                        end = Some(Some(crate::transport::status(e)));
                        break;
                    }
                    None => break,
                }
            }
            let principal = match rights.as_mut() {
                None => None,
                Some(r) => {
                    if let Some((limiter, burst)) = &r.limiter {
                        fairness::admit(limiter, *burst, requests.len()).await;
                    }
                    match r.current.get() {
                        Ok(p) => Some(p.clone()),
                        Err(status) => {
                            let _ = steps.send(Step::End(status)).await;
                            break;
                        }
                    }
                }
            };
            let batch = Step::Batch(self.start_batch(requests, principal.as_deref()).await);
            if steps.send(batch).await.is_err() {
                break;
            }
            if let Some(end) = end {
                if let Some(status) = end {
                    let _ = steps.send(Step::End(status)).await;
                }
                break;
            }
        }
    }

    /// Validates one batch and queues its valid events, in stream order.
    async fn start_batch(
        &self,
        requests: Vec<pb::PublishRequest>,
        principal: Option<&Principal>,
    ) -> Batch {
        let arrived = std::time::Instant::now();
        let mut slots = Vec::with_capacity(requests.len());
        let mut events = Vec::with_capacity(requests.len());
        let catalog = self.catalog_for(&requests).await;
        compile_older_versions(&catalog, &requests).await;
        for request in requests {
            match self.accept(&catalog, request.event, principal) {
                Ok(event) => {
                    slots.push(Slot::Appended(
                        events.len(),
                        event.id.clone(),
                        event.correlation_id.clone(),
                        crate::trace::append_span(&event, self.trace_events),
                    ));
                    events.push(event);
                }
                Err(rejection) => slots.push(Slot::Rejected(rejection)),
            }
        }
        let types = event_types(&self.metrics, &events);
        let appended = self.store.enqueue(events).await;
        Batch {
            slots,
            appended,
            types,
            arrived,
        }
    }
}

/// Compiles, on a blocking thread, the older schema versions that events of this
/// batch name and that are not compiled yet, so that validating the batch on the
/// runtime finds them ready: a large schema takes a while to compile.
async fn compile_older_versions(catalog: &Arc<Catalog>, requests: &[pb::PublishRequest]) {
    let mut cold: Vec<(&str, semver::Version)> = Vec::new();
    for event in requests.iter().filter_map(|r| r.event.as_ref()) {
        if event.schema_version.is_empty() {
            continue;
        }
        let Ok(version) = evmesh_schema::parse_version(&event.schema_version) else {
            continue; // the envelope check refuses it
        };
        if catalog.would_compile(&event.r#type, &version)
            && !cold
                .iter()
                .any(|(t, v)| *t == event.r#type && *v == version)
        {
            cold.push((&event.r#type, version));
        }
    }
    if cold.is_empty() {
        return;
    }
    let cold: Vec<(String, semver::Version)> =
        cold.into_iter().map(|(t, v)| (t.to_owned(), v)).collect();
    let catalog = catalog.clone();
    // A failure shows when the event is validated: it is rejected there, by name.
    let _ = tokio::task::spawn_blocking(move || {
        for (event_type, version) in cold {
            if let Some((version, entry)) = catalog.resolve(&event_type, Some(&version)) {
                let _ = catalog.schema(&event_type, version, entry);
            }
        }
    })
    .await;
}

/// What the reader of a publish stream hands its responder, in stream order.
enum Step {
    Batch(Batch),
    /// The stream ends with this status once every batch before it is answered.
    End(Status),
}

/// Answers batches in order, as their appends commit.
async fn respond(
    mut steps: mpsc::Receiver<Step>,
    out: mpsc::Sender<Result<pb::PublishResponse, Status>>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    while let Some(step) = steps.recv().await {
        let batch = match step {
            Step::Batch(batch) => batch,
            Step::End(status) => {
                let _ = out.send(Err(status)).await;
                return;
            }
        };
        let appended = match batch.appended {
            Ok(ticket) => ticket.wait().await.map_err(status),
            Err(e) => Err(status(e)),
        };
        count(
            &metrics,
            &batch.slots,
            &batch.types,
            &appended,
            batch.arrived,
        );
        for slot in batch.slots {
            let response = match (slot, &appended) {
                (Slot::Rejected(rejection), _) => rejected(rejection),
                (Slot::Appended(i, id, correlation, span), Ok(acks)) => match acks.get(i) {
                    Some(a) => {
                        span.record("evmesh.sequence", a.sequence);
                        ack(id, correlation, *a)
                    }
                    None => rejected(Rejection {
                        code: tonic::Code::Internal,
                        violations: vec![],
                        event_id: id,
                    }),
                },
                (Slot::Appended(_, id, _, _), Err(e)) => rejected(Rejection {
                    code: e.code(),
                    violations: vec![pb::Violation {
                        rule: "STORE".into(),
                        path: "event".into(),
                        message: e.message().to_owned(),
                    }],
                    event_id: id,
                }),
            };
            if out.send(Ok(response)).await.is_err() {
                return; // the publisher went away; what was appended stays appended
            }
        }
    }
}

/// The type of each event of a batch, for [`count`]; none when the node counts
/// nothing.
fn event_types(metrics: &crate::metrics::Metrics, events: &[pb::Event]) -> Vec<String> {
    if !metrics.on() {
        return Vec::new();
    }
    events.iter().map(|e| e.r#type.clone()).collect()
}

/// The metrics work of one publish batch of `events` (all stored), for the bench
/// of what metrics cost: what the publish path does for them, and nothing when
/// `on` is false, as on a node without an HTTP listener.
pub(crate) fn metrics_of_a_batch(on: bool, events: Vec<pb::Event>) -> impl FnMut() {
    let metrics = crate::metrics::Metrics::new(on);
    let slots: Vec<Slot> = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            Slot::Appended(
                i,
                e.id.clone(),
                e.correlation_id.clone(),
                tracing::Span::none(),
            )
        })
        .collect();
    let appended: Result<Vec<evmesh_store::Appended>, Status> = Ok((0..events.len())
        .map(|i| evmesh_store::Appended {
            sequence: i as u64 + 1,
            duplicate: false,
        })
        .collect());
    move || {
        let types = event_types(&metrics, &events);
        count(
            &metrics,
            &slots,
            &types,
            &appended,
            std::time::Instant::now(),
        );
    }
}

/// A batch's outcomes in the metrics: a count per type and outcome, one per
/// rejection code, and each stored event's time from arrival to ack.
fn count<'a>(
    metrics: &crate::metrics::Metrics,
    slots: &[Slot],
    types: &'a [String],
    appended: &Result<Vec<evmesh_store::Appended>, Status>,
    arrived: std::time::Instant,
) {
    use crate::metrics::Outcome;
    if !metrics.on() {
        return;
    }
    let mut tally: Vec<(&str, Outcome, u64)> = Vec::new();
    let mut add = |ty: &'a str, outcome: Outcome| match tally
        .iter_mut()
        .find(|(t, o, _)| *t == ty && *o == outcome)
    {
        Some(entry) => entry.2 += 1,
        None => tally.push((ty, outcome, 1)),
    };
    let mut codes: Vec<(tonic::Code, u64)> = Vec::new();
    let mut stored = 0;
    for slot in slots {
        let rejected = match (slot, appended) {
            (Slot::Rejected(r), _) => Some(r.code),
            (Slot::Appended(i, ..), Ok(acks)) => match (acks.get(*i), types.get(*i)) {
                (Some(a), Some(ty)) => {
                    stored += 1;
                    add(
                        ty,
                        if a.duplicate {
                            Outcome::Duplicate
                        } else {
                            Outcome::Stored
                        },
                    );
                    None
                }
                _ => Some(tonic::Code::Internal),
            },
            (Slot::Appended(..), Err(e)) => Some(e.code()),
        };
        if let Some(code) = rejected {
            let ty = match slot {
                Slot::Appended(i, ..) => types.get(*i).map_or("", String::as_str),
                // A refused event's type may be anything: one label for them all.
                Slot::Rejected(_) => "",
            };
            add(ty, Outcome::Rejected);
            match codes.iter_mut().find(|(c, _)| *c == code) {
                Some(entry) => entry.1 += 1,
                None => codes.push((code, 1)),
            }
        }
    }
    for (ty, outcome, n) in tally {
        metrics.published(ty, outcome, n);
    }
    for (code, n) in codes {
        metrics.rejected(code, n);
    }
    if stored > 0 {
        metrics.acked_after(arrived.elapsed(), stored);
    }
}

fn spec(open: pb::SubscribeOpen) -> Result<SubscriptionSpec, Status> {
    if open.patterns.is_empty() {
        return Err(Status::invalid_argument(
            "open.patterns: at least one pattern is required",
        ));
    }
    if open.patterns.len() > MAX_PATTERNS {
        return Err(Status::invalid_argument(format!(
            "open.patterns has {} patterns, at most {MAX_PATTERNS} allowed",
            open.patterns.len()
        )));
    }
    let patterns = open
        .patterns
        .iter()
        .map(|p| {
            if p.len() > MAX_PATTERN_LEN {
                return Err(Status::invalid_argument(format!(
                    "open.patterns: pattern {} is {} bytes long, at most {MAX_PATTERN_LEN} allowed",
                    quoted(p),
                    p.len()
                )));
            }
            Pattern::parse(p).map_err(|e| {
                Status::invalid_argument(format!("open.patterns: pattern {} {e}", quoted(p)))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let group = if open.group.is_empty() {
        None
    } else {
        evmesh_store::validate_event_type(&open.group).map_err(|e| {
            Status::invalid_argument(format!(
                "open.group {} {e}: use dotted lowercase tokens such as shipping.orders",
                quoted(&open.group)
            ))
        })?;
        Some(open.group)
    };
    let mut spec = SubscriptionSpec::new(patterns);
    spec.group = group;
    if let Some(start) = convert::start_position(open.start.as_ref(), "open.start")? {
        spec.start = start;
    }
    if open.max_in_flight > SubscriptionSpec::MAX_MAX_IN_FLIGHT {
        return Err(Status::invalid_argument(format!(
            "open.max_in_flight is {}, at most {} allowed",
            open.max_in_flight,
            SubscriptionSpec::MAX_MAX_IN_FLIGHT
        )));
    }
    if open.max_in_flight > 0 {
        spec.max_in_flight = open.max_in_flight;
    }
    if let Some(timeout) = &open.ack_timeout {
        let timeout = convert::from_duration(timeout, "open.ack_timeout")?;
        if timeout < Duration::from_millis(10) || timeout > MAX_DELAY {
            return Err(Status::invalid_argument(format!(
                "open.ack_timeout must be from 10ms to {}",
                hours(MAX_DELAY)
            )));
        }
        spec.ack_timeout = timeout;
    }
    if open.max_deliveries > 0 {
        spec.max_deliveries = open.max_deliveries;
    }
    spec.auto_ack = open.auto_ack;
    Ok(spec)
}

fn hours(d: Duration) -> String {
    format!("{}h", d.as_secs() / 3600)
}

/// Cuts a nack reason to [`MAX_REASON_LEN`] bytes at a character boundary.
fn bounded_reason(mut reason: String) -> String {
    if reason.len() > MAX_REASON_LEN {
        let mut end = MAX_REASON_LEN;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push('…');
    }
    reason
}

/// A nack's delay: absent is at once; negative or over [`MAX_DELAY`] is refused.
fn nack_delay(delay: Option<prost_types::Duration>) -> Result<Duration, Status> {
    let Some(delay) = delay else {
        return Ok(Duration::ZERO);
    };
    let delay = convert::from_duration(&delay, "nack.delay")?;
    if delay > MAX_DELAY {
        return Err(Status::invalid_argument(format!(
            "nack.delay must be at most {}",
            hours(MAX_DELAY)
        )));
    }
    Ok(delay)
}

/// What a subscription's caller may read, looked up again when the auth file is.
struct SubscribeRights {
    current: Current,
    patterns: Vec<Pattern>,
    group: Option<String>,
    auto_ack: bool,
    _held: Held,
}

/// What a subscription does with a delivery its caller may read, or may not.
enum Readable {
    Yes,
    /// An ephemeral subscription passes over it (settling it when it acks).
    Skip,
    /// A group's member cannot skip for the others: the stream ends and the event
    /// stays with the group.
    End(Status),
}

impl SubscribeRights {
    fn open(caller: Caller, spec: &SubscriptionSpec) -> Result<Self, Status> {
        let mut current = Current::new(caller)?;
        let principal = current.get()?.clone();
        principal.check_subscription(&spec.patterns, spec.group.as_deref())?;
        let held = fairness::take(
            current.holdings(&principal.name),
            &principal,
            Kind::Subscription,
        )?;
        Ok(Self {
            current,
            patterns: spec.patterns.clone(),
            group: spec.group.clone(),
            auto_ack: spec.auto_ack,
            _held: held,
        })
    }

    fn readable(&mut self, event_type: &str) -> Readable {
        match self.current.get() {
            Err(status) => Readable::End(status),
            Ok(p) if p.may_read(event_type) => Readable::Yes,
            Ok(p) => match &self.group {
                None => Readable::Skip,
                Some(group) => Readable::End(Status::permission_denied(format!(
                    "principal {:?} may not read {event_type}, which group {group:?} holds next; the event stays with the group",
                    p.name
                ))),
            },
        }
    }

    /// After the auth file was read again: whether the subscription may go on.
    fn still_allowed(&mut self) -> Result<(), Status> {
        let principal = self.current.get()?.clone();
        principal.check_subscription(&self.patterns, self.group.as_deref())
    }
}

fn deliveries(
    subscription: Subscription,
    shutdown: watch::Receiver<bool>,
    refused: oneshot::Receiver<Status>,
    rights: Option<SubscribeRights>,
) -> BoxStream<pb::SubscribeResponse> {
    let subscribed = pb::SubscribeResponse {
        response: Some(pb::subscribe_response::Response::Subscribed(
            pb::Subscribed {
                group: subscription.group.clone(),
                member_id: subscription.member_id.clone(),
                created: subscription.created,
                start_sequence: subscription.start_sequence,
            },
        )),
    };
    let first = tokio_stream::once(Ok(subscribed));
    let changes = rights.as_ref().map(|r| r.current.changes());
    let control = subscription.control();
    let state = (subscription, Some(refused), rights, changes, control);
    let rest = futures_util::stream::unfold(Some(state), move |state| {
        let mut shutdown = shutdown.clone();
        async move {
            let (mut subscription, mut refused, mut rights, mut changes, control) = state?;
            loop {
                let refusal = async {
                    match refused.as_mut() {
                        Some(r) => r.await.ok(),
                        None => std::future::pending().await,
                    }
                };
                let changed = async {
                    match changes.as_mut() {
                        Some(c) => c.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                return tokio::select! {
                    delivery = subscription.next() => match delivery {
                        Some(d) => {
                            if let Some(r) = rights.as_mut() {
                                match r.readable(&d.event.event.r#type) {
                                    Readable::Yes => {}
                                    Readable::Skip => {
                                        if !r.auto_ack {
                                            let _ = control.send(Feedback::Ack(vec![d.event.sequence])).await;
                                        }
                                        continue;
                                    }
                                    Readable::End(status) => return Some((Err(status), None)),
                                }
                            }
                            let response = pb::SubscribeResponse {
                                response: Some(pb::subscribe_response::Response::Delivery(pb::Delivery {
                                    sequence: d.event.sequence,
                                    attempt: d.attempt,
                                    event: Some(d.event.event.clone()),
                                })),
                            };
                            Some((Ok(response), Some((subscription, refused, rights, changes, control))))
                        }
                        None => Some((Err(match subscription.failure() {
                            Some(reason) => Status::data_loss(reason.to_owned()),
                            None => Status::unavailable("node is shutting down"),
                        }), None)),
                    },
                    status = refusal => match status {
                        Some(status) => Some((Err(status), None)),
                        // The subscriber closed its side: deliveries go on.
                        None => {
                            refused = None;
                            continue;
                        }
                    },
                    true = changed => {
                        if let Some(Err(status)) = rights.as_mut().map(SubscribeRights::still_allowed) {
                            return Some((Err(status), None));
                        }
                        continue;
                    }
                    () = async { let _ = shutdown.wait_for(|&down| down).await; } => {
                        Some((Err(Status::unavailable("node is shutting down")), None))
                    }
                };
            }
        }
    });
    Box::pin(futures_util::StreamExt::chain(first, rest))
}

/// Reads acks and nacks until the subscriber closes its side.
/// A bad ack or nack ends the subscription with the status sent on `refuse`.
async fn feedback(
    mut inbound: Streaming<pb::SubscribeRequest>,
    control: evmesh_store::SubscriptionControl,
    mut shutdown: watch::Receiver<bool>,
    refuse: oneshot::Sender<Status>,
) {
    use pb::subscribe_request::Request as R;
    loop {
        // On shutdown, dropping the request stream lets the connection close even
        // when the client never hangs up.
        let message = tokio::select! {
            m = inbound.message() => m,
            _ = shutdown.wait_for(|&down| down) => return,
        };
        let message = match message {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "subscribe stream ended");
                return;
            }
        };
        let feedback = match message.request {
            Some(R::Ack(ack)) => Feedback::Ack(ack.sequences),
            Some(R::Nack(nack)) => match nack_delay(nack.delay) {
                Ok(delay) => Feedback::Nack {
                    sequences: nack.sequences,
                    delay,
                    reason: bounded_reason(nack.reason),
                },
                Err(status) => {
                    let _ = refuse.send(status);
                    return;
                }
            },
            Some(R::Open(_)) | None => {
                tracing::debug!("ignoring a second open on a subscribe stream");
                continue;
            }
        };
        if control.send(feedback).await.is_err() {
            return;
        }
    }
}

/// The caller of a request, when the node runs with `--auth`.
fn caller<T>(request: &Request<T>) -> Option<Caller> {
    request.extensions().get::<Caller>().cloned()
}

/// The caller's principal as the auth file has it now; `None` without `--auth`.
fn principal<T>(request: &Request<T>) -> Result<Option<Arc<Principal>>, Status> {
    caller(request).map(|c| c.principal()).transpose()
}

fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(value)
    }
}

/// The leading items that fit [`MAX_REPLY_BYTES`], at least one.
fn within_reply<T: prost::Message>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut bytes = 0;
    let mut out = Vec::new();
    for item in items {
        bytes += item.encoded_len() + 8;
        if bytes > MAX_REPLY_BYTES && !out.is_empty() {
            break;
        }
        out.push(item);
    }
    out
}

fn limit(requested: u32, max: u32) -> usize {
    if requested == 0 || requested > max {
        max as usize
    } else {
        requested as usize
    }
}

#[tonic::async_trait]
impl<S: Store> Mesh for MeshService<S> {
    type PublishStream = BoxStream<pb::PublishResponse>;
    type SubscribeStream = BoxStream<pb::SubscribeResponse>;
    type BackupStream = BoxStream<pb::BackupChunk>;

    async fn backup(
        &self,
        request: Request<pb::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        if let Some(p) = principal(&request)? {
            p.check_backup()?;
        }
        let started = std::time::Instant::now();
        let snapshot = self.store.snapshot().await.map_err(status)?;
        tracing::info!(bytes = snapshot.bytes, head = snapshot.head_sequence, took = ?started.elapsed(), "backup taken; streaming it");
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || crate::backup::stream(snapshot, &tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn publish(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        let rights = match caller(&request).map(PublishRights::open).transpose() {
            Ok(rights) => rights,
            Err(refused) => return Err(fairness::refusal(refused).await),
        };
        let inbound = request.into_inner();
        let (steps_tx, steps_rx) = mpsc::channel(PUBLISH_PIPELINE);
        let (out_tx, out_rx) = mpsc::channel(PUBLISH_BATCH);
        tokio::spawn(respond(steps_rx, out_tx, self.metrics.clone()));
        let this = self.clone_handle();
        tokio::spawn(async move {
            let read = this.read_publishes(inbound, steps_tx.clone(), rights);
            // Whatever happens to the reader, the stream never ends with OK while
            // something it was sent is unanswered.
            if std::panic::AssertUnwindSafe(read)
                .catch_unwind()
                .await
                .is_err()
            {
                tracing::error!("a publish stream's reader panicked");
                let _ = steps_tx
                    .send(Step::End(Status::internal(
                        "the node failed while reading this publish stream (its log has the panic); events after the last answered one were not stored",
                    )))
                    .await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        crate::nodes::list(&self.store, &self.identity)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn publish_event(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        use crate::metrics::Outcome;
        let arrived = std::time::Instant::now();
        let principal = principal(&request)?;
        if let Some(principal) = &principal
            && let Some(cap) = principal.limits.publish_rate
            && let Some(caller) = caller(&request)
            && let Some(limiter) =
                fairness::limiter(&caller.auth.holdings(&principal.name), principal)
        {
            fairness::admit(&limiter, cap, 1).await;
        }
        let request = request.into_inner();
        let catalog = self.catalog_for(std::slice::from_ref(&request)).await;
        let refused = |code: tonic::Code, ty: &str| {
            self.metrics.published(ty, Outcome::Rejected, 1);
            self.metrics.rejected(code, 1);
        };
        let event = self
            .accept(&catalog, request.event, principal.as_deref())
            .map_err(|r| {
                refused(r.code, "");
                r.to_status()
            })?;
        let (id, correlation) = (event.id.clone(), event.correlation_id.clone());
        let event_type = event.r#type.clone();
        let span = crate::trace::append_span(&event, self.trace_events);
        let appended = tracing::Instrument::instrument(self.store.append(vec![event]), span)
            .await
            .map_err(|e| {
                let e = status(e);
                refused(e.code(), &event_type);
                e
            })?;
        let a = appended
            .first()
            .copied()
            .ok_or_else(|| Status::internal("append returned no result"))?;
        let outcome = if a.duplicate {
            Outcome::Duplicate
        } else {
            Outcome::Stored
        };
        self.metrics.published(&event_type, outcome, 1);
        self.metrics.acked_after(arrived.elapsed(), 1);
        Ok(Response::new(ack(id, correlation, a)))
    }

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = caller(&request);
        let mut inbound = request.into_inner();
        let open = match inbound.message().await? {
            Some(pb::SubscribeRequest {
                request: Some(pb::subscribe_request::Request::Open(open)),
            }) => open,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first message of a subscribe stream must be open",
                ));
            }
            None => {
                return Err(Status::invalid_argument(
                    "the subscribe stream closed before open",
                ));
            }
        };
        let spec = spec(open)?;
        let rights = match caller.map(|c| SubscribeRights::open(c, &spec)).transpose() {
            Ok(rights) => rights,
            Err(refused) => return Err(fairness::refusal(refused).await),
        };
        let subscription = self.store.subscribe(spec).await.map_err(status)?;
        tracing::debug!(group = %subscription.group, member = %subscription.member_id, "subscribed");
        let (refuse, refused) = oneshot::channel();
        tokio::spawn(feedback(
            inbound,
            subscription.control(),
            self.shutdown.clone(),
            refuse,
        ));
        // Counted while its stream lives.
        let open = crate::metrics::Open::new(&self.metrics.subscriptions);
        let stream = deliveries(subscription, self.shutdown.clone(), refused, rights);
        Ok(Response::new(Box::pin(futures_util::StreamExt::map(
            stream,
            move |item| {
                let _counted = &open;
                item
            },
        ))))
    }

    async fn get_chain(
        &self,
        request: Request<pb::GetChainRequest>,
    ) -> Result<Response<pb::GetChainResponse>, Status> {
        let principal = principal(&request)?;
        let request = request.into_inner();
        let correlation_id = required(&request.correlation_id, "correlation_id")?;
        let wanted = limit(request.limit, MAX_CHAIN);
        let stored = self
            .store
            .chain(correlation_id, request.after_sequence, wanted)
            .await
            .map_err(status)?;
        let found = stored.len();
        // Events the caller may not read are left out, as if not there.
        let readable = stored.into_iter().filter(|e| {
            principal
                .as_ref()
                .is_none_or(|p| p.may_read(&e.event.r#type))
        });
        let events = within_reply(readable.map(|e| pb::ChainEvent {
            sequence: e.sequence,
            event: Some(e.event),
        }));
        Ok(Response::new(pb::GetChainResponse {
            more: events.len() < found || found == wanted,
            events,
        }))
    }

    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let principal = principal(&request)?;
        let request = request.into_inner();
        let wanted = limit(request.limit, MAX_GROUPS);
        let groups = self
            .store
            .groups(&request.after_group, wanted)
            .await
            .map_err(status)?;
        let more = groups.len() == wanted;
        Ok(Response::new(pb::ListGroupsResponse {
            more,
            groups: groups
                .into_iter()
                .filter(|g| principal.as_ref().is_none_or(|p| p.may_use_group(&g.name)))
                .map(convert::group_info)
                .collect(),
        }))
    }

    async fn delete_group(
        &self,
        request: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        let principal = principal(&request)?;
        let request = request.into_inner();
        let group = required(&request.group, "group")?;
        if let Some(p) = &principal {
            p.check_admin("delete", group)?;
        }
        let dead_letters = self.store.delete_group(group).await.map_err(status)?;
        Ok(Response::new(pb::DeleteGroupResponse { dead_letters }))
    }

    async fn seek_group(
        &self,
        request: Request<pb::SeekGroupRequest>,
    ) -> Result<Response<pb::SeekGroupResponse>, Status> {
        let principal = principal(&request)?;
        let request = request.into_inner();
        let group = required(&request.group, "group")?;
        if let Some(p) = &principal {
            p.check_admin("seek", group)?;
        }
        let position =
            convert::start_position(request.position.as_ref(), "position")?.ok_or_else(|| {
                Status::invalid_argument("position is required: earliest, latest, sequence or time")
            })?;
        let info = self.store.seek(group, position).await.map_err(status)?;
        Ok(Response::new(pb::SeekGroupResponse {
            group: Some(convert::group_info(info)),
        }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let principal = principal(&request)?;
        let request = request.into_inner();
        let group = required(&request.group, "group")?;
        if let Some(p) = &principal {
            p.check_group(group)?;
        }
        let wanted = limit(request.limit, MAX_DEAD_LETTERS);
        let letters = self
            .store
            .dead_letters(group, request.after_sequence, wanted)
            .await
            .map_err(status)?;
        let found = letters.len();
        // Dead letters of types the caller may not read are left out.
        let readable = letters.into_iter().filter(|l| {
            principal
                .as_ref()
                .is_none_or(|p| l.event.as_ref().is_none_or(|e| p.may_read(&e.r#type)))
        });
        let dead_letters = within_reply(readable.map(convert::dead_letter));
        Ok(Response::new(pb::ListDeadLettersResponse {
            more: dead_letters.len() < found || found == wanted,
            dead_letters,
        }))
    }

    async fn redrive_dead_letters(
        &self,
        request: Request<pb::RedriveDeadLettersRequest>,
    ) -> Result<Response<pb::RedriveDeadLettersResponse>, Status> {
        let principal = principal(&request)?;
        let request = request.into_inner();
        let group = required(&request.group, "group")?;
        if let Some(p) = &principal {
            p.check_admin("redrive dead letters of", group)?;
        }
        let redriven = self
            .store
            .redrive(group, &request.sequences)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RedriveDeadLettersResponse { redriven }))
    }

    async fn purge_dead_letters(
        &self,
        request: Request<pb::PurgeDeadLettersRequest>,
    ) -> Result<Response<pb::PurgeDeadLettersResponse>, Status> {
        let principal = principal(&request)?;
        let request = request.into_inner();
        let group = required(&request.group, "group")?;
        if let Some(p) = &principal {
            p.check_admin("purge dead letters of", group)?;
        }
        let purged = self
            .store
            .purge(group, &request.sequences)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::PurgeDeadLettersResponse { purged }))
    }
}
