//! The TCP side of a gossip node: memberlist-style push-pull, where two
//! members swap their full member lists over one short-lived connection.
//!
//! Owns: the tasks that run one exchange each (dialling out for a join or
//! the periodic push-pull, answering an accepted connection), reading and
//! writing the length-prefixed frames of `codec` on tokio streams, every
//! timeout of an exchange (connect, each frame read, the whole exchange),
//! and the stats of exchanges and of frames dropped for a bad key or bad
//! framing.
//!
//! Must not depend on: foca or the engine. A task never touches protocol
//! state: the worker snapshots our view before an outbound exchange, and
//! receives peers' views through [`StreamEvent`]s, so the UDP loop never
//! waits on a TCP peer. Each exchange is bounded in bytes and time, so a
//! slow or hostile peer costs at most one task for `PUSH_PULL_TIMEOUT`.
//!
//! Exchange: the dialler sends its state (frames until `End`), the
//! answerer reads it, sends its own state back and closes; both merge what
//! they received.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use crate::membership::Keyring;
use crate::membership::codec::{self, OpenError, PushPullReader, PushPullState, STREAM_FRAME_HEADER_BYTES, StreamEncodeError};
use crate::membership::engine::{Counters, Shared};
use crate::membership::profile::{PUSH_PULL_CONNECT_TIMEOUT, PUSH_PULL_READ_TIMEOUT, PUSH_PULL_TIMEOUT};

/// Why an outbound exchange was started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// Part of the join with this id.
    Join(u64),
    /// The periodic anti-entropy round.
    Periodic,
}

/// What exchange tasks tell the worker.
pub(crate) enum StreamEvent {
    /// A peer dialled us and sent its state: the worker replies with ours
    /// (dropping `reply` declines, e.g. after we left) and merges theirs.
    Inbound { peer: SocketAddr, remote: PushPullState, reply: oneshot::Sender<PushPullState> },
    /// An exchange we started is over.
    Outbound { addr: SocketAddr, purpose: Purpose, result: Result<PushPullState, StreamError> },
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamError {
    /// The TCP connection could not be opened.
    #[error("connecting: {0}")]
    Connect(#[source] io::Error),
    /// A stage took longer than its timeout.
    #[error("{0} timed out")]
    Timeout(&'static str),
    /// The connection failed mid-exchange.
    #[error("stream: {0}")]
    Io(#[source] io::Error),
    /// The peer hung up before sending a complete state.
    #[error("peer closed the connection mid-exchange")]
    Closed,
    /// A frame no installed key authenticates, or the wrong encryption mode.
    #[error("frame not authenticated by any installed key (or wrong encryption mode)")]
    BadKey,
    /// A frame that is oversized, over the state budget, or undecodable.
    #[error("malformed or oversized frame")]
    Malformed,
    /// Our own state could not be encoded.
    #[error(transparent)]
    Encode(#[from] StreamEncodeError),
    /// The worker declined to answer (we left, or it is shutting down).
    #[error("declined by the local worker")]
    Declined,
}

impl From<OpenError> for StreamError {
    fn from(err: OpenError) -> Self {
        match err {
            OpenError::BadKey => Self::BadKey,
            OpenError::Malformed => Self::Malformed,
        }
    }
}

fn io_error(err: io::Error) -> StreamError {
    if err.kind() == io::ErrorKind::UnexpectedEof { StreamError::Closed } else { StreamError::Io(err) }
}

/// Read one complete push-pull state, each read bounded by `read_timeout`.
pub(crate) async fn read_state<R: AsyncRead + Unpin>(
    reader: &mut R,
    keyring: Option<&Keyring>,
    read_timeout: Duration,
) -> Result<PushPullState, StreamError> {
    let mut state = PushPullReader::new();
    let mut frame = Vec::new();
    loop {
        let mut prefix = [0u8; STREAM_FRAME_HEADER_BYTES];
        tokio::time::timeout(read_timeout, reader.read_exact(&mut prefix))
            .await
            .map_err(|_| StreamError::Timeout("reading a frame"))?
            .map_err(io_error)?;
        // Checked against the budgets before anything is allocated.
        let len = state.frame_len(prefix)?;
        frame.resize(len, 0);
        tokio::time::timeout(read_timeout, reader.read_exact(&mut frame))
            .await
            .map_err(|_| StreamError::Timeout("reading a frame"))?
            .map_err(io_error)?;
        if let Some(done) = state.feed(keyring, &frame)? {
            return Ok(done);
        }
    }
}

/// Encode, seal and write one complete push-pull state.
pub(crate) async fn write_state<W: AsyncWrite + Unpin>(writer: &mut W, keyring: Option<&Keyring>, state: &PushPullState) -> Result<(), StreamError> {
    let (frames, truncated) = codec::encode_push_pull(keyring, state)?;
    if truncated {
        tracing::warn!(members = state.members.len(), "push-pull state exceeds the size limit; sent a truncated view");
    }
    for frame in &frames {
        writer.write_all(frame).await.map_err(io_error)?;
    }
    writer.flush().await.map_err(io_error)
}

/// Update the counters for one finished exchange (`Ok` carries how many
/// members the peer sent).
fn record(shared: &Shared, peer: SocketAddr, side: &'static str, result: Result<usize, &StreamError>) {
    let stats = &shared.stats;
    match result {
        Ok(members) => {
            Counters::add(&stats.push_pulls, 1);
            tracing::debug!(%peer, side, members, "push-pull done");
        }
        Err(err) => {
            Counters::add(&stats.push_pull_failures, 1);
            match err {
                StreamError::BadKey => Counters::add(&stats.dropped_bad_key, 1),
                StreamError::Malformed => Counters::add(&stats.dropped_malformed, 1),
                _ => {}
            }
            tracing::debug!(%peer, side, error = %err, "push-pull failed");
        }
    }
}

/// Dial `addr` (from `local_ip` when it is a concrete address of the same
/// family, so the peer sees our gossip address), swap states, and report
/// the outcome to the worker.
pub(crate) async fn initiate(
    shared: Arc<Shared>,
    local_ip: IpAddr,
    addr: SocketAddr,
    local: PushPullState,
    purpose: Purpose,
    events: mpsc::Sender<StreamEvent>,
) {
    let keyring = shared.keyring.clone();
    let exchange = async {
        let mut stream =
            tokio::time::timeout(PUSH_PULL_CONNECT_TIMEOUT, connect(local_ip, addr)).await.map_err(|_| StreamError::Timeout("connecting"))??;
        write_state(&mut stream, keyring.as_ref(), &local).await?;
        // Half-close: nothing more from us (the answerer stops at `End`,
        // this just tells it so at the TCP level too).
        stream.shutdown().await.map_err(io_error)?;
        read_state(&mut stream, keyring.as_ref(), PUSH_PULL_READ_TIMEOUT).await
    };
    let result = tokio::time::timeout(PUSH_PULL_TIMEOUT, exchange).await.unwrap_or(Err(StreamError::Timeout("push-pull")));
    record(&shared, addr, "dial", result.as_ref().map(|s| s.members.len()));
    // The worker may be gone (shutdown); nothing left to tell then.
    let _ = events.send(StreamEvent::Outbound { addr, purpose, result }).await;
}

async fn connect(local_ip: IpAddr, addr: SocketAddr) -> Result<TcpStream, StreamError> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(StreamError::Connect)?;
    if !local_ip.is_unspecified() && local_ip.is_ipv4() == addr.is_ipv4() {
        socket.bind(SocketAddr::new(local_ip, 0)).map_err(StreamError::Connect)?;
    }
    let stream = socket.connect(addr).await.map_err(StreamError::Connect)?;
    // Frames are written whole; no reason to wait for more.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Answer one accepted connection: read the peer's state, hand it to the
/// worker, write ours back. `_permit` holds one of the inbound slots until
/// the exchange is over.
pub(crate) async fn respond(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    events: mpsc::Sender<StreamEvent>,
    _permit: OwnedSemaphorePermit,
) {
    let keyring = shared.keyring.clone();
    let _ = stream.set_nodelay(true);
    let exchange = async {
        let remote = read_state(&mut stream, keyring.as_ref(), PUSH_PULL_READ_TIMEOUT).await?;
        let (reply, answer) = oneshot::channel();
        let members = remote.members.len();
        events.send(StreamEvent::Inbound { peer, remote, reply }).await.map_err(|_| StreamError::Declined)?;
        let local = answer.await.map_err(|_| StreamError::Declined)?;
        write_state(&mut stream, keyring.as_ref(), &local).await?;
        stream.shutdown().await.map_err(io_error)?;
        Ok(members)
    };
    let result = tokio::time::timeout(PUSH_PULL_TIMEOUT, exchange).await.unwrap_or(Err(StreamError::Timeout("push-pull")));
    record(&shared, peer, "answer", result.as_ref().copied());
}
