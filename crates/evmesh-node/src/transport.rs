//! Statuses that tonic makes itself when a request message cannot be read, before
//! any handler runs, rewritten to evmesh's contract in one place:
//!
//! - over the size limit, tonic says OUT_OF_RANGE; evmesh says RESOURCE_EXHAUSTED;
//! - a message that does not decode (invalid UTF-8 in a string, a bad varint),
//!   tonic says INTERNAL; it is the client's input, so evmesh says INVALID_ARGUMENT,
//!   naming the field as `event.source`.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::FutureExt;
use tonic::{Code, Status};

const TOO_LARGE: &str = "Error, decoded message length too large";
const UNDECODABLE: &str = "failed to decode Protobuf message: ";

/// The status evmesh answers for one that tonic made, when it is one of these.
fn rewrite(status: &Status) -> Option<Status> {
    let message = status.message();
    match status.code() {
        Code::OutOfRange if message.starts_with(TOO_LARGE) => Some(Status::resource_exhausted(
            format!("request message too large: {message}"),
        )),
        Code::Internal if message.starts_with(UNDECODABLE) => {
            let rest = &message[UNDECODABLE.len()..];
            // prost lists the fields innermost first, as `Message.field: `.
            let mut fields = Vec::new();
            let mut reason = rest;
            while let Some((head, tail)) = reason.split_once(": ") {
                match head.split_once('.') {
                    Some((ty, field))
                        if !ty.is_empty() && !field.is_empty() && !head.contains(' ') =>
                    {
                        fields.push(field);
                        reason = tail;
                    }
                    _ => break,
                }
            }
            fields.reverse();
            let path = if fields.is_empty() {
                "the request".to_owned()
            } else {
                fields.join(".")
            };
            Some(Status::invalid_argument(format!(
                "{path} does not decode: {reason}"
            )))
        }
        _ => None,
    }
}

/// For statuses that reach a handler (streaming requests).
pub(crate) fn status(status: Status) -> Status {
    rewrite(&status).unwrap_or(status)
}

/// For trailers-only responses that tonic sends before a handler runs (unary).
pub(crate) fn response<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    if let Some(rewritten) = Status::from_header_map(headers).and_then(|s| rewrite(&s))
        && let Err(e) = rewritten.add_header(headers)
    {
        tracing::warn!(error = %e, "cannot rewrite a transport status");
    }
    response
}

/// Turns a panic in a handler into that one request's INTERNAL. Without it, a
/// panicking handler's stream is reset and its client sees CANCELLED, with nothing
/// in the node's log to say why.
#[derive(Clone, Copy, Default)]
pub(crate) struct CatchPanicLayer;

impl<S> tower::Layer<S> for CatchPanicLayer {
    type Service = CatchPanic<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CatchPanic { inner }
    }
}

#[derive(Clone)]
pub(crate) struct CatchPanic<S> {
    inner: S,
}

type Answer<B, E> = Pin<Box<dyn Future<Output = Result<http::Response<B>, E>> + Send>>;

fn panicked<B: Default>() -> http::Response<B> {
    tracing::error!("a request handler panicked");
    Status::internal("the node failed on this request (its log has the panic)").into_http()
}

impl<S, R, B> tower::Service<R> for CatchPanic<S>
where
    S: tower::Service<R, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Default + Send + 'static,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = Answer<B, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let Ok(answer) = std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(request)))
        else {
            return Box::pin(std::future::ready(Ok(panicked())));
        };
        Box::pin(async move {
            AssertUnwindSafe(answer)
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Ok(panicked()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_field_that_does_not_decode() {
        let tonic_says = Status::internal(
            "failed to decode Protobuf message: Event.source: PublishRequest.event: invalid string value: data is not UTF-8 encoded",
        );
        let ours = status(tonic_says);
        assert_eq!(ours.code(), Code::InvalidArgument);
        assert_eq!(
            ours.message(),
            "event.source does not decode: invalid string value: data is not UTF-8 encoded"
        );
        let bare = status(Status::internal(
            "failed to decode Protobuf message: invalid varint",
        ));
        assert_eq!(
            bare.message(),
            "the request does not decode: invalid varint"
        );
        let other = status(Status::internal("something else"));
        assert_eq!(other.code(), Code::Internal);
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_internal() {
        use tower::{Layer, Service, ServiceExt};
        let handler = tower::service_fn(|fail: bool| async move {
            assert!(!fail, "a handler that panics");
            Ok::<_, std::convert::Infallible>(http::Response::new(String::from("fine")))
        });
        let mut service = CatchPanicLayer.layer(handler);
        let response = service.ready().await.unwrap().call(true).await.unwrap();
        let status = Status::from_header_map(response.headers()).expect("a status");
        assert_eq!(status.code(), Code::Internal);
        let response = service.ready().await.unwrap().call(false).await.unwrap();
        assert_eq!(response.body(), "fine");
    }
}
