//! systemd readiness notification (the `sd_notify` protocol), written by hand: one datagram per
//! state change to the unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the
//! abstract namespace). Without that variable every call is a no-op, so agents started by hand,
//! by tests or by `trellis dev` are unaffected.
//!
//! What the agent reports, for `Type=notify` units:
//! - `READY=1` once the HTTP API is being served and the agent is useful: a server when a Raft
//!   leader is known or it has joined another member of its LAN pool, a client when it has
//!   joined the LAN pool (at once when it has nobody to join). `STATUS=` says which.
//! - `RELOADING=1` (with `MONOTONIC_USEC=`) and `READY=1` again around a reload (SIGHUP).
//! - `STOPPING=1` when shutdown begins.
//!
//! Depends only on the consensus and membership handles it watches; main types: [`Readiness`].

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cluster::RaftNode;
use crate::membership::{Gossip, MemberStatus};

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("{NOTIFY_SOCKET_ENV}={value:?}: {reason}")]
    Address { value: String, reason: String },
    #[error("sending to {NOTIFY_SOCKET_ENV} {value:?}: {error}")]
    Send { value: String, error: std::io::Error },
}

/// The process's connection to its service manager: one per process, since `$NOTIFY_SOCKET`
/// is.
struct Channel {
    socket: UnixDatagram,
    addr: UnixAddr,
    value: String,
}

static CHANNEL: OnceLock<Option<Channel>> = OnceLock::new();
/// Whether READY=1 was sent: a reload only reports ready again if start-up already had.
static READY: AtomicBool = AtomicBool::new(false);

fn channel() -> Option<&'static Channel> {
    CHANNEL
        .get_or_init(|| {
            let value = std::env::var(NOTIFY_SOCKET_ENV).ok().filter(|v| !v.is_empty())?;
            match open(&value) {
                Ok(c) => Some(c),
                Err(e) => {
                    warn!(error = %e, "cannot notify the service manager; readiness will not be reported");
                    None
                }
            }
        })
        .as_ref()
}

fn open(value: &str) -> Result<Channel, NotifyError> {
    let bad = |reason: String| NotifyError::Address { value: value.to_string(), reason };
    let addr = if let Some(name) = value.strip_prefix('@') {
        UnixAddr::from_abstract_name(name.as_bytes()).map_err(|e| bad(e.to_string()))?
    } else if value.starts_with('/') {
        UnixAddr::from_pathname(value).map_err(|e| bad(e.to_string()))?
    } else {
        return Err(bad("only absolute paths and @abstract names are supported (not vsock)".into()));
    };
    let socket = UnixDatagram::unbound().map_err(|e| bad(e.to_string()))?;
    Ok(Channel { socket, addr, value: value.to_string() })
}

/// Send one notification (newline-separated `KEY=VALUE` assignments). A no-op without
/// `$NOTIFY_SOCKET`.
pub fn send(state: &str) -> Result<(), NotifyError> {
    let Some(c) = channel() else { return Ok(()) };
    c.socket.send_to_addr(state.as_bytes(), &c.addr).map_err(|error| NotifyError::Send { value: c.value.clone(), error })?;
    debug!(state, "notified the service manager");
    Ok(())
}

fn send_or_warn(state: &str) {
    if let Err(e) = send(state) {
        warn!(error = %e, "notifying the service manager failed");
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    READY.store(true, Ordering::SeqCst);
    send_or_warn(&format!("READY=1\nSTATUS={status}"));
}

/// A status line shown by `systemctl status`.
pub fn status(status: &str) {
    send_or_warn(&format!("STATUS={status}"));
}

/// `STOPPING=1`: shutdown has begun.
pub fn stopping() {
    send_or_warn("STOPPING=1\nSTATUS=shutting down");
}

/// Wrap a reload so the service manager sees it begin and end: `RELOADING=1` (stamped with
/// CLOCK_MONOTONIC, as `Type=notify-reload` requires) before, `READY=1` after (only if start-up
/// had reported ready; a reload during start-up must not claim readiness early).
pub fn around_reload(reload: Arc<dyn Fn() -> Result<(), String> + Send + Sync>) -> Arc<dyn Fn() -> Result<(), String> + Send + Sync> {
    Arc::new(move || {
        send_or_warn(&format!("RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading configuration", monotonic_usec()));
        let result = reload();
        let outcome = match &result {
            Ok(()) => "configuration reloaded".to_string(),
            Err(e) => format!("reload failed, running configuration kept: {e}"),
        };
        if READY.load(Ordering::SeqCst) {
            send_or_warn(&format!("READY=1\nSTATUS={outcome}"));
        } else {
            status(&outcome);
        }
        result
    })
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// Watches the agent until it is ready, reports it, then waits for shutdown (a task that ends
/// early would stop the agent).
pub struct Readiness {
    /// The server's Raft handle; `None` on a client agent.
    pub raft: Option<RaftNode>,
    pub gossip: Gossip,
    /// Whether there is anybody to join: without `retry_join`, a client is ready once serving.
    pub has_join_targets: bool,
}

impl Readiness {
    /// What the agent is still waiting for, or `Ok(status)` when it is ready.
    fn check(&self) -> Result<String, &'static str> {
        let me = self.gossip.local_name().to_string();
        let others = self.gossip.members().into_iter().filter(|m| m.name != me && m.status == MemberStatus::Alive).count();
        match &self.raft {
            Some(node) => match node.leader() {
                Some((_, leader)) => Ok(format!("serving; Raft leader is {} ({})", leader.name, leader.rpc_addr)),
                None if others > 0 => Ok(format!("serving; joined {others} other member(s), waiting for a Raft leader")),
                None => Err("serving; waiting for a Raft leader or another server to join"),
            },
            None if others > 0 => Ok(format!("serving; joined the LAN pool ({others} other member(s))")),
            None if !self.has_join_targets => Ok("serving; no retry_join configured, waiting to be joined".to_string()),
            None => Err("serving; joining the LAN pool"),
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        if channel().is_none() {
            shutdown.cancelled().await;
            return;
        }
        let mut members = self.gossip.changes();
        let mut raft = self.raft.as_ref().map(|n| n.raft.metrics());
        let mut last_status = String::new();
        loop {
            match self.check() {
                Ok(s) => {
                    info!(status = %s, "ready: notified the service manager");
                    ready(&s);
                    break;
                }
                Err(s) if s != last_status => {
                    status(s);
                    last_status = s.to_string();
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = members.changed() => if r.is_err() { break },
                r = async { match raft.as_mut() { Some(m) => m.changed().await, None => std::future::pending().await } } => if r.is_err() { break },
            }
        }
        shutdown.cancelled().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abstract_and_path_addresses_are_accepted_and_others_rejected() {
        assert!(open("@trellis-test-notify").is_ok());
        assert!(open("/run/systemd/notify").is_ok());
        let e = open("vsock:2:1234").err().expect("vsock is refused");
        assert!(e.to_string().contains("not vsock"), "{e}");
    }

    #[test]
    fn a_datagram_reaches_an_abstract_socket() {
        let name = format!("trellis-notify-test-{}", std::process::id());
        let listener = UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        let c = open(&format!("@{name}")).unwrap();
        c.socket.send_to_addr(b"READY=1", &c.addr).unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn monotonic_clock_is_nonzero() {
        assert!(monotonic_usec() > 0);
    }
}
