//! Wire formats of the membership layer: the foca identity, the datagram
//! envelope (plaintext or encrypted), the custom-broadcast items and the
//! framing of the TCP push-pull state exchange.
//!
//! Owns: `NodeId` (what foca gossips about a member: name, address, start
//! time/generation and tags), how identities with the same address conflict
//! ("the newer wins"), the one-byte envelope that tells plaintext from
//! encrypted datagrams, the postcard encoding of user events and leave
//! intents, with the size limits that keep everything inside one datagram,
//! and the push-pull stream: length-prefixed frames, each sealed in the same
//! envelope as a datagram, carrying a full member list in bounded chunks.
//!
//! Must not depend on: sockets, tokio, or the worker. Every decoder here
//! returns an error on malformed input; nothing may panic on network bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use foca::{Codec as _, Header, Member as FocaMember, PostcardCodec};
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
    open_bounded(keyring, datagram, crate::membership::profile::MAX_DATAGRAM_BYTES)
}

/// `open` for anything up to `limit` bytes (stream frames are larger than
/// datagrams).
fn open_bounded(keyring: Option<&Keyring>, datagram: &[u8], limit: usize) -> Result<Vec<u8>, OpenError> {
    let Some(&version) = datagram.first() else {
        return Err(OpenError::Malformed);
    };
    if datagram.len() > limit {
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

/// Bytes of a stream frame's length prefix (big-endian u32).
pub const STREAM_FRAME_HEADER_BYTES: usize = 4;

/// Largest sealed stream frame. Each frame is authenticated on its own, so
/// a peer without the key is dropped after at most this much input, and a
/// reader never buffers more than one frame of unauthenticated bytes.
pub const MAX_STREAM_FRAME_BYTES: usize = 64 * 1024;

/// Largest push-pull state (sum of its frames), memberlist's
/// maxPushStateBytes: tens of thousands of members, and a bound on what
/// one exchange can make us buffer.
pub const MAX_PUSH_PULL_BYTES: usize = 20 * 1024 * 1024;

/// Most frames in one push-pull state: bounds per-frame work (syscalls,
/// decryptions) independently of frame sizes; far above what a legitimate
/// sender needs before it reaches `MAX_PUSH_PULL_BYTES`.
pub const MAX_PUSH_PULL_FRAMES: usize = 4096;

/// Members per push-pull frame: 128 worst-case members (a
/// `MAX_IDENTITY_BYTES` identity plus incarnation and state) take ~52 KB.
pub const PUSH_PULL_MEMBERS_PER_FRAME: usize = 128;

/// Left-notices per push-pull frame: 256 worst-case keys (IPv6) take ~9 KB,
/// so a frame with both full chunks still fits `MAX_STREAM_FRAME_BYTES`.
pub const PUSH_PULL_LEFT_PER_FRAME: usize = 256;

/// One side's full view, exchanged by push-pull: every member foca knows
/// (including the sender itself) with its state and incarnation, and which
/// of them left gracefully (or were force-left).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PushPullState {
    /// Members with state and incarnation, most useful first (the sender,
    /// then alive, suspect, down), so a truncated state keeps what matters.
    pub members: Vec<FocaMember<NodeId>>,
    /// Identities that left (what turns "down" into `Left`).
    pub left: Vec<NodeKey>,
}

/// What one stream frame carries once opened.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum StreamFrame {
    /// A chunk of a push-pull state.
    PushPull { members: Vec<FocaMember<NodeId>>, left: Vec<NodeKey> },
    /// The push-pull state is complete.
    End,
}

impl StreamFrame {
    fn decode(data: &[u8]) -> Result<Self, postcard::Error> {
        let (frame, rest) = postcard::take_from_bytes::<Self>(data)?;
        if rest.is_empty() { Ok(frame) } else { Err(postcard::Error::DeserializeUnexpectedEnd) }
    }
}

/// Why a push-pull state could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum StreamEncodeError {
    /// postcard failed (cannot happen for our own types, but not a panic).
    #[error("encoding push-pull frame: {0}")]
    Encode(#[from] postcard::Error),
    /// Sealing with the primary key failed.
    #[error(transparent)]
    Seal(#[from] KeyringError),
}

/// Encode `state` as wire frames (length prefix included), each sealed
/// with `keyring`'s primary key (or marked plaintext). Members or notices
/// that would push the state past `MAX_PUSH_PULL_BYTES` or
/// `MAX_PUSH_PULL_FRAMES` are left out (the most useful come first); the
/// second value says whether that happened.
pub fn encode_push_pull(keyring: Option<&Keyring>, state: &PushPullState) -> Result<(Vec<Vec<u8>>, bool), StreamEncodeError> {
    let mut frames = Vec::new();
    let mut total = 0usize;
    let mut members = state.members.chunks(PUSH_PULL_MEMBERS_PER_FRAME);
    let mut left = state.left.chunks(PUSH_PULL_LEFT_PER_FRAME);
    let end = seal_frame(keyring, &StreamFrame::End)?;
    let mut truncated = false;
    loop {
        let (m, l) = (members.next().unwrap_or_default(), left.next().unwrap_or_default());
        if m.is_empty() && l.is_empty() {
            break;
        }
        let frame = seal_frame(keyring, &StreamFrame::PushPull { members: m.to_vec(), left: l.to_vec() })?;
        // Our own identities are bounded, so a chunk always fits a frame;
        // checked anyway so a bug cannot produce frames peers refuse.
        let fits = frame.len() <= STREAM_FRAME_HEADER_BYTES + MAX_STREAM_FRAME_BYTES
            && total + frame.len() + end.len() <= MAX_PUSH_PULL_BYTES
            && frames.len() + 1 < MAX_PUSH_PULL_FRAMES;
        if !fits {
            truncated = true;
            break;
        }
        total += frame.len();
        frames.push(frame);
    }
    frames.push(end);
    Ok((frames, truncated))
}

fn seal_frame(keyring: Option<&Keyring>, frame: &StreamFrame) -> Result<Vec<u8>, StreamEncodeError> {
    let payload = postcard::to_stdvec(frame)?;
    let sealed = seal(keyring, &payload)?;
    let len = u32::try_from(sealed.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(STREAM_FRAME_HEADER_BYTES + sealed.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Incremental, sans-IO reader of one push-pull state: the caller reads a
/// length prefix, asks [`PushPullReader::frame_len`] whether to accept it,
/// reads that many bytes and hands them to [`PushPullReader::feed`], until
/// `feed` returns the complete state. Every limit is enforced before the
/// bytes are read, and no input can make it panic.
#[derive(Debug, Default)]
pub struct PushPullReader {
    state: PushPullState,
    bytes: usize,
    frames: usize,
}

impl PushPullReader {
    /// A reader at the start of a state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Check a frame's length prefix against the per-frame and per-state
    /// budgets; returns how many bytes to read next.
    pub fn frame_len(&mut self, prefix: [u8; STREAM_FRAME_HEADER_BYTES]) -> Result<usize, OpenError> {
        let len = usize::try_from(u32::from_be_bytes(prefix)).map_err(|_| OpenError::Malformed)?;
        if len == 0 || len > MAX_STREAM_FRAME_BYTES {
            return Err(OpenError::Malformed);
        }
        self.bytes = self.bytes.saturating_add(STREAM_FRAME_HEADER_BYTES + len);
        self.frames += 1;
        if self.bytes > MAX_PUSH_PULL_BYTES || self.frames > MAX_PUSH_PULL_FRAMES {
            return Err(OpenError::Malformed);
        }
        Ok(len)
    }

    /// Open and decode one frame; `Some` once the state is complete.
    pub fn feed(&mut self, keyring: Option<&Keyring>, sealed: &[u8]) -> Result<Option<PushPullState>, OpenError> {
        let payload = open_bounded(keyring, sealed, MAX_STREAM_FRAME_BYTES)?;
        match StreamFrame::decode(&payload).map_err(|_| OpenError::Malformed)? {
            StreamFrame::PushPull { members, left } => {
                if members.len() > PUSH_PULL_MEMBERS_PER_FRAME || left.len() > PUSH_PULL_LEFT_PER_FRAME || (members.is_empty() && left.is_empty()) {
                    return Err(OpenError::Malformed);
                }
                self.state.members.extend(members);
                self.state.left.extend(left);
                Ok(None)
            }
            StreamFrame::End => Ok(Some(std::mem::take(&mut self.state))),
        }
    }
}

/// Parse a complete push-pull byte stream (what the socket would deliver)
/// with [`PushPullReader`]; used by tests and fuzzing, the worker reads
/// frame by frame from the socket instead.
pub fn decode_push_pull(keyring: Option<&Keyring>, mut bytes: &[u8]) -> Result<PushPullState, OpenError> {
    let mut reader = PushPullReader::new();
    loop {
        let Some((prefix, rest)) = bytes.split_first_chunk::<STREAM_FRAME_HEADER_BYTES>() else {
            return Err(OpenError::Malformed);
        };
        let len = reader.frame_len(*prefix)?;
        let (frame, rest) = rest.split_at_checked(len).ok_or(OpenError::Malformed)?;
        if let Some(state) = reader.feed(keyring, frame)? {
            return if rest.is_empty() { Ok(state) } else { Err(OpenError::Malformed) };
        }
        bytes = rest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::{Identity as _, State};

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

    fn members(n: usize) -> Vec<FocaMember<NodeId>> {
        (0..n)
            .map(|i| FocaMember::new(id(&format!("n{i}"), 1000 + i as u16), i as u16, if i % 3 == 0 { State::Down } else { State::Alive }))
            .collect()
    }

    #[test]
    fn a_push_pull_state_round_trips_through_frames_with_or_without_a_key() {
        let state = PushPullState { members: members(300), left: members(600).iter().map(|m| m.id().key()).collect() };
        let (frames, truncated) = encode_push_pull(None, &state).unwrap();
        assert!(!truncated);
        // 300 members in chunks of 128, 600 notices in chunks of 256, then End.
        assert_eq!(frames.len(), 4);
        assert_eq!(decode_push_pull(None, &frames.concat()).unwrap(), state);

        let ring = Keyring::new(&crate::membership::keygen()).unwrap();
        let (sealed, _) = encode_push_pull(Some(&ring), &state).unwrap();
        let sealed = sealed.concat();
        assert_eq!(decode_push_pull(Some(&ring), &sealed).unwrap(), state);
        // A ring holding the key as a secondary one still opens it.
        let rotated = Keyring::from_keys(&crate::membership::keygen(), [ring.primary().as_str()]).unwrap();
        assert_eq!(decode_push_pull(Some(&rotated), &sealed).unwrap(), state);
        let other = Keyring::new(&crate::membership::keygen()).unwrap();
        assert_eq!(decode_push_pull(Some(&other), &sealed), Err(OpenError::BadKey));
        assert_eq!(decode_push_pull(None, &sealed), Err(OpenError::BadKey));
        assert_eq!(decode_push_pull(Some(&ring), &frames.concat()), Err(OpenError::BadKey));

        let empty = encode_push_pull(None, &PushPullState::default()).unwrap().0.concat();
        assert_eq!(decode_push_pull(None, &empty).unwrap(), PushPullState::default());
    }

    #[test]
    fn worst_case_push_pull_frames_fit_the_frame_limit() {
        let v6 = SocketAddr::from(([0xffff; 8], u16::MAX));
        let mut tags = BTreeMap::new();
        tags.insert("blob".to_owned(), String::new());
        let mut widest = NodeId { name: "n".repeat(40), addr: v6, started_ms: u64::MAX, generation: u32::MAX, tags };
        while widest.worst_case_encoded_len() < MAX_IDENTITY_BYTES {
            widest.tags.get_mut("blob").unwrap().push('x');
        }
        assert_eq!(widest.worst_case_encoded_len(), MAX_IDENTITY_BYTES);
        let state = PushPullState {
            members: vec![FocaMember::new(widest.clone(), foca::Incarnation::MAX, State::Suspect); PUSH_PULL_MEMBERS_PER_FRAME],
            left: vec![widest.key(); PUSH_PULL_LEFT_PER_FRAME],
        };
        let ring = Keyring::new(&crate::membership::keygen()).unwrap();
        let (frames, truncated) = encode_push_pull(Some(&ring), &state).unwrap();
        assert!(!truncated);
        assert_eq!(frames.len(), 2);
        assert!(frames[0].len() <= STREAM_FRAME_HEADER_BYTES + MAX_STREAM_FRAME_BYTES, "{}", frames[0].len());
        assert_eq!(decode_push_pull(Some(&ring), &frames.concat()).unwrap(), state);

        // A state over the byte budget is cut, most useful members first,
        // into a stream the reader still accepts.
        let huge = MAX_PUSH_PULL_BYTES / MAX_IDENTITY_BYTES + PUSH_PULL_MEMBERS_PER_FRAME;
        let mut members = vec![FocaMember::new(widest.clone(), 0, State::Alive); huge];
        members[0] = FocaMember::new(NodeId { name: "first".into(), ..widest }, 0, State::Alive);
        let (frames, truncated) = encode_push_pull(None, &PushPullState { members, left: Vec::new() }).unwrap();
        assert!(truncated);
        let got = decode_push_pull(None, &frames.concat()).unwrap();
        assert!(got.members.len() < huge && got.members.len() > huge / 2, "{}", got.members.len());
        assert_eq!(got.members[0].id().name, "first");
    }

    #[test]
    fn the_push_pull_reader_refuses_oversized_excess_or_trailing_frames() {
        let mut reader = PushPullReader::new();
        for bad in [0u32, MAX_STREAM_FRAME_BYTES as u32 + 1, u32::MAX] {
            assert_eq!(reader.frame_len(bad.to_be_bytes()), Err(OpenError::Malformed), "{bad}");
        }
        // The state budget: frames of the maximum size run out of bytes...
        let mut reader = PushPullReader::new();
        let big = (MAX_STREAM_FRAME_BYTES as u32).to_be_bytes();
        let fitting = MAX_PUSH_PULL_BYTES / (STREAM_FRAME_HEADER_BYTES + MAX_STREAM_FRAME_BYTES);
        for _ in 0..fitting {
            reader.frame_len(big).unwrap();
        }
        assert_eq!(reader.frame_len(big), Err(OpenError::Malformed));
        // ...and tiny frames run out of frames.
        let mut reader = PushPullReader::new();
        for _ in 0..MAX_PUSH_PULL_FRAMES {
            reader.frame_len(1u32.to_be_bytes()).unwrap();
        }
        assert_eq!(reader.frame_len(1u32.to_be_bytes()), Err(OpenError::Malformed));

        let mut stream = encode_push_pull(None, &PushPullState { members: members(3), left: Vec::new() }).unwrap().0.concat();
        stream.push(0);
        assert_eq!(decode_push_pull(None, &stream), Err(OpenError::Malformed));
        stream.truncate(stream.len() - 2);
        assert_eq!(decode_push_pull(None, &stream), Err(OpenError::Malformed));

        // Chunks over the per-frame counts, or empty, are refused.
        for frame in [
            StreamFrame::PushPull { members: members(PUSH_PULL_MEMBERS_PER_FRAME + 1), left: Vec::new() },
            StreamFrame::PushPull { members: Vec::new(), left: Vec::new() },
        ] {
            let sealed = seal_frame(None, &frame).unwrap();
            let mut reader = PushPullReader::new();
            let len = reader.frame_len(sealed[..4].try_into().unwrap()).unwrap();
            assert_eq!(reader.feed(None, &sealed[4..4 + len]), Err(OpenError::Malformed));
        }
    }
}
