//! The node's place in the mesh: its name and address, announced to the other
//! nodes on the same storage every [`ANNOUNCE_EVERY`] with the durable groups it
//! serves, and the list `ListNodes` answers with.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use evmesh_proto::v1 as pb;
use evmesh_store::{NodeRecord, Store};
use tokio::sync::watch;

use crate::NodeConfig;

/// How often a node announces itself; well inside [`evmesh_store::NODE_TTL`].
const ANNOUNCE_EVERY: Duration = Duration::from_secs(2);

/// Who this node is.
pub(crate) struct Identity {
    pub(crate) name: String,
    pub(crate) address: String,
    pub(crate) started_at: SystemTime,
}

/// The machine's name, for a node's default name and address.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

impl Identity {
    pub(crate) fn new(config: &NodeConfig, listening: SocketAddr) -> Self {
        let host = if listening.ip().is_unspecified() {
            host_name()
        } else {
            listening.ip().to_string()
        };
        let address = config.advertise.clone().unwrap_or_else(|| match listening {
            SocketAddr::V6(_) if !listening.ip().is_unspecified() => {
                format!("http://[{host}]:{}", listening.port())
            }
            _ => format!("http://{host}:{}", listening.port()),
        });
        let name = config
            .node_name
            .clone()
            .unwrap_or_else(|| format!("{}:{}", host_name(), listening.port()));
        Self {
            name,
            address,
            started_at: SystemTime::now(),
        }
    }

    /// This node's record now.
    pub(crate) async fn record<S: Store>(&self, store: &S) -> NodeRecord {
        NodeRecord {
            name: self.name.clone(),
            address: self.address.clone(),
            started_at: self.started_at,
            seen_at: SystemTime::now(),
            groups: store.local_groups().await,
            instance: String::new(),
        }
    }
}

/// Announces the node until it stops.
pub(crate) fn announce<S: Store>(
    store: S,
    identity: Arc<Identity>,
    mut down: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(ANNOUNCE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = down.changed() => return,
            }
            if *down.borrow() {
                return;
            }
            let record = identity.record(&store).await;
            if let Err(e) = store.announce_node(record).await {
                tracing::debug!(error = %e, "announcing the node");
            }
        }
    });
}

/// Every node whose announcement stands, this one as it is now, by name.
pub(crate) async fn list<S: Store>(
    store: &S,
    identity: &Identity,
) -> Result<pb::ListNodesResponse, evmesh_store::StoreError> {
    let mut records = store.nodes().await?;
    records.retain(|r| r.name != identity.name);
    records.push(identity.record(store).await);
    records.sort_by(|a, b| a.name.cmp(&b.name));
    let nodes = records
        .into_iter()
        .map(|r| pb::NodeInfo {
            this_node: r.name == identity.name,
            name: r.name,
            address: r.address,
            started_at: Some(r.started_at.into()),
            seen_at: Some(r.seen_at.into()),
            groups: r
                .groups
                .into_iter()
                .map(|g| pb::NodeGroup {
                    name: g.name,
                    members: g.members,
                    owner: g.owner,
                })
                .collect(),
        })
        .collect();
    Ok(pb::ListNodesResponse { nodes })
}
