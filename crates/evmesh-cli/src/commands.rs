//! The commands that talk to a running node.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use evmesh_client::Transport;
use evmesh_proto::v1 as pb;
use evmesh_proto::v1::mesh_client::MeshClient;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;

use crate::output;
use crate::schema::Payloads;

/// One line for a failed call: the status code and the node's message.
/// Every item of a paged listing: asks for the page after the last item (`None`
/// first) until the node says nothing more follows.
pub(crate) async fn all_pages<T, K, Fut>(
    mut page: impl FnMut(Option<K>) -> Fut,
    key: impl Fn(&T) -> K,
) -> anyhow::Result<Vec<T>>
where
    Fut: std::future::Future<Output = Result<(Vec<T>, bool), tonic::Status>>,
{
    let mut all: Vec<T> = Vec::new();
    loop {
        let (items, more) = page(all.last().map(&key)).await.map_err(rpc)?;
        let done = !more || items.is_empty();
        all.extend(items);
        if done {
            return Ok(all);
        }
    }
}

pub(crate) fn rpc(status: tonic::Status) -> anyhow::Error {
    // A connection that broke underneath the call (a TLS alert from a node that
    // refused the client's certificate, say) says why only in its source.
    let mut cause: &(dyn std::error::Error + 'static) = &status;
    while let Some(source) = cause.source() {
        cause = source;
    }
    let underneath = cause.to_string();
    if !std::ptr::addr_eq(cause, &status) && !status.message().contains(&underneath) {
        // With TLS 1.3 the client may see the handshake done before the node has
        // judged its certificate: the node's refusal then comes as the connection
        // closing under the first call ("connection was not ready").
        let hint = if underneath.contains("alert")
            || underneath.contains("connection closed")
            || underneath.contains("broken pipe")
            || underneath.contains("connection was not ready")
        {
            ": the node closed the connection, as a node with mTLS does to a client whose certificate its CA did not sign, or that has expired or is missing (--cert and --key)"
        } else {
            ""
        };
        return anyhow!(
            "{:?}: {} ({underneath}){hint}",
            status.code(),
            status.message()
        );
    }
    anyhow!("{:?}: {}", status.code(), status.message())
}

/// Where the client commands find a node.
pub(crate) const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// The node a client command talks to; on every client command and its subcommands.
#[derive(clap::Args)]
pub(crate) struct NodeArg {
    /// The node to talk to: a URL (http://host:port) or host:port; several,
    /// comma-separated, for the first of them that answers.
    #[arg(
        long,
        global = true,
        env = "EVMESH_SERVER",
        default_value = DEFAULT_SERVER,
        value_name = "URL[,URL…]"
    )]
    pub(crate) server: String,
    /// The CA certificate (PEM) that signed the node's, for https:// URLs; without
    /// it, the system's roots.
    #[arg(long, global = true, env = "EVMESH_CA", value_name = "FILE")]
    pub(crate) ca: Option<PathBuf>,
    /// A client certificate (PEM) for nodes that ask for one (mTLS); with --key.
    #[arg(long, global = true, env = "EVMESH_CERT", value_name = "FILE")]
    pub(crate) cert: Option<PathBuf>,
    /// The client certificate's private key (PEM); with --cert.
    #[arg(long, global = true, env = "EVMESH_KEY", value_name = "FILE")]
    pub(crate) key: Option<PathBuf>,
    /// A bearer token for nodes that run with --auth (`evmesh auth token` makes one).
    #[arg(
        long,
        global = true,
        env = "EVMESH_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub(crate) token: Option<String>,
}

impl NodeArg {
    /// The TLS material and token these flags name.
    fn credentials(&self) -> anyhow::Result<evmesh_client::Credentials> {
        let mut credentials = evmesh_client::Credentials::default();
        if let Some(ca) = &self.ca {
            credentials = credentials.ca_file(ca).map_err(|e| anyhow!("--ca: {e}"))?;
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                credentials = credentials
                    .identity_files(cert, key)
                    .map_err(|e| anyhow!("--cert/--key: {e}"))?;
            }
            (Some(_), None) => {
                bail!("--cert needs --key (or EVMESH_KEY): the certificate's private key")
            }
            (None, Some(_)) => {
                bail!("--key needs --cert (or EVMESH_CERT): the certificate it belongs to")
            }
            (None, None) => {}
        }
        if let Some(token) = &self.token {
            credentials = credentials
                .token(token)
                .map_err(|e| anyhow!("--token: {e}"))?;
        }
        Ok(credentials)
    }
}

async fn connect(node: &NodeArg) -> anyhow::Result<MeshClient<Transport>> {
    Ok(MeshClient::new(channel(node).await?).max_decoding_message_size(64 * 1024 * 1024))
}

/// A channel to the node named by --server, or to the first that answers of
/// several, comma-separated, with the credentials of --ca, --cert, --key and --token.
pub(crate) async fn channel(node: &NodeArg) -> anyhow::Result<Transport> {
    let urls = evmesh_client::node_urls(&node.server)
        .map_err(|_| anyhow!("--server is empty: name a node, e.g. {DEFAULT_SERVER}"))?;
    let credentials = node.credentials()?;
    let mut failures = Vec::new();
    for url in urls {
        let endpoint = credentials
            .endpoint(&url)
            .map_err(|e| anyhow!("--server: {e}"))?;
        match endpoint
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
        {
            Ok(channel) => return Ok(credentials.authorize(channel)),
            Err(e) => failures.push((url, e)),
        }
    }
    Err(unreachable(&failures))
}

/// The error for nodes that do not answer: what failed underneath (refused, no
/// such host, timed out), and what to do about it.
fn unreachable(failures: &[(String, tonic::transport::Error)]) -> anyhow::Error {
    let cause = |error: &(dyn std::error::Error + 'static)| {
        let mut cause = error;
        while let Some(source) = cause.source() {
            cause = source;
        }
        cause.to_string()
    };
    if let [(url, error)] = failures {
        let cause = cause(error);
        let hint = if cause.contains("certificate") {
            "does --ca (or EVMESH_CA) name the CA that signed the node's certificate?"
        } else if url == DEFAULT_SERVER {
            "start one with `evmesh serve`, or name another with --server or EVMESH_SERVER"
        } else {
            "is the node running there? --server and EVMESH_SERVER name the node"
        };
        return anyhow!("cannot reach a node at {url} ({cause}): {hint}");
    }
    let each: Vec<String> = failures
        .iter()
        .map(|(url, error)| format!("{url} ({})", cause(error)))
        .collect();
    anyhow!(
        "cannot reach any node of {}: are they running? --server and EVMESH_SERVER name the nodes",
        each.join(", ")
    )
}

/// A start position from the command line: earliest, latest, a sequence or an
/// RFC 3339 time.
fn position(s: &str, flag: &str) -> anyhow::Result<pb::StartPosition> {
    use pb::start_position::Position;
    let position = match s {
        "earliest" => Position::Earliest(()),
        "latest" => Position::Latest(()),
        _ => match s.parse::<u64>() {
            Ok(seq) => Position::Sequence(seq),
            Err(_) => {
                let t = humantime::parse_rfc3339_weak(s).map_err(|_| {
                    anyhow!("{flag} {s:?} is not earliest, latest, a sequence or an RFC 3339 time")
                })?;
                Position::Time(t.into())
            }
        },
    };
    Ok(pb::StartPosition {
        position: Some(position),
    })
}

fn print_json(v: &serde_json::Value) {
    println!("{v}");
}

#[derive(clap::Args)]
pub(crate) struct PublishArgs {
    #[command(flatten)]
    pub(crate) node: NodeArg,
    /// Event type, e.g. shop.order.placed.
    #[arg(long = "type")]
    ty: String,
    /// The payload as JSON, encoded through the type's registered schema (the
    /// --schema-version given, or the latest).
    #[arg(long, conflicts_with_all = ["message", "payload_file"])]
    json: Option<String>,
    /// Fully qualified payload message name, e.g. shop.v1.OrderPlaced; with
    /// --payload-file, instead of --json.
    #[arg(long, required_unless_present = "json", requires = "payload_file")]
    message: Option<String>,
    /// File holding the payload's encoded protobuf bytes; - for standard input.
    #[arg(long, required_unless_present = "json", requires = "message")]
    payload_file: Option<PathBuf>,
    /// Event id; the node assigns a UUIDv7 when left out.
    #[arg(long)]
    id: Option<String>,
    /// Registered schema version of the payload; the latest when left out.
    #[arg(long)]
    schema_version: Option<String>,
    /// The service that publishes the event.
    #[arg(long)]
    source: Option<String>,
    /// Ordering key: a group delivers the events of one aggregate one at a time, in
    /// order.
    #[arg(long)]
    aggregate_id: Option<String>,
    /// The workflow the event belongs to; the node uses the event's own id when left
    /// out, which starts a new workflow.
    #[arg(long)]
    correlation_id: Option<String>,
    /// Id of the event that caused this one (`evmesh chain` draws the tree from it).
    #[arg(long)]
    causation_id: Option<String>,
    /// A header as KEY=VALUE; repeatable.
    #[arg(long = "header", value_name = "KEY=VALUE")]
    headers: Vec<String>,
}

pub(crate) async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let server = &args.node;
    let payload = match (&args.json, &args.message, &args.payload_file) {
        (Some(json), _, _) => {
            let mut payloads = Payloads::connect(server).await?;
            payloads
                .encode_json(
                    &args.ty,
                    args.schema_version.as_deref().unwrap_or_default(),
                    json,
                )
                .await?
        }
        (None, Some(message), Some(file)) => prost_types::Any {
            type_url: format!("type.googleapis.com/{message}"),
            value: read_payload(file)?,
        },
        _ => bail!("give --json, or --message with --payload-file"),
    };
    let mut headers = std::collections::HashMap::new();
    for h in &args.headers {
        let (k, v) = h
            .split_once('=')
            .ok_or_else(|| anyhow!("--header {h:?} must be KEY=VALUE"))?;
        headers.insert(k.to_owned(), v.to_owned());
    }
    let event = pb::Event {
        id: args.id.unwrap_or_default(),
        r#type: args.ty,
        schema_version: args.schema_version.unwrap_or_default(),
        occurred_at: None,
        source: args.source.unwrap_or_default(),
        aggregate_id: args.aggregate_id.unwrap_or_default(),
        correlation_id: args.correlation_id.unwrap_or_default(),
        causation_id: args.causation_id.unwrap_or_default(),
        headers,
        payload: Some(payload),
    };
    let mut client = connect(server).await?;
    let response = client
        .publish_event(pb::PublishRequest { event: Some(event) })
        .await
        .map_err(rpc)?
        .into_inner();
    match response.result {
        Some(pb::publish_response::Result::Ack(ack)) => print_json(&serde_json::json!({
            "event_id": ack.event_id,
            "sequence": ack.sequence,
            "duplicate": ack.duplicate,
            "correlation_id": ack.correlation_id,
        })),
        Some(pb::publish_response::Result::Rejection(r)) => bail!("rejected: {}", r.message),
        None => bail!("the node sent an empty response"),
    }
    Ok(())
}

fn read_payload(file: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    if file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
            .context("cannot read the payload from standard input")?;
        Ok(buf)
    } else {
        std::fs::read(file)
            .with_context(|| format!("cannot read --payload-file {}", file.display()))
    }
}

#[derive(clap::Args)]
pub(crate) struct SubscribeArgs {
    #[command(flatten)]
    pub(crate) node: NodeArg,
    /// Type patterns: `*` one token, `>` the rest, optionally `@semver-requirement`.
    #[arg(required = true)]
    patterns: Vec<String>,
    /// Durable group; each event is acked after it is printed (or nacked, with
    /// --nack). Without a group the subscription is ephemeral and fire-and-forget.
    #[arg(long)]
    group: Option<String>,
    /// Where a new group or an ephemeral subscription starts: earliest, latest, a
    /// sequence or an RFC 3339 time. An existing group resumes where it was.
    #[arg(long, default_value = "latest")]
    from: String,
    /// Exit after this many deliveries.
    #[arg(long)]
    count: Option<u64>,
    /// Most events delivered to this subscriber and not yet acked.
    #[arg(long, default_value_t = 256)]
    max_in_flight: u32,
    /// Nack every delivery with this reason instead of acking it: the group delivers
    /// it again until --max-deliveries, then moves it to its dead letters. For trying
    /// out dead letters and redrive.
    #[arg(long, value_name = "REASON", requires = "group")]
    nack: Option<String>,
    /// Deliveries of one event before a new group dead-letters it (default 5).
    #[arg(long, requires = "group")]
    max_deliveries: Option<u32>,
    /// How long a new group waits for an ack before delivering again, e.g. 30s.
    #[arg(long, value_parser = humantime::parse_duration, requires = "group")]
    ack_timeout: Option<Duration>,
}

pub(crate) async fn subscribe(args: SubscribeArgs) -> anyhow::Result<()> {
    use pb::subscribe_request::Request as R;
    use pb::subscribe_response::Response as S;
    let server = &args.node;
    let start = position(&args.from, "--from")?;
    let mut client = connect(server).await?;
    let (tx, rx) = mpsc::channel(64);
    let auto_ack = args.group.is_none();
    let ack_timeout = args
        .ack_timeout
        .map(prost_types::Duration::try_from)
        .transpose()
        .map_err(|_| anyhow!("--ack-timeout is too long"))?;
    tx.send(pb::SubscribeRequest {
        request: Some(R::Open(pb::SubscribeOpen {
            patterns: args.patterns,
            group: args.group.unwrap_or_default(),
            start: Some(start),
            max_in_flight: args.max_in_flight,
            ack_timeout,
            max_deliveries: args.max_deliveries.unwrap_or(0),
            auto_ack,
        })),
    })
    .await
    .context("cannot open the subscription")?;
    // Says when the last request has been handed to the connection.
    let (sent_tx, sent) = tokio::sync::oneshot::channel::<()>();
    let mut sent_tx = Some(sent_tx);
    let requests = ReceiverStream::new(rx).chain(tokio_stream::once(()).filter_map(move |()| {
        if let Some(sent) = sent_tx.take() {
            let _ = sent.send(());
        }
        None::<pb::SubscribeRequest>
    }));
    let mut stream = client.subscribe(requests).await.map_err(rpc)?.into_inner();
    let mut seen = 0u64;
    if args.count == Some(0) {
        return Ok(());
    }
    let mut payloads = Payloads::connect(server).await?;
    while let Some(message) = stream.message().await.map_err(rpc)? {
        let Some(S::Delivery(d)) = message.response else {
            continue;
        };
        let Some(event) = &d.event else { continue };
        let payload = payloads.decode_json(event).await?;
        print_json(&output::event_json(
            d.sequence,
            Some(d.attempt),
            event,
            payload,
        ));
        if !auto_ack {
            let sequences = vec![d.sequence];
            let request = match &args.nack {
                Some(reason) => R::Nack(pb::Nack {
                    sequences,
                    delay: None,
                    reason: reason.clone(),
                }),
                None => R::Ack(pb::Ack { sequences }),
            };
            tx.send(pb::SubscribeRequest {
                request: Some(request),
            })
            .await
            .context("the subscription closed")?;
        }
        seen += 1;
        if args.count.is_some_and(|n| seen >= n) {
            break;
        }
    }
    // Close our side, and hang up only once the last ack or nack is on its way: the
    // node applies every one it received before it lets this member go.
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), sent).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(stream);
    Ok(())
}

#[derive(clap::Args)]
pub(crate) struct ChainArgs {
    #[command(flatten)]
    pub(crate) node: NodeArg,
    /// The workflow's correlation id (the first event's id, unless it was set).
    correlation_id: String,
    /// tree: the causation tree; json: one JSON line per event.
    #[arg(long, default_value = "tree", value_parser = ["tree", "json"])]
    output: String,
}

pub(crate) async fn chain(args: ChainArgs) -> anyhow::Result<()> {
    let server = &args.node;
    let client = connect(server).await?;
    let events = all_pages(
        |after| {
            let mut client = client.clone();
            let request = pb::GetChainRequest {
                correlation_id: args.correlation_id.clone(),
                limit: 0,
                after_sequence: after.unwrap_or(0),
            };
            async move {
                let page = client.get_chain(request).await?.into_inner();
                Ok((page.events, page.more))
            }
        },
        |e: &pb::ChainEvent| e.sequence,
    )
    .await?;
    if events.is_empty() {
        bail!("no events with correlation id {:?}", args.correlation_id);
    }
    if args.output == "json" {
        let mut payloads = Payloads::connect(server).await?;
        for c in &events {
            if let Some(e) = &c.event {
                let payload = payloads.decode_json(e).await?;
                print_json(&output::event_json(c.sequence, None, e, payload));
            }
        }
    } else {
        print!("{}", output::chain_tree(&events));
    }
    Ok(())
}

#[derive(clap::Args)]
pub(crate) struct GroupsArgs {
    #[command(flatten)]
    pub(crate) node: NodeArg,
    #[command(subcommand)]
    command: GroupsCommand,
}

#[derive(clap::Subcommand)]
pub(crate) enum GroupsCommand {
    /// Every durable group with its lag, pending and dead-letter counts.
    List,
    /// Delete a group, its position and its dead letters (refused while it has
    /// live members).
    Delete {
        /// The group's name.
        group: String,
    },
    /// Move a group to a position; deliveries in flight are forgotten.
    Seek {
        /// The group's name.
        group: String,
        /// earliest, latest, a sequence or an RFC 3339 time.
        #[arg(long)]
        to: String,
    },
}

fn group_row(g: &pb::GroupInfo) -> Vec<String> {
    let timeout = g
        .ack_timeout
        .and_then(|d| Duration::try_from(d).ok())
        .map_or("-".to_owned(), |d| {
            humantime::format_duration(d).to_string()
        });
    vec![
        g.name.clone(),
        g.patterns.join(","),
        g.ack_floor.to_string(),
        g.lag.to_string(),
        g.pending.to_string(),
        g.dead_letters.to_string(),
        g.members.to_string(),
        timeout,
        g.max_deliveries.to_string(),
    ]
}

const GROUP_HEADER: [&str; 9] = [
    "GROUP",
    "PATTERNS",
    "ACK_FLOOR",
    "LAG",
    "PENDING",
    "DEAD",
    "MEMBERS",
    "ACK_TIMEOUT",
    "MAX_DELIVERIES",
];

pub(crate) async fn groups(args: GroupsArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.node).await?;
    match args.command {
        GroupsCommand::List => {
            let groups = all_pages(
                |after| {
                    let mut client = client.clone();
                    let request = pb::ListGroupsRequest {
                        after_group: after.unwrap_or_default(),
                        limit: 0,
                    };
                    async move {
                        let page = client.list_groups(request).await?.into_inner();
                        Ok((page.groups, page.more))
                    }
                },
                |g: &pb::GroupInfo| g.name.clone(),
            )
            .await?;
            let rows: Vec<_> = groups.iter().map(group_row).collect();
            print!("{}", output::table(&GROUP_HEADER, &rows));
        }
        GroupsCommand::Delete { group } => {
            let deleted = client
                .delete_group(pb::DeleteGroupRequest {
                    group: group.clone(),
                })
                .await
                .map_err(rpc)?
                .into_inner();
            println!(
                "deleted group {group} with {} dead letters",
                deleted.dead_letters
            );
        }
        GroupsCommand::Seek { group, to } => {
            let position = position(&to, "--to")?;
            let info = client
                .seek_group(pb::SeekGroupRequest {
                    group,
                    position: Some(position),
                })
                .await
                .map_err(rpc)?
                .into_inner()
                .group
                .ok_or_else(|| anyhow!("the node sent no group"))?;
            print!("{}", output::table(&GROUP_HEADER, &[group_row(&info)]));
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub(crate) struct DlqArgs {
    #[command(flatten)]
    pub(crate) node: NodeArg,
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(clap::Subcommand)]
pub(crate) enum DlqCommand {
    /// A group's dead letters, oldest first.
    List {
        /// The group's name.
        group: String,
        /// json: one JSON line per dead letter.
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Deliver dead letters again, attempts reset.
    Redrive {
        /// The group's name.
        group: String,
        /// Only these sequences; all when left out.
        #[arg(long = "seq")]
        sequences: Vec<u64>,
    },
    /// Delete dead letters for good.
    Purge {
        /// The group's name.
        group: String,
        /// Only these sequences; all when left out.
        #[arg(long = "seq")]
        sequences: Vec<u64>,
    },
}

pub(crate) async fn dlq(args: DlqArgs) -> anyhow::Result<()> {
    let server = &args.node;
    let mut client = connect(server).await?;
    match args.command {
        DlqCommand::List {
            group,
            output: format,
        } => {
            let letters = client
                .list_dead_letters(pb::ListDeadLettersRequest {
                    group,
                    after_sequence: 0,
                    limit: 0,
                })
                .await
                .map_err(rpc)?
                .into_inner()
                .dead_letters;
            if format == "json" {
                let mut payloads = Payloads::connect(server).await?;
                for d in &letters {
                    let mut v = match &d.event {
                        Some(e) => {
                            let payload = payloads.decode_json(e).await?;
                            output::event_json(d.sequence, None, e, payload)
                        }
                        None => serde_json::json!({
                            "sequence": d.sequence,
                            "event_deleted": d.event_deleted,
                        }),
                    };
                    if let Some(obj) = v.as_object_mut() {
                        obj.insert("attempts".into(), d.attempts.into());
                        obj.insert("reason".into(), d.reason.clone().into());
                        obj.insert("dead_at".into(), output::time(d.dead_at.as_ref()));
                    }
                    print_json(&v);
                }
            } else {
                let rows: Vec<Vec<String>> = letters
                    .iter()
                    .map(|d| {
                        let (r#type, id) = match &d.event {
                            Some(e) => (e.r#type.clone(), e.id.clone()),
                            None => ("(deleted by retention)".to_owned(), "-".to_owned()),
                        };
                        vec![
                            d.sequence.to_string(),
                            r#type,
                            id,
                            d.attempts.to_string(),
                            output::time(d.dead_at.as_ref())
                                .as_str()
                                .unwrap_or("-")
                                .to_owned(),
                            d.reason.clone(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    output::table(
                        &["SEQ", "TYPE", "ID", "ATTEMPTS", "DEAD_AT", "REASON"],
                        &rows
                    )
                );
            }
        }
        DlqCommand::Redrive { group, sequences } => {
            let n = client
                .redrive_dead_letters(pb::RedriveDeadLettersRequest { group, sequences })
                .await
                .map_err(rpc)?
                .into_inner()
                .redriven;
            println!("redriven {n}");
        }
        DlqCommand::Purge { group, sequences } => {
            let n = client
                .purge_dead_letters(pb::PurgeDeadLettersRequest { group, sequences })
                .await
                .map_err(rpc)?
                .into_inner()
                .purged;
            println!("purged {n}");
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub(crate) struct HealthArgs {
    #[command(flatten)]
    pub(crate) node: NodeArg,
    /// Keep asking this long (e.g. 10s) until the node serves, for scripts that
    /// have just started one.
    #[arg(long, value_parser = humantime::parse_duration)]
    wait: Option<Duration>,
}

/// Asks grpc.health.v1 whether the node serves `evmesh.v1.Mesh`; prints
/// `URL: SERVING`, or fails with what it answered.
pub(crate) async fn health(args: HealthArgs) -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let server = &args.node;
    let deadline = tokio::time::Instant::now() + args.wait.unwrap_or_default();
    loop {
        let answer = match channel(server).await {
            Ok(channel) => tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "evmesh.v1.Mesh".into(),
                })
                .await
                .map_err(rpc)
                .map(|r| r.into_inner().status()),
            Err(e) => Err(e),
        };
        match answer {
            Ok(ServingStatus::Serving) => {
                println!("{}: SERVING", server.server);
                return Ok(());
            }
            Ok(status) if tokio::time::Instant::now() >= deadline => {
                bail!("{}: {}", server.server, status.as_str_name())
            }
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[derive(clap::Args)]
pub(crate) struct NodesArgs {
    #[command(flatten)]
    pub(crate) node: NodeArg,
    /// One JSON object per node instead of a table.
    #[arg(long)]
    json: bool,
}

/// The nodes of the mesh: name, address, since when, and the groups each serves
/// with their members there; `*` marks the node that answered.
pub(crate) async fn nodes(args: NodesArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.node).await?;
    let nodes = client
        .list_nodes(pb::ListNodesRequest {})
        .await
        .map_err(rpc)?
        .into_inner()
        .nodes;
    let groups = |n: &pb::NodeInfo| {
        n.groups
            .iter()
            .map(|g| {
                let owner = if g.owner { ", owner" } else { "" };
                format!("{} ({} members{owner})", g.name, g.members)
            })
            .collect::<Vec<_>>()
    };
    if args.json {
        for n in &nodes {
            let line = serde_json::json!({
                "name": n.name,
                "address": n.address,
                "startedAt": output::time(n.started_at.as_ref()),
                "seenAt": output::time(n.seen_at.as_ref()),
                "thisNode": n.this_node,
                "groups": n.groups.iter().map(|g| serde_json::json!({"name": g.name, "members": g.members, "owner": g.owner})).collect::<Vec<_>>(),
            });
            println!("{line}");
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                format!("{}{}", n.name, if n.this_node { " *" } else { "" }),
                n.address.clone(),
                output::time(n.started_at.as_ref())
                    .as_str()
                    .unwrap_or("-")
                    .to_owned(),
                match groups(n) {
                    g if g.is_empty() => "-".to_owned(),
                    g => g.join(", "),
                },
            ]
        })
        .collect();
    print!(
        "{}",
        output::table(&["NODE", "ADDRESS", "STARTED", "GROUPS"], &rows)
    );
    Ok(())
}
