//! The response body type shared by every route: a fixed body or a live event stream.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, SizeHint};

use crate::http::stream::SseStream;

/// Either a small complete answer or an SSE stream that ends on its own terms.
pub enum GatewayBody {
    /// A complete body (JSON answers, metrics).
    Full(Full<Bytes>),
    /// A live event stream.
    Stream(Box<SseStream>),
}

impl GatewayBody {
    /// A complete body from text.
    pub fn text(s: impl Into<Bytes>) -> Self {
        GatewayBody::Full(Full::new(s.into()))
    }

    /// For a stream whose write starts waiting at `since`: when the write must have made
    /// progress, and why the stream ends if it has not (see `SseStream::write_deadline`).
    pub fn write_deadline(
        &self,
        since: tokio::time::Instant,
    ) -> Option<(tokio::time::Instant, crate::core::hub::CloseReason)> {
        match self {
            GatewayBody::Stream(s) => Some(s.write_deadline(since)),
            GatewayBody::Full(_) => None,
        }
    }

    /// Records why a stream ends (the first reason recorded wins).
    pub fn close_as(&self, reason: crate::core::hub::CloseReason) {
        if let GatewayBody::Stream(s) = self {
            s.close_as(reason);
        }
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            GatewayBody::Full(b) => Pin::new(b).poll_frame(cx),
            GatewayBody::Stream(s) => Pin::new(s.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GatewayBody::Full(b) => b.is_end_stream(),
            GatewayBody::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GatewayBody::Full(b) => b.size_hint(),
            GatewayBody::Stream(_) => SizeHint::default(),
        }
    }
}
