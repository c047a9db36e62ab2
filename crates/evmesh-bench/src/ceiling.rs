//! The ceiling: a bare tonic server on the same wire API whose Publish acks every
//! request at once, with no validation and no storage.

use std::net::SocketAddr;
use std::time::Duration;

use evmesh_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Acks every published event at once.
struct Echo;

#[tonic::async_trait]
impl pb::mesh_server::Mesh for Echo {
    type PublishStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::PublishResponse, tonic::Status>> + Send>,
    >;
    type SubscribeStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::SubscribeResponse, tonic::Status>> + Send>,
    >;
    type BackupStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::BackupChunk, tonic::Status>> + Send>,
    >;

    async fn publish(
        &self,
        request: tonic::Request<tonic::Streaming<pb::PublishRequest>>,
    ) -> Result<tonic::Response<Self::PublishStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            let mut sequence = 0;
            while let Ok(Some(request)) = inbound.message().await {
                sequence += 1;
                let ack = pb::PublishAck {
                    event_id: request.event.map(|e| e.id).unwrap_or_default(),
                    sequence,
                    duplicate: false,
                    correlation_id: String::new(),
                };
                let response = pb::PublishResponse {
                    result: Some(pb::publish_response::Result::Ack(ack)),
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn publish_event(
        &self,
        _: tonic::Request<pb::PublishRequest>,
    ) -> Result<tonic::Response<pb::PublishResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("the ceiling only streams"))
    }
    async fn subscribe(
        &self,
        _: tonic::Request<tonic::Streaming<pb::SubscribeRequest>>,
    ) -> Result<tonic::Response<Self::SubscribeStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("the ceiling only publishes"))
    }
    async fn get_chain(
        &self,
        _: tonic::Request<pb::GetChainRequest>,
    ) -> Result<tonic::Response<pb::GetChainResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn list_groups(
        &self,
        _: tonic::Request<pb::ListGroupsRequest>,
    ) -> Result<tonic::Response<pb::ListGroupsResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn seek_group(
        &self,
        _: tonic::Request<pb::SeekGroupRequest>,
    ) -> Result<tonic::Response<pb::SeekGroupResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn list_dead_letters(
        &self,
        _: tonic::Request<pb::ListDeadLettersRequest>,
    ) -> Result<tonic::Response<pb::ListDeadLettersResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn redrive_dead_letters(
        &self,
        _: tonic::Request<pb::RedriveDeadLettersRequest>,
    ) -> Result<tonic::Response<pb::RedriveDeadLettersResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn purge_dead_letters(
        &self,
        _: tonic::Request<pb::PurgeDeadLettersRequest>,
    ) -> Result<tonic::Response<pb::PurgeDeadLettersResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn delete_group(
        &self,
        _: tonic::Request<pb::DeleteGroupRequest>,
    ) -> Result<tonic::Response<pb::DeleteGroupResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(""))
    }

    async fn list_nodes(
        &self,
        _: tonic::Request<pb::ListNodesRequest>,
    ) -> Result<tonic::Response<pb::ListNodesResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(""))
    }

    async fn backup(
        &self,
        _: tonic::Request<pb::BackupRequest>,
    ) -> Result<tonic::Response<Self::BackupStream>, tonic::Status> {
        Err(tonic::Status::unimplemented(""))
    }
}

/// Starts the ceiling server on its own 2-thread runtime; returns its address.
pub fn start() -> anyhow::Result<SocketAddr> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let _ = ready_tx.send(listener.local_addr()?);
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tonic::transport::Server::builder()
                .add_service(pb::mesh_server::MeshServer::new(Echo))
                .serve_with_incoming(incoming)
                .await?;
            anyhow::Ok(())
        })
    });
    Ok(ready_rx.recv_timeout(Duration::from_secs(30))?)
}
