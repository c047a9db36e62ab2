//! One Publish stream shared by every caller: requests go out as they come, and
//! responses, which the node sends in order, are matched to callers in order.
//!
//! When the stream breaks, or the node answers that it cannot store an event now
//! (UNAVAILABLE: it lost its storage), the publisher moves to the next node of the
//! mesh and sends every unanswered event again, in order, with the same ids: the
//! mesh's idempotency stores each once, and one that had landed comes back as a
//! duplicate with its original sequence. It gives up on them only when no node has
//! taken them for [`ConnectOptions::failover_for`](crate::ConnectOptions).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use evmesh_proto::v1 as pb;
use evmesh_proto::v1::mesh_client::MeshClient;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use crate::nodes::{Backoff, Nodes, worth_another_node};
use crate::{Error, Result};

/// Unacked events one stream holds at most.
const IN_FLIGHT: usize = 4096;

type Reply = oneshot::Sender<Result<pb::PublishAck>>;

/// A streaming publisher. Cloning shares the stream.
#[derive(Clone)]
pub struct Publisher {
    jobs: mpsc::Sender<(pb::Event, Reply)>,
}

impl Publisher {
    pub(crate) fn start(nodes: Arc<Nodes>, failover_for: Duration) -> Self {
        let (jobs, rx) = mpsc::channel(IN_FLIGHT);
        tokio::spawn(run(nodes, failover_for, rx));
        Self { jobs }
    }

    /// Publishes and waits for the ack; a rejection is [`Error::Rejected`].
    pub async fn publish(&self, event: pb::Event) -> Result<pb::PublishAck> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send((event, reply))
            .await
            .map_err(|_| Error::Disconnected("the publisher stopped".into()))?;
        answer
            .await
            .map_err(|_| Error::Disconnected("the publisher stopped".into()))?
    }
}

/// How one stream ended.
enum Broken {
    /// Worth sending what is unanswered again, to another node if there is one.
    Retry(Error),
    /// The node refused the stream itself: every unanswered event fails with it.
    Fail(tonic::Status),
}

fn broken(status: tonic::Status) -> Broken {
    if worth_another_node(status.code()) {
        Broken::Retry(Error::Status(status))
    } else {
        Broken::Fail(status)
    }
}

fn answer(response: pb::PublishResponse) -> Result<pb::PublishAck> {
    match response.result {
        Some(pb::publish_response::Result::Ack(ack)) => Ok(ack),
        Some(pb::publish_response::Result::Rejection(r)) => Err(Error::Rejected {
            code: tonic::Code::from_i32(r.code),
            message: r.message,
            violations: r.violations,
        }),
        None => Err(Error::Disconnected("an empty publish response".into())),
    }
}

/// Sends the jobs on one stream at a time, and everything unanswered again on a new
/// one when a stream breaks; stops once every handle is gone and every job answered.
async fn run(
    nodes: Arc<Nodes>,
    failover_for: Duration,
    mut jobs: mpsc::Receiver<(pb::Event, Reply)>,
) {
    // Sent and not yet answered, in the order sent.
    let mut pending: VecDeque<(pb::Event, Reply)> = VecDeque::new();
    let mut closed = false;
    let mut backoff = Backoff::new();
    loop {
        if pending.is_empty() {
            if closed {
                return;
            }
            match jobs.recv().await {
                Some(job) => pending.push_back(job),
                None => return,
            }
        }
        let node = nodes.current();
        let outcome = stream(
            &node.channel,
            &mut pending,
            &mut jobs,
            &mut closed,
            &mut backoff,
        )
        .await;
        let error = match outcome {
            None => continue,
            Some(Broken::Fail(status)) => {
                for (_, reply) in pending.drain(..) {
                    let _ = reply.send(Err(Error::Status(status.clone())));
                }
                continue;
            }
            Some(Broken::Retry(error)) => error,
        };
        tracing::warn!(node = %nodes.url(), error = %error, unacked = pending.len(), "publish stream broke; sending the unacked events again");
        if backoff.wait(failover_for).await {
            // When no node answers, the next stream fails at once and this comes
            // round again, until `failover_for` has passed.
            if let Err(e) = nodes.fail_over(node.generation).await {
                tracing::warn!(error = %e, "no node to move to yet");
            }
            continue;
        }
        let message = format!("no node took the event within {failover_for:?}: {error}");
        for (_, reply) in pending.drain(..) {
            let _ = reply.send(Err(Error::Disconnected(message.clone())));
        }
        backoff.reset();
    }
}

/// One Publish stream: sends what is pending, then new jobs as they come, and
/// answers callers as responses come. `None` when every job is answered and no more
/// will come.
async fn stream(
    channel: &crate::Transport,
    pending: &mut VecDeque<(pb::Event, Reply)>,
    jobs: &mut mpsc::Receiver<(pb::Event, Reply)>,
    closed: &mut bool,
    backoff: &mut Backoff,
) -> Option<Broken> {
    let (requests, rx) = mpsc::channel(IN_FLIGHT);
    for (event, _) in pending.iter() {
        let _ = requests.try_send(pb::PublishRequest {
            event: Some(event.clone()),
        });
    }
    let mut requests = Some(requests);
    let mut client = MeshClient::new(channel.clone());
    let mut responses = match client.publish(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => return Some(broken(status)),
    };
    loop {
        if *closed && pending.is_empty() {
            return None;
        }
        tokio::select! {
            job = jobs.recv(), if !*closed && pending.len() < IN_FLIGHT => match job {
                Some((event, reply)) => {
                    let request = pb::PublishRequest { event: Some(event.clone()) };
                    pending.push_back((event, reply));
                    let sent = match &requests {
                        Some(requests) => requests.send(request).await.is_ok(),
                        None => false,
                    };
                    if !sent {
                        return Some(Broken::Retry(Error::Disconnected("the publish stream closed".into())));
                    }
                }
                // Every handle is gone: finish what is in flight, then stop.
                None => {
                    *closed = true;
                    requests = None;
                }
            },
            response = responses.message() => match response {
                Ok(Some(r)) => {
                    if let Some(pb::publish_response::Result::Rejection(rejection)) = &r.result
                        && tonic::Code::from_i32(rejection.code) == tonic::Code::Unavailable
                    {
                        // The node could not store it now; another node may.
                        return Some(Broken::Retry(Error::Rejected {
                            code: tonic::Code::Unavailable,
                            message: rejection.message.clone(),
                            violations: Vec::new(),
                        }));
                    }
                    backoff.reset();
                    if let Some((_, reply)) = pending.pop_front() {
                        let _ = reply.send(answer(r));
                    }
                }
                Ok(None) if *closed && pending.is_empty() => return None,
                Ok(None) => return Some(Broken::Retry(Error::Disconnected("the publish stream ended".into()))),
                Err(status) => return Some(broken(status)),
            },
        }
    }
}
