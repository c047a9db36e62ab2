//! A request message over the transport's size limit is refused by tonic with
//! OUT_OF_RANGE before any handler runs. evmesh's contract is RESOURCE_EXHAUSTED for
//! anything over a limit, so the status is rewritten here, in one place.

use http::HeaderValue;
use tonic::{Code, Status};

const TOO_LARGE: &[u8] = b"Error, decoded message length too large";

fn is_oversize(code: Code, message: &[u8]) -> bool {
    code == Code::OutOfRange && message.starts_with(TOO_LARGE)
}

/// For statuses that reach a handler (streaming requests).
pub(crate) fn status(status: Status) -> Status {
    if is_oversize(status.code(), status.message().as_bytes()) {
        Status::resource_exhausted(format!("request message too large: {}", status.message()))
    } else {
        status
    }
}

/// For trailers-only responses that tonic sends before a handler runs (unary).
pub(crate) fn resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let oversize = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
        .zip(headers.get("grpc-message"))
        // grpc-message is percent-encoded on the wire.
        .is_some_and(|(code, message)| {
            let message = message.to_str().unwrap_or_default().replace("%20", " ");
            is_oversize(code, message.as_bytes())
        });
    if oversize {
        let code = (Code::ResourceExhausted as i32).to_string();
        if let Ok(value) = HeaderValue::from_str(&code) {
            headers.insert("grpc-status", value);
        }
    }
    response
}
