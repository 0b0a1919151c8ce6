//! Forwarding questions outside the domain to the configured recursors.
//!
//! One exchange is UDP first and, when the answer comes back truncated, the same question again
//! over TCP, all within the recursor's timeout. Replies are accepted only from the recursor's
//! address, with the query's ID and question (a guard against spoofed or stray datagrams).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// EDNS0 buffer size advertised upstream: the DNS Flag Day 2020 value that avoids IP
/// fragmentation on common paths; bigger answers come back truncated and are re-asked over TCP.
const UPSTREAM_UDP_PAYLOAD: u16 = 1232;
/// Datagrams read from the socket per exchange before giving up on stray ones, so a flood of
/// wrong replies cannot keep an exchange busy for its whole timeout.
const MAX_STRAY_DATAGRAMS: usize = 16;
/// Largest DNS message (TCP length prefix is 16 bits).
const MAX_MESSAGE: usize = u16::MAX as usize;

/// Ask each recursor in turn; the first answer that is NOERROR or NXDOMAIN wins (Consul's rule:
/// other codes from one recursor move on to the next). `None` when none answered usefully.
pub(crate) async fn forward(recursors: &[SocketAddr], timeout: Duration, query: &Query) -> Option<Message> {
    for &upstream in recursors {
        match tokio::time::timeout(timeout, exchange(upstream, query)).await {
            Ok(Ok(msg)) if matches!(msg.metadata.response_code, ResponseCode::NoError | ResponseCode::NXDomain) => return Some(msg),
            Ok(Ok(msg)) => tracing::debug!(%upstream, rcode = %msg.metadata.response_code, "recursor answered with an error"),
            Ok(Err(error)) => tracing::debug!(%upstream, %error, "recursor exchange failed"),
            Err(_) => tracing::debug!(%upstream, "recursor timed out"),
        }
    }
    None
}

async fn exchange(upstream: SocketAddr, query: &Query) -> std::io::Result<Message> {
    let id: u16 = rand::random();
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(query.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(UPSTREAM_UDP_PAYLOAD);
    msg.set_edns(edns);
    let wire = msg.to_vec().map_err(std::io::Error::other)?;

    let reply = exchange_udp(upstream, &wire, id, query).await?;
    if !reply.metadata.truncation {
        return Ok(reply);
    }
    exchange_tcp(upstream, &wire, id, query).await
}

fn matches(reply: &Message, id: u16, query: &Query) -> bool {
    reply.metadata.id == id
        && reply.metadata.message_type == MessageType::Response
        && reply.queries.len() == 1
        && reply.queries[0].query_type() == query.query_type()
        && reply.queries[0].name().eq_ignore_root(query.name())
}

async fn exchange_udp(upstream: SocketAddr, wire: &[u8], id: u16, query: &Query) -> std::io::Result<Message> {
    let local: SocketAddr = if upstream.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(wire).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    for _ in 0..MAX_STRAY_DATAGRAMS {
        let n = socket.recv(&mut buf).await?;
        if let Ok(reply) = Message::from_vec(&buf[..n])
            && matches(&reply, id, query)
        {
            return Ok(reply);
        }
    }
    Err(std::io::Error::other("no matching reply"))
}

async fn exchange_tcp(upstream: SocketAddr, wire: &[u8], id: u16, query: &Query) -> std::io::Result<Message> {
    let mut stream = TcpStream::connect(upstream).await?;
    let len = u16::try_from(wire.len()).map_err(std::io::Error::other)?;
    let mut framed = Vec::with_capacity(wire.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(wire);
    stream.write_all(&framed).await?;
    let len = stream.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    let reply = Message::from_vec(&buf).map_err(std::io::Error::other)?;
    if matches(&reply, id, query) { Ok(reply) } else { Err(std::io::Error::other("mismatched TCP reply")) }
}
