//! The nodes of a mesh a client may talk to, and the one it talks to now. A broken
//! connection moves to the next node in the list (round the list, and back to the
//! same node when it is the only one).

use std::sync::RwLock;
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::Endpoint;

use crate::credentials::{Credentials, Transport};

use crate::{Error, Result};

/// How long one node may take to accept a connection before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The connection in use: which node, and how many moves came before it.
#[derive(Clone)]
pub(crate) struct Current {
    pub(crate) channel: Transport,
    pub(crate) generation: u64,
    index: usize,
}

pub(crate) struct Nodes {
    urls: Vec<String>,
    endpoints: Vec<Endpoint>,
    credentials: Credentials,
    current: RwLock<Current>,
    /// One move at a time: every caller that saw a connection break waits for it.
    moving: tokio::sync::Mutex<()>,
}

/// Node URLs from a comma-separated list (`http://a:50051,b:50051`), in order; a
/// URL without a scheme is `http://`. An error when the list names none.
pub fn urls(servers: &str) -> Result<Vec<String>> {
    let urls: Vec<String> = servers
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|server| {
            if server.contains("://") {
                server.to_owned()
            } else {
                format!("http://{server}")
            }
        })
        .collect();
    if urls.is_empty() {
        return Err(Error::InvalidArgument("no node URL given".into()));
    }
    Ok(urls)
}

/// The endpoints of `servers` ([`urls`]), set up to notice a dead node quickly.
fn endpoints(servers: &str, credentials: &Credentials) -> Result<Vec<(String, Endpoint)>> {
    urls(servers)?
        .into_iter()
        .map(|url| {
            let endpoint = credentials
                .endpoint(&url)?
                .tcp_nodelay(true)
                .connect_timeout(CONNECT_TIMEOUT)
                // A node cut off (rather than stopped) is noticed within seconds.
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true);
            Ok((url, endpoint))
        })
        .collect()
}

impl Nodes {
    /// Connects to the first node of `servers` that answers, in order.
    pub(crate) async fn connect(servers: &str, credentials: Credentials) -> Result<Self> {
        let (urls, endpoints): (Vec<String>, Vec<Endpoint>) =
            endpoints(servers, &credentials)?.into_iter().unzip();
        let mut failures = Vec::new();
        for (index, endpoint) in endpoints.iter().enumerate() {
            match endpoint.connect().await {
                Ok(channel) => {
                    return Ok(Self {
                        current: RwLock::new(Current {
                            channel: credentials.authorize(channel),
                            generation: 0,
                            index,
                        }),
                        urls,
                        endpoints,
                        credentials,
                        moving: tokio::sync::Mutex::new(()),
                    });
                }
                Err(source) => failures.push((urls[index].clone(), source)),
            }
        }
        let (url, source) = failures
            .pop()
            .unwrap_or_else(|| unreachable!("urls is not empty"));
        let url = if failures.is_empty() {
            url
        } else {
            let mut all: Vec<String> = failures.into_iter().map(|(u, _)| u).collect();
            all.push(url);
            format!("any of {}", all.join(", "))
        };
        Err(Error::Connect { url, source })
    }

    pub(crate) fn current(&self) -> Current {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The URL of the node in use.
    pub(crate) fn url(&self) -> String {
        self.urls[self.current().index].clone()
    }

    /// Moves off the connection of generation `broken`: to the next node that
    /// answers, trying each once (the same one when it is alone). A caller whose
    /// connection another caller has already replaced returns at once; the next
    /// [`Nodes::current`] is the connection to use.
    pub(crate) async fn fail_over(&self, broken: u64) -> Result<()> {
        let _moving = self.moving.lock().await;
        let now = self.current();
        if now.generation != broken {
            return Ok(());
        }
        let n = self.endpoints.len();
        let mut last = None;
        for step in 1..=n {
            let index = (now.index + step) % n;
            match self.endpoints[index].connect().await {
                Ok(channel) => {
                    if index != now.index {
                        tracing::info!(from = %self.urls[now.index], to = %self.urls[index], "moved to another node");
                    }
                    *self.current.write().unwrap_or_else(|e| e.into_inner()) = Current {
                        channel: self.credentials.authorize(channel),
                        generation: now.generation + 1,
                        index,
                    };
                    return Ok(());
                }
                Err(e) => last = Some((index, e)),
            }
        }
        let (index, source) = last.unwrap_or_else(|| unreachable!("there is a node"));
        Err(Error::Disconnected(if n == 1 {
            format!("cannot reach the node at {}: {source}", self.urls[index])
        } else {
            format!(
                "cannot reach any node of {}: {source}",
                self.urls.join(", ")
            )
        }))
    }
}

/// Whether a failed call may succeed on another node (or the same one later): the
/// connection broke or the node could not serve it, rather than the request being
/// wrong or refused.
pub(crate) fn worth_another_node(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::DataLoss
    )
}

/// Doubling waits between attempts, and how long they have been going on.
pub(crate) struct Backoff {
    since: Option<Instant>,
    delay: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);
    const MOST: Duration = Duration::from_secs(1);

    pub(crate) fn new() -> Self {
        Self {
            since: None,
            delay: Self::FIRST,
        }
    }

    /// Waits before the next attempt; false once `give_up_after` has passed since
    /// the first failure.
    pub(crate) async fn wait(&mut self, give_up_after: Duration) -> bool {
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() >= give_up_after {
            return false;
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Self::MOST);
        true
    }

    /// Something succeeded: the next failure starts afresh.
    pub(crate) fn reset(&mut self) {
        self.since = None;
        self.delay = Self::FIRST;
    }
}
