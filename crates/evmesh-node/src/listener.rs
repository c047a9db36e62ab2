//! Accepting connections: a cap on how many are open, a deadline for the HTTP/2
//! handshake, and an accept loop that backs off (and says so) instead of spinning
//! when the process is out of file descriptors. Idle established connections are
//! left to HTTP/2 keepalive, set on the server.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// How the node treats connections.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Connections open at once; a connection over it is closed at once.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams (RPCs) on one connection.
    pub max_streams_per_connection: u32,
    /// A connection must complete the HTTP/2 handshake (the client's preface and
    /// SETTINGS) within this.
    pub handshake_timeout: Duration,
    /// An idle connection is pinged this often, and closed when a ping is not
    /// answered within `keepalive_timeout`.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// HTTP/2 flow-control windows, in bytes: what one stream, and one connection,
    /// may send that the node has not read yet. h2 closes a connection (GOAWAY
    /// `too_many_data_frames`) whose unread small DATA frames cost more than half
    /// the connection window; a publisher sending one small message per frame
    /// (grpc-python does) while the node's reader is busy fills a stream window with
    /// them. A small stream window and a connection window as large as HTTP/2
    /// allows keep that cost (about 4× the unread bytes for 50-byte frames, at most
    /// `max_streams_per_connection` × `stream_window` of them) under the budget.
    pub stream_window: u32,
    pub connection_window: u32,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_streams_per_connection: 1024,
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            stream_window: 128 * 1024,
            connection_window: (1 << 31) - 1,
        }
    }
}

/// The client's connection preface: 24 bytes, then a SETTINGS frame.
const PREFACE: usize = 24;
const FRAME_HEADER: usize = 9;
/// How long accept waits after an error (out of file descriptors, say).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one warning per this, per kind, when a limit is hit.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Says what happened at most once per [`WARN_EVERY`], with how often it did.
struct Warning {
    last: Option<Instant>,
    since: u64,
}

impl Warning {
    fn new() -> Self {
        Self {
            last: None,
            since: 0,
        }
    }

    /// How many times it happened since the last warning, when one is due now.
    fn due(&mut self) -> Option<u64> {
        self.since += 1;
        let now = Instant::now();
        if self
            .last
            .is_some_and(|at| now.duration_since(at) < WARN_EVERY)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since))
    }
}

/// Counts a connection while it is open, from accept to close.
pub(crate) struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self(open.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection accepted under the cap, and when its handshakes must be done by.
struct Accepted {
    tcp: TcpStream,
    counted: Counted,
    deadline: Instant,
}

/// Accepts connections under the cap until whoever takes them goes away.
async fn accept(
    listener: TcpListener,
    limits: ConnectionLimits,
    live: Arc<crate::LiveLimits>,
    open: Arc<AtomicUsize>,
    accepted: mpsc::Sender<Accepted>,
) {
    let mut full = Warning::new();
    let mut failing = Warning::new();
    loop {
        let (tcp, peer) = tokio::select! {
            next = listener.accept() => match next {
                Ok(next) => next,
                Err(e) => {
                    if let Some(times) = failing.due() {
                        tracing::warn!(error = %e, times, "cannot accept connections; retrying (is the node out of file descriptors?)");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = accepted.closed() => return,
        };
        let max_connections = live.max_connections();
        if open.load(Ordering::Relaxed) >= max_connections {
            if let Some(times) = full.due() {
                tracing::warn!(
                    max_connections,
                    %peer,
                    refused = times,
                    "connection cap reached; closing new connections"
                );
            }
            drop(tcp);
            continue;
        }
        // Nagle's algorithm would hold small responses back for tens of ms.
        let _ = tcp.set_nodelay(true);
        let next = Accepted {
            tcp,
            counted: Counted::new(&open),
            deadline: Instant::now() + limits.handshake_timeout,
        };
        if accepted.send(next).await.is_err() {
            return;
        }
    }
}

/// The accepted connections, as tonic's server takes them.
pub(crate) fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    live: Arc<crate::LiveLimits>,
    open: Arc<AtomicUsize>,
) -> impl Stream<Item = io::Result<Conn<TcpStream>>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept(listener, limits, live, open, tx));
    futures_util::StreamExt::map(ReceiverStream::new(rx), |a: Accepted| {
        Ok(Conn::new(a.tcp, a.counted, a.deadline))
    })
}

/// The first byte of a TLS record carrying a handshake message (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// The connections of a TLS listener, handshaken concurrently: those that spoke
/// TLS, and those that did not (a plaintext `http://` client), which the node
/// answers with a status saying that it wants TLS.
pub(crate) fn incoming_tls(
    listener: TcpListener,
    limits: ConnectionLimits,
    live: Arc<crate::LiveLimits>,
    open: Arc<AtomicUsize>,
    config: Arc<tokio_rustls::rustls::ServerConfig>,
) -> (
    impl Stream<Item = io::Result<Conn<TlsStream<TcpStream>>>>,
    impl Stream<Item = io::Result<Conn<TcpStream>>>,
) {
    let (accepted_tx, mut accepted_rx) = mpsc::channel::<Accepted>(64);
    tokio::spawn(accept(listener, limits, live, open, accepted_tx));
    let (tls_tx, tls_rx) = mpsc::channel(64);
    let (plain_tx, plain_rx) = mpsc::channel(16);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                next = accepted_rx.recv() => next,
                () = tls_tx.closed() => return,
            };
            let Some(a) = next else { return };
            let (acceptor, tls_tx, plain_tx) = (acceptor.clone(), tls_tx.clone(), plain_tx.clone());
            tokio::spawn(async move {
                let peer = a.tcp.peer_addr().ok();
                let mut first = [0u8; 1];
                let sniffed = tokio::time::timeout_at(a.deadline, a.tcp.peek(&mut first)).await;
                match sniffed {
                    Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => {}
                    Ok(Ok(1)) => {
                        let _ = plain_tx
                            .send(Ok(Conn::new(a.tcp, a.counted, a.deadline)))
                            .await;
                        return;
                    }
                    _ => return, // closed, failed or silent: nothing to answer
                }
                match tokio::time::timeout_at(a.deadline, acceptor.accept(a.tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tls_tx.send(Ok(Conn::new(tls, a.counted, a.deadline))).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, peer = ?peer, "TLS handshake failed");
                    }
                    Err(_) => {
                        tracing::debug!(peer = ?peer, "TLS handshake did not complete in time");
                    }
                }
            });
        }
    });
    (ReceiverStream::new(tls_rx), ReceiverStream::new(plain_rx))
}

enum Handshake {
    /// The first bytes the client sent, until the preface and its SETTINGS frame
    /// are all in, and when to give up on them.
    Waiting {
        seen: Vec<u8>,
        deadline: Pin<Box<Sleep>>,
    },
    Done,
}

/// One accepted connection (TCP, or TLS over it): counted while open, and cut when
/// its HTTP/2 handshake does not complete in time.
pub(crate) struct Conn<IO> {
    io: IO,
    _counted: Counted,
    handshake: Handshake,
}

impl<IO> Conn<IO> {
    fn new(io: IO, counted: Counted, deadline: Instant) -> Self {
        Self {
            io,
            _counted: counted,
            handshake: Handshake::Waiting {
                seen: Vec::with_capacity(PREFACE + FRAME_HEADER),
                deadline: Box::pin(tokio::time::sleep_until(deadline)),
            },
        }
    }
}

impl<IO: Connected> Connected for Conn<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> IO::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Conn<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Handshake::Waiting { seen, deadline } = &mut this.handshake {
            if let Poll::Ready(Ok(())) = &read {
                seen.extend_from_slice(&buf.filled()[before..]);
                // Past a frame's worth, HTTP/2 itself refuses what is wrong.
                if settings_complete(seen) || seen.len() > 64 * 1024 {
                    this.handshake = Handshake::Done;
                    return read;
                }
                if buf.filled().len() > before {
                    return read;
                }
            }
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the HTTP/2 handshake did not complete in time",
                )));
            }
        }
        read
    }
}

/// Whether `seen` holds the client preface and the whole SETTINGS frame after it.
fn settings_complete(seen: &[u8]) -> bool {
    let Some(header) = seen.get(PREFACE..PREFACE + FRAME_HEADER) else {
        return false;
    };
    let length =
        (usize::from(header[0]) << 16) | (usize::from(header[1]) << 8) | usize::from(header[2]);
    seen.len() >= PREFACE + FRAME_HEADER + length
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Conn<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
