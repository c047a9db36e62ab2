//! Server reflection (v1, and v1alpha for grpcurl 1.8) over the current catalog:
//! the node's own services plus the registered payload types, updated the moment a
//! schema is registered. tonic-reflection serves a fixed set, so this is its own
//! small implementation; both versions share it through one macro, as their
//! messages are the same.

/// The services the node serves, for ListServices.
pub(crate) const SERVICES: &[&str] = &[
    "evmesh.v1.Mesh",
    "evmesh.v1.SchemaRegistry",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

macro_rules! reflection_service {
    ($module:ident, $($pb:ident)::+) => {
        pub(crate) mod $module {
            use std::pin::Pin;
            use std::sync::Arc;

            use $($pb)::+ as pb;
            use pb::server_reflection_request::MessageRequest;
            use pb::server_reflection_response::MessageResponse;
            use tokio::sync::mpsc;
            use tokio_stream::Stream;
            use tokio_stream::wrappers::ReceiverStream;
            use tonic::{Request, Response, Status, Streaming};

            use crate::catalog::{Catalogs, ReflectionIndex};

            pub(crate) struct Reflection {
                catalogs: Arc<Catalogs>,
            }

            pub(crate) fn server(catalogs: Arc<Catalogs>) -> pb::server_reflection_server::ServerReflectionServer<Reflection> {
                pb::server_reflection_server::ServerReflectionServer::new(Reflection { catalogs })
            }

            fn not_found(message: String) -> MessageResponse {
                MessageResponse::ErrorResponse(pb::ErrorResponse {
                    error_code: tonic::Code::NotFound as i32,
                    error_message: message,
                })
            }

            fn files(found: Option<Vec<Vec<u8>>>, missing: impl FnOnce() -> String) -> MessageResponse {
                match found {
                    Some(file_descriptor_proto) => {
                        MessageResponse::FileDescriptorResponse(pb::FileDescriptorResponse { file_descriptor_proto })
                    }
                    None => not_found(missing()),
                }
            }

            /// `readable`: whether the caller may read an event type; the files of
            /// payload types it may not read are as if not there.
            fn answer(index: &ReflectionIndex, request: pb::ServerReflectionRequest, readable: &dyn Fn(&str) -> bool) -> pb::ServerReflectionResponse {
                let response = match &request.message_request {
                    Some(MessageRequest::FileByFilename(name)) => {
                        let found = index.visible(name, readable).then(|| index.file_with_imports(name)).flatten();
                        files(found, || format!("file {name:?} not found"))
                    }
                    Some(MessageRequest::FileContainingSymbol(symbol)) => {
                        let found = index
                            .file_of(symbol)
                            .filter(|file| index.visible(file, readable))
                            .and_then(|_| index.file_defining(symbol));
                        files(found, || format!("symbol {symbol:?} not found"))
                    }
                    Some(MessageRequest::FileContainingExtension(e)) => not_found(format!(
                        "extension {} of {} not found: the node serves no extensions",
                        e.extension_number, e.containing_type
                    )),
                    Some(MessageRequest::AllExtensionNumbersOfType(ty)) => {
                        MessageResponse::AllExtensionNumbersResponse(pb::ExtensionNumberResponse {
                            base_type_name: ty.clone(),
                            extension_number: Vec::new(),
                        })
                    }
                    Some(MessageRequest::ListServices(_)) => MessageResponse::ListServicesResponse(pb::ListServiceResponse {
                        service: super::SERVICES
                            .iter()
                            .map(|name| pb::ServiceResponse { name: (*name).to_owned() })
                            .collect(),
                    }),
                    None => MessageResponse::ErrorResponse(pb::ErrorResponse {
                        error_code: tonic::Code::InvalidArgument as i32,
                        error_message: "message_request is required".into(),
                    }),
                };
                pb::ServerReflectionResponse {
                    valid_host: request.host.clone(),
                    original_request: Some(request),
                    message_response: Some(response),
                }
            }

            type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::ServerReflectionResponse, Status>> + Send>>;

            #[tonic::async_trait]
            impl pb::server_reflection_server::ServerReflection for Reflection {
                type ServerReflectionInfoStream = ResponseStream;

                async fn server_reflection_info(
                    &self,
                    request: Request<Streaming<pb::ServerReflectionRequest>>,
                ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
                    let caller = request.extensions().get::<crate::auth::Caller>().cloned();
                    let mut inbound = request.into_inner();
                    let catalogs = self.catalogs.clone();
                    let (tx, rx) = mpsc::channel(16);
                    tokio::spawn(async move {
                        while let Ok(Some(request)) = inbound.message().await {
                            // The caller's rights as the auth file has them now.
                            let principal = match caller.as_ref().map(|c| c.principal()).transpose() {
                                Ok(p) => p,
                                Err(status) => {
                                    let _ = tx.send(Err(status)).await;
                                    return;
                                }
                            };
                            let readable = |event_type: &str| principal.as_ref().is_none_or(|p| p.may_read(event_type));
                            let response = answer(&catalogs.load().reflection, request, &readable);
                            if tx.send(Ok(response)).await.is_err() {
                                return;
                            }
                        }
                    });
                    Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
                }
            }
        }
    };
}

reflection_service!(v1, tonic_reflection::pb::v1);
reflection_service!(v1alpha, tonic_reflection::pb::v1alpha);
