//! This agent's network coordinate in its datacenter: every `PROBE_INTERVAL` it pings up to
//! `PROBE_SERVERS` servers of the datacenter (`ClusterRpc::LanPing`, answered with the
//! server's own coordinate) and feeds the round trips into its Vivaldi coordinate; every sync
//! interval it stores the coordinate in the catalog (`Command::CoordinateBatch`), where
//! `/v1/coordinate/nodes` and `?near=` read it. Client agents have no RPC listener, so servers
//! learn their own coordinates from each other and clients from the servers they ping.

use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::local::Upstream;
use crate::cluster::{ClusterReply, ClusterRpc};
use crate::coordinate::{Client, Coordinate};
use crate::membership::Gossip;
use crate::rpc::{self, RpcClient, Service};
use crate::state::Command;

const PROBE_INTERVAL: Duration = Duration::from_secs(5);
const PROBE_SERVERS: usize = 3;
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Consul's sync_coordinate_interval_min, and its rate target: the whole datacenter sends at
/// most this many coordinate updates per second.
const SYNC_INTERVAL_MIN: Duration = Duration::from_secs(15);
const SYNC_RATE_TARGET: f64 = 64.0;

/// This agent's coordinate, shared with the RPC handler that answers pings.
#[derive(Clone, Default)]
pub struct LanCoordinate {
    client: Arc<Mutex<Client>>,
}

impl LanCoordinate {
    pub fn get(&self) -> Coordinate {
        self.client.lock().coordinate()
    }

    fn update(&self, node: &str, other: &Coordinate, rtt: Duration) {
        self.client.lock().update(node, other, rtt);
    }
}

pub struct CoordinateWorker {
    pub coord: LanCoordinate,
    pub rpc: RpcClient,
    pub gossip: Gossip,
    pub upstream: Upstream,
    pub datacenter: String,
    pub node_name: String,
    /// This agent's own RPC address when it is a server (it does not ping itself).
    pub own_rpc: Option<SocketAddr>,
}

impl CoordinateWorker {
    pub async fn run(self, shutdown: CancellationToken) {
        // The first coordinate is stored after the first probes, then every sync interval.
        let mut next_sync = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(PROBE_INTERVAL) => {}
            }
            self.probe().await;
            if Instant::now() >= next_sync {
                let update = Command::CoordinateBatch(vec![(self.node_name.clone(), self.coord.get())]);
                if let Err(e) = self.upstream.write(update).await {
                    debug!(error = %e, "storing this agent's coordinate failed; retrying next interval");
                }
                next_sync = Instant::now() + sync_interval(self.gossip.members().len());
            }
        }
    }

    async fn probe(&self) {
        let mut servers: Vec<SocketAddr> =
            super::ops::alive_servers(&self.gossip, &self.datacenter).into_iter().filter(|s| Some(*s) != self.own_rpc).collect();
        servers.shuffle(&mut rand::rng());
        let Ok(body) = rpc::encode(&ClusterRpc::LanPing) else { return };
        for addr in servers.into_iter().take(PROBE_SERVERS) {
            let started = Instant::now();
            let reply = self.rpc.call(addr, Service::Cluster, body.clone(), PROBE_TIMEOUT).await.and_then(|b| rpc::decode::<ClusterReply>(&b));
            match reply {
                Ok(ClusterReply::Pong { node, coord, .. }) => self.coord.update(&node, &coord, started.elapsed()),
                other => debug!(server = %addr, reply = ?other.err(), "coordinate probe failed"),
            }
        }
    }
}

/// Consul's scaling: every 15 s, or slower in large datacenters so that all agents together
/// send about 64 updates a second.
fn sync_interval(members: usize) -> Duration {
    SYNC_INTERVAL_MIN.max(Duration::from_secs_f64(members as f64 / SYNC_RATE_TARGET))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_datacenters_sync_less_often() {
        assert_eq!(sync_interval(3), SYNC_INTERVAL_MIN);
        assert_eq!(sync_interval(6400), Duration::from_secs(100));
    }
}
