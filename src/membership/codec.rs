//! Wire formats of the membership layer: the foca identity, the datagram
//! envelope (plaintext or encrypted) and the custom-broadcast items.
//!
//! Owns: `NodeId` (what foca gossips about a member: name, address, start
//! time/generation and tags), how identities with the same address conflict
//! ("the newer wins"), the one-byte envelope that tells plaintext from
//! encrypted datagrams, and the postcard encoding of user events and leave
//! intents, with the size limits that keep everything inside one datagram.
//!
//! Must not depend on: sockets, tokio, or the worker. Every decoder here
//! returns an error on malformed input; nothing may panic on network bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use foca::{Codec as _, Header, PostcardCodec};
use serde::{Deserialize, Serialize};

use crate::membership::UserEvent;
use crate::membership::keyring::{Keyring, KeyringError};
use crate::membership::profile::FOCA_MAX_PACKET_BYTES;

/// First byte of a plaintext datagram (encrypted ones start with
/// `keyring::ENCRYPTED_VERSION`).
pub const PLAINTEXT_VERSION: u8 = 0;

/// Largest encoded identity. A foca header can carry three identities
/// (src, dst and a PingReq target): 3 x 400 plus header overhead stays
/// below the 1371-byte foca packet budget, so probes always encode.
pub const MAX_IDENTITY_BYTES: usize = 400;

/// Largest encoded user event, Serf's UserEventSizeLimit: with two
/// worst-case identities in a Gossip header it still fits one packet.
pub const MAX_EVENT_BYTES: usize = 512;

/// The foca identity of a member. Equality covers every field, so a tag
/// change is a new identity (foca disseminates it as a rename).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeId {
    /// Node name (Consul's node name; unique by convention).
    pub name: String,
    /// Gossip address others use to reach the member (foca's unique key).
    pub addr: SocketAddr,
    /// Wall-clock start time in ms; a restarted process has a larger one.
    pub started_ms: u64,
    /// Bumped by `renew` (auto-rejoin after being declared down) and by a
    /// runtime tag update.
    pub generation: u32,
    /// Member metadata (role, dc, RPC port, node id, build...).
    pub tags: BTreeMap<String, String>,
}

impl fmt::Debug for NodeId {
    // Compact form: tracing prints identities a lot.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}#{}.{}", self.name, self.addr, self.started_ms, self.generation)
    }
}

/// Names one identity without its tags (what leave intents carry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeKey {
    /// Gossip address.
    pub addr: SocketAddr,
    /// Start time in ms.
    pub started_ms: u64,
    /// Generation.
    pub generation: u32,
}

impl NodeId {
    /// A fresh identity for a process starting now.
    pub fn new(name: String, addr: SocketAddr, tags: BTreeMap<String, String>) -> Self {
        Self { name, addr, started_ms: unique_start_ms(), generation: 0, tags }
    }

    /// What we address an `Announce` to when we only know a socket
    /// address: foca accepts announces whose destination *address* matches.
    pub fn placeholder(addr: SocketAddr) -> Self {
        Self { name: String::new(), addr, started_ms: 0, generation: 0, tags: BTreeMap::new() }
    }

    /// The tag-less key of this identity.
    pub fn key(&self) -> NodeKey {
        NodeKey { addr: self.addr, started_ms: self.started_ms, generation: self.generation }
    }

    /// Total order deciding which of two identities is newer. Start time
    /// first (a restart wins), then generation, then name and tags only to
    /// make the order total so two nodes never flip-flop.
    pub fn is_newer_than(&self, other: &Self) -> bool {
        (self.started_ms, self.generation, &self.name, &self.tags) > (other.started_ms, other.generation, &other.name, &other.tags)
    }

    /// Worst-case encoded size (as if start time and generation were at
    /// their maximum varint width), checked against `MAX_IDENTITY_BYTES`.
    pub fn worst_case_encoded_len(&self) -> usize {
        let worst = Self { started_ms: u64::MAX, generation: u32::MAX, ..self.clone() };
        postcard::to_stdvec(&worst).map_or(usize::MAX, |v| v.len())
    }
}

impl foca::Identity for NodeId {
    type Addr = SocketAddr;

    // Auto-rejoin: a member wrongly declared down comes back as the next
    // generation, which wins the address conflict against the old one.
    fn renew(&self) -> Option<Self> {
        Some(Self { generation: self.generation.checked_add(1)?, ..self.clone() })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.is_newer_than(adversary)
    }
}

/// Start times must differ between two starts inside one process (tests
/// restart a node within the same millisecond), so they are made strictly
/// increasing on top of the wall clock.
fn unique_start_ms() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let wall = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = wall.max(prev.saturating_add(1));
        match LAST.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(actual) => prev = actual,
        }
    }
}

/// Why an incoming datagram was dropped before reaching foca.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// Wrong key, unencrypted packet on an encrypted cluster or the other
    /// way round (Consul counts all of these as key problems).
    BadKey,
    /// Empty, oversized, or unknown version byte.
    Malformed,
}

/// Wrap a foca packet for the wire: encrypt with the primary key, or
/// prefix the plaintext marker.
pub fn seal(keyring: Option<&Keyring>, payload: &[u8]) -> Result<Vec<u8>, KeyringError> {
    match keyring {
        Some(ring) => ring.encrypt(payload),
        None => {
            let mut out = Vec::with_capacity(1 + payload.len());
            out.push(PLAINTEXT_VERSION);
            out.extend_from_slice(payload);
            Ok(out)
        }
    }
}

/// Unwrap a datagram into a foca packet, enforcing the cluster's
/// encryption mode.
pub fn open(keyring: Option<&Keyring>, datagram: &[u8]) -> Result<Vec<u8>, OpenError> {
    let Some(&version) = datagram.first() else {
        return Err(OpenError::Malformed);
    };
    if datagram.len() > crate::membership::profile::MAX_DATAGRAM_BYTES {
        return Err(OpenError::Malformed);
    }
    match (keyring, version) {
        (Some(ring), crate::membership::keyring::ENCRYPTED_VERSION) => ring.decrypt(datagram).map_err(|_| OpenError::BadKey),
        (None, PLAINTEXT_VERSION) => Ok(datagram[1..].to_vec()),
        (Some(_), PLAINTEXT_VERSION) | (None, crate::membership::keyring::ENCRYPTED_VERSION) => Err(OpenError::BadKey),
        _ => Err(OpenError::Malformed),
    }
}

/// Decode just the foca header of a packet (to learn who sent it).
pub fn peek_header(packet: &[u8]) -> Option<Header<NodeId>> {
    if packet.len() > FOCA_MAX_PACKET_BYTES {
        return None;
    }
    let mut buf = packet;
    PostcardCodec.decode_header(&mut buf).ok()
}

/// A graceful leave (or a force-leave) of one identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaveIntent {
    /// Who left.
    pub node: NodeKey,
    /// Its name (for logs).
    pub name: String,
    /// `true` for an operator's force-leave of a failed member: receivers
    /// only relabel it, they do not declare it down themselves.
    pub forced: bool,
}

/// Everything we disseminate through foca's custom broadcasts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum BroadcastItem {
    /// A user event (`consul event`).
    Event(UserEvent),
    /// A member leaving gracefully, or being force-left.
    Leave(LeaveIntent),
}

impl BroadcastItem {
    /// postcard bytes of the item.
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_stdvec(self)
    }

    /// Strict decode: trailing bytes are an error, not ignored.
    pub fn decode(data: &[u8]) -> Result<Self, postcard::Error> {
        let (item, rest) = postcard::take_from_bytes::<Self>(data)?;
        if rest.is_empty() { Ok(item) } else { Err(postcard::Error::DeserializeUnexpectedEnd) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Identity as _;

    fn id(name: &str, port: u16) -> NodeId {
        NodeId::new(name.to_owned(), SocketAddr::from(([127, 0, 0, 1], port)), BTreeMap::from([("role".to_owned(), "node".to_owned())]))
    }

    #[test]
    fn a_restarted_or_renewed_identity_wins_the_address_conflict() {
        let old = id("a", 1);
        let restarted = id("a", 1);
        assert!(restarted.started_ms > old.started_ms);
        assert!(restarted.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&restarted));
        let renewed = old.renew().unwrap();
        assert!(renewed.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&renewed));
        // Total order: equal start/generation still has exactly one winner.
        let mut twin = old.clone();
        twin.name = "b".into();
        assert_ne!(twin.win_addr_conflict(&old), old.win_addr_conflict(&twin));
    }

    #[test]
    fn envelope_enforces_the_cluster_encryption_mode() {
        let ring = Keyring::new(&crate::membership::keygen()).unwrap();
        let plain = seal(None, b"abc").unwrap();
        let sealed = seal(Some(&ring), b"abc").unwrap();
        assert_eq!(open(None, &plain).unwrap(), b"abc");
        assert_eq!(open(Some(&ring), &sealed).unwrap(), b"abc");
        assert_eq!(open(Some(&ring), &plain), Err(OpenError::BadKey));
        assert_eq!(open(None, &sealed), Err(OpenError::BadKey));
        assert_eq!(open(None, &[]), Err(OpenError::Malformed));
        assert_eq!(open(None, &[9, 1, 2]), Err(OpenError::Malformed));
    }

    #[test]
    fn broadcast_items_round_trip_and_reject_trailing_bytes() {
        let item = BroadcastItem::Leave(LeaveIntent { node: id("a", 1).key(), name: "a".into(), forced: false });
        let mut bytes = item.encode().unwrap();
        assert_eq!(BroadcastItem::decode(&bytes).unwrap(), item);
        bytes.push(0);
        assert!(BroadcastItem::decode(&bytes).is_err());
    }
}
