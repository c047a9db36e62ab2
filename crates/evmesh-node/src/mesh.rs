//! The `evmesh.v1.Mesh` service over a [`Store`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use evmesh_proto::v1 as pb;
use evmesh_proto::v1::mesh_server::Mesh;
use evmesh_store::{Feedback, Pattern, Store, Subscription, SubscriptionSpec};
use futures_util::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::catalog::{Catalog, Catalogs};
use crate::convert::{self, status};
use crate::envelope::{self, Limits, Rejection};
use crate::validate;

/// Most events validated and appended as one batch from one publish stream.
const PUBLISH_BATCH: usize = 1024;
/// Batches of one publish stream in flight to the store at once.
const PUBLISH_PIPELINE: usize = 32;
const MAX_CHAIN: u32 = 10_000;
const MAX_DEAD_LETTERS: u32 = 1_000;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub(crate) struct MeshService<S> {
    store: S,
    limits: Arc<Limits>,
    catalogs: Arc<Catalogs>,
    allow_unregistered: bool,
    trace_events: bool,
    shutdown: watch::Receiver<bool>,
}

impl<S: Store> MeshService<S> {
    pub(crate) fn new(
        store: S,
        limits: Limits,
        catalogs: Arc<Catalogs>,
        allow_unregistered: bool,
        trace_events: bool,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            store,
            limits: Arc::new(limits),
            catalogs,
            allow_unregistered,
            trace_events,
            shutdown,
        }
    }

    fn clone_handle(&self) -> Self {
        Self {
            store: self.store.clone(),
            limits: self.limits.clone(),
            catalogs: self.catalogs.clone(),
            allow_unregistered: self.allow_unregistered,
            trace_events: self.trace_events,
            shutdown: self.shutdown.clone(),
        }
    }

    /// The envelope checks, then the payload against its registered schema.
    fn accept(&self, catalog: &Catalog, event: Option<pb::Event>) -> Result<pb::Event, Rejection> {
        let mut event = envelope::accept(event, &self.limits)?;
        validate::payload(catalog, &mut event, self.allow_unregistered)?;
        Ok(event)
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
    /// Validates one batch and queues its valid events, in stream order.
    async fn start_batch(&self, requests: Vec<pb::PublishRequest>) -> Batch {
        let mut slots = Vec::with_capacity(requests.len());
        let mut events = Vec::with_capacity(requests.len());
        let catalog = self.catalogs.load();
        for request in requests {
            match self.accept(&catalog, request.event) {
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
        let appended = self.store.enqueue(events).await;
        Batch { slots, appended }
    }
}

/// Answers batches in order, as their appends commit.
async fn respond(
    mut batches: mpsc::Receiver<Batch>,
    out: mpsc::Sender<Result<pb::PublishResponse, Status>>,
) {
    while let Some(batch) = batches.recv().await {
        let appended = match batch.appended {
            Ok(ticket) => ticket.wait().await.map_err(status),
            Err(e) => Err(status(e)),
        };
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

fn spec(open: pb::SubscribeOpen) -> Result<SubscriptionSpec, Status> {
    if open.patterns.is_empty() {
        return Err(Status::invalid_argument(
            "open.patterns: at least one pattern is required",
        ));
    }
    let patterns = open
        .patterns
        .iter()
        .map(|p| {
            Pattern::parse(p)
                .map_err(|e| Status::invalid_argument(format!("open.patterns: pattern {p:?} {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let group = if open.group.is_empty() {
        None
    } else {
        evmesh_store::validate_event_type(&open.group).map_err(|e| {
            Status::invalid_argument(format!(
                "open.group {:?} {e}: use dotted lowercase tokens such as shipping.orders",
                open.group
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
        if timeout < Duration::from_millis(10) {
            return Err(Status::invalid_argument(
                "open.ack_timeout must be at least 10ms",
            ));
        }
        spec.ack_timeout = timeout;
    }
    if open.max_deliveries > 0 {
        spec.max_deliveries = open.max_deliveries;
    }
    spec.auto_ack = open.auto_ack;
    Ok(spec)
}

fn deliveries(
    subscription: Subscription,
    shutdown: watch::Receiver<bool>,
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
    let rest = futures_util::stream::unfold(Some(subscription), move |state| {
        let mut shutdown = shutdown.clone();
        async move {
            let mut subscription = state?;
            tokio::select! {
                delivery = subscription.next() => match delivery {
                    Some(d) => {
                        let response = pb::SubscribeResponse {
                            response: Some(pb::subscribe_response::Response::Delivery(pb::Delivery {
                                sequence: d.event.sequence,
                                attempt: d.attempt,
                                event: Some(d.event.event.clone()),
                            })),
                        };
                        Some((Ok(response), Some(subscription)))
                    }
                    None => Some((Err(Status::unavailable("node is shutting down")), None)),
                },
                _ = shutdown.wait_for(|&down| down) => {
                    Some((Err(Status::unavailable("node is shutting down")), None))
                }
            }
        }
    });
    Box::pin(futures_util::StreamExt::chain(first, rest))
}

/// Reads acks and nacks until the subscriber closes its side.
async fn feedback(
    mut inbound: Streaming<pb::SubscribeRequest>,
    control: evmesh_store::SubscriptionControl,
    mut shutdown: watch::Receiver<bool>,
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
            Some(R::Nack(nack)) => Feedback::Nack {
                sequences: nack.sequences,
                delay: nack
                    .delay
                    .and_then(|d| Duration::try_from(d).ok())
                    .unwrap_or(Duration::ZERO),
                reason: nack.reason,
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

fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(value)
    }
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

    async fn publish(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        let mut inbound = request.into_inner();
        let (batches_tx, batches_rx) = mpsc::channel(PUBLISH_PIPELINE);
        let (out_tx, out_rx) = mpsc::channel(PUBLISH_BATCH);
        tokio::spawn(respond(batches_rx, out_tx.clone()));
        let this = self.clone_handle();
        tokio::spawn(async move {
            let mut shutdown = this.shutdown.clone();
            loop {
                let first = tokio::select! {
                    m = inbound.message() => m,
                    _ = shutdown.wait_for(|&down| down) => break,
                };
                let first = match first {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        let _ = out_tx.send(Err(crate::oversize::status(e))).await;
                        break;
                    }
                };
                // Take whatever else has already arrived: one batch, one commit.
                let mut requests = vec![first];
                let mut ended = false;
                while requests.len() < PUBLISH_BATCH {
                    match inbound.message().now_or_never() {
                        Some(Ok(Some(m))) => requests.push(m),
                        Some(Ok(None)) => {
                            ended = true;
                            break;
                        }
                        Some(Err(e)) => {
                            let _ = out_tx.send(Err(crate::oversize::status(e))).await;
                            ended = true;
                            break;
                        }
                        None => break,
                    }
                }
                if batches_tx
                    .send(this.start_batch(requests).await)
                    .await
                    .is_err()
                    || ended
                {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    async fn publish_event(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let event = self
            .accept(&self.catalogs.load(), request.into_inner().event)
            .map_err(|r| r.to_status())?;
        let (id, correlation) = (event.id.clone(), event.correlation_id.clone());
        let span = crate::trace::append_span(&event, self.trace_events);
        let appended = tracing::Instrument::instrument(self.store.append(vec![event]), span)
            .await
            .map_err(status)?;
        let a = appended
            .first()
            .copied()
            .ok_or_else(|| Status::internal("append returned no result"))?;
        Ok(Response::new(ack(id, correlation, a)))
    }

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
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
        let subscription = self.store.subscribe(spec(open)?).await.map_err(status)?;
        tracing::debug!(group = %subscription.group, member = %subscription.member_id, "subscribed");
        tokio::spawn(feedback(
            inbound,
            subscription.control(),
            self.shutdown.clone(),
        ));
        Ok(Response::new(deliveries(
            subscription,
            self.shutdown.clone(),
        )))
    }

    async fn get_chain(
        &self,
        request: Request<pb::GetChainRequest>,
    ) -> Result<Response<pb::GetChainResponse>, Status> {
        let request = request.into_inner();
        let correlation_id = required(&request.correlation_id, "correlation_id")?;
        let events = self
            .store
            .chain(correlation_id, limit(request.limit, MAX_CHAIN))
            .await
            .map_err(status)?;
        Ok(Response::new(pb::GetChainResponse {
            events: events
                .into_iter()
                .map(|e| pb::ChainEvent {
                    sequence: e.sequence,
                    event: Some(e.event),
                })
                .collect(),
        }))
    }

    async fn list_groups(
        &self,
        _: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let groups = self.store.groups().await.map_err(status)?;
        Ok(Response::new(pb::ListGroupsResponse {
            groups: groups.into_iter().map(convert::group_info).collect(),
        }))
    }

    async fn seek_group(
        &self,
        request: Request<pb::SeekGroupRequest>,
    ) -> Result<Response<pb::SeekGroupResponse>, Status> {
        let request = request.into_inner();
        let group = required(&request.group, "group")?;
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
        let request = request.into_inner();
        let group = required(&request.group, "group")?;
        let letters = self
            .store
            .dead_letters(
                group,
                request.after_sequence,
                limit(request.limit, MAX_DEAD_LETTERS),
            )
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListDeadLettersResponse {
            dead_letters: letters.into_iter().map(convert::dead_letter).collect(),
        }))
    }

    async fn redrive_dead_letters(
        &self,
        request: Request<pb::RedriveDeadLettersRequest>,
    ) -> Result<Response<pb::RedriveDeadLettersResponse>, Status> {
        let request = request.into_inner();
        let group = required(&request.group, "group")?;
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
        let request = request.into_inner();
        let group = required(&request.group, "group")?;
        let purged = self
            .store
            .purge(group, &request.sequences)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::PurgeDeadLettersResponse { purged }))
    }
}
