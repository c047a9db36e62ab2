//! One Publish stream shared by every caller: requests go out as they come, and
//! responses, which the node sends in order, are matched to callers in order.

use std::collections::VecDeque;

use evmesh_proto::v1 as pb;
use evmesh_proto::v1::mesh_client::MeshClient;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

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
    pub(crate) fn start(channel: Channel) -> Self {
        let (jobs, rx) = mpsc::channel(IN_FLIGHT);
        tokio::spawn(run(channel, rx));
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

/// Opens a stream on the first job, and a new one after the old one breaks.
async fn run(channel: Channel, mut jobs: mpsc::Receiver<(pb::Event, Reply)>) {
    while let Some(first) = jobs.recv().await {
        let (requests, rx) = mpsc::channel(IN_FLIGHT);
        let mut pending: VecDeque<Reply> = VecDeque::new();
        let _ = requests.try_send(pb::PublishRequest {
            event: Some(first.0),
        });
        pending.push_back(first.1);
        let mut client = MeshClient::new(channel.clone());
        let mut responses = match client.publish(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                for reply in pending.drain(..) {
                    let _ = reply.send(Err(Error::Status(status.clone())));
                }
                continue;
            }
        };
        let broken = loop {
            tokio::select! {
                job = jobs.recv(), if pending.len() < IN_FLIGHT => match job {
                    Some((event, reply)) => {
                        pending.push_back(reply);
                        if requests.send(pb::PublishRequest { event: Some(event) }).await.is_err() {
                            break "the publish stream closed".to_owned();
                        }
                    }
                    None => {
                        // Every handle is gone: finish what is in flight, then stop.
                        drop(requests);
                        while let Some(reply) = pending.pop_front() {
                            let result = match responses.message().await {
                                Ok(Some(r)) => answer(r),
                                Ok(None) => Err(Error::Disconnected("the publish stream ended".into())),
                                Err(status) => Err(Error::Status(status)),
                            };
                            let _ = reply.send(result);
                        }
                        return;
                    }
                },
                response = responses.message() => match response {
                    Ok(Some(r)) => {
                        if let Some(reply) = pending.pop_front() {
                            let _ = reply.send(answer(r));
                        }
                    }
                    Ok(None) => break "the publish stream ended".to_owned(),
                    Err(status) => break status.to_string(),
                },
            }
        };
        tracing::warn!(reason = %broken, unacked = pending.len(), "publish stream broke; reconnecting on the next publish");
        for reply in pending.drain(..) {
            let _ = reply.send(Err(Error::Disconnected(broken.clone())));
        }
    }
}
