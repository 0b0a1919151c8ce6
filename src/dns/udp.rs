//! The UDP listener, with a cache of encoded answers.
//!
//! Building an answer means reading the catalog, making records and encoding them (name
//! compression, and re-encoding to fit the client's buffer): tens of microseconds for a service
//! with a hundred instances. Between catalog changes the answer to the same question is the
//! same bytes, so answers are kept encoded, keyed by the request with its ID zeroed and its
//! question name lowercased, and stamped with the catalog generation they were built at
//! ([`DnsCatalog::generation`]). A hit costs a hash lookup and two patches: the request's ID,
//! and the question name as the client spelled it.
//!
//! Answers stay shuffled: each key keeps [`VARIANTS`] answers built independently (each one
//! shuffled), and a hit returns one of them at random. Only authoritative answers from this
//! datacenter's catalog are kept (not recursor answers, errors, other datacenters' names, or
//! prepared queries, whose `Near` may depend on the client's address). TCP goes through
//! hickory's server uncached.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use hickory_proto::op::{Header, Message, MessageType, ResponseCode};
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncoder};
use hickory_server::net::NetError;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::DnsCatalog;
use super::handler::Handler;

/// Differently shuffled answers kept per question.
pub const VARIANTS: usize = 8;
/// Questions kept, and bytes of answers kept; past either the cache starts over (a crude bound
/// that a flood of distinct names cannot grow past).
const MAX_ENTRIES: usize = 4096;
const MAX_BYTES: usize = 32 << 20;
/// Requests answered at once on the slow path; beyond this new misses are dropped, so a flood
/// cannot queue unbounded work (clients retry).
const MAX_IN_FLIGHT: usize = 1024;
const HEADER_LEN: usize = 12;
const AA_BIT: u8 = 0x04;

/// Captures what the handler sends, encoded as hickory's server encodes it for `protocol`.
#[derive(Clone)]
pub(crate) struct Capture {
    protocol: Protocol,
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Capture {
    pub(crate) fn new(protocol: Protocol) -> Capture {
        Capture { protocol, sent: Arc::default() }
    }

    pub(crate) fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.sent.lock())
    }
}

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let max = match self.protocol {
            Protocol::Udp => response.edns().map_or(512, |e| e.max_payload()),
            _ => u16::MAX,
        };
        let mut buf = Vec::new();
        let mut encoder = BinEncoder::new(&mut buf);
        encoder.set_max_size(max);
        let info = response.destructive_emit(&mut encoder)?;
        self.sent.lock().push(buf);
        Ok(info)
    }
}

/// Answer one request as hickory's server would: nothing for a packet without a header or for
/// a response, FORMERR for a body that does not decode, else the handler's answer.
pub(crate) async fn respond(handler: &Handler, bytes: Vec<u8>, src: SocketAddr, protocol: Protocol) -> Option<Vec<u8>> {
    let header = Header::read(&mut BinDecoder::new(&bytes)).ok()?;
    if header.metadata.message_type == MessageType::Response {
        return None;
    }
    let capture = Capture::new(protocol);
    match Request::from_bytes(bytes, src, protocol) {
        Ok(request) => {
            handler.handle_request::<_, TokioTime>(&request, capture.clone()).await;
        }
        Err(error) => {
            debug!(%src, %error, "undecodable DNS request");
            let mut m = Message::new(header.metadata.id, MessageType::Response, header.metadata.op_code);
            m.metadata.recursion_desired = header.metadata.recursion_desired;
            m.metadata.response_code = ResponseCode::FormErr;
            return m.to_vec().ok();
        }
    }
    capture.take().into_iter().next()
}

/// Where the question name ends in `pkt`, if the request is one a cached answer can serve:
/// a standard query with exactly one question, written without compression.
fn question_end(pkt: &[u8]) -> Option<usize> {
    if pkt.len() < HEADER_LEN || pkt[2] & 0x80 != 0 || (pkt[2] >> 3) & 0x0f != 0 || pkt[4..6] != [0, 1] {
        return None;
    }
    let mut at = HEADER_LEN;
    loop {
        let len = *pkt.get(at)? as usize;
        if len & 0xc0 != 0 {
            return None;
        }
        at += 1;
        if len == 0 {
            break;
        }
        at += len;
    }
    (at + 4 <= pkt.len()).then_some(at)
}

/// The cache key of a request: its bytes with the ID zeroed and the question name lowercased.
/// `None` when the request is not cacheable (see [`question_end`]).
fn cache_key(pkt: &[u8]) -> Option<(Vec<u8>, usize)> {
    let qend = question_end(pkt)?;
    let mut key = pkt.to_vec();
    key[0] = 0;
    key[1] = 0;
    key[HEADER_LEN..qend].make_ascii_lowercase();
    Some((key, qend))
}

/// Whether the question of `pkt` is one whose answer may be cached (the handler decides).
fn cacheable(handler: &Handler, pkt: &[u8]) -> bool {
    let Ok(m) = Message::from_vec(pkt) else { return false };
    m.queries.first().is_some_and(|q| handler.cacheable(q.name(), q.query_type()))
}

struct Entry {
    generation: u64,
    variants: Vec<Variant>,
}

/// An encoded answer and where the question name appears in it in full (the question, and
/// usually the first answer's owner, which later records point to): a hit writes the asker's
/// spelling at each place.
#[derive(Clone)]
struct Variant {
    bytes: Arc<Vec<u8>>,
    name_at: Arc<Vec<usize>>,
}

#[derive(Default)]
pub(crate) struct AnswerCache {
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    map: HashMap<Vec<u8>, Entry>,
    /// Bytes of answers held (variants of stale generations included until replaced).
    bytes: usize,
}

impl AnswerCache {
    /// A cached answer for `pkt` built at `generation`, patched with the request's ID and
    /// question spelling; `None` until all variants of the question exist.
    pub(crate) fn answer(&self, pkt: &[u8], generation: u64) -> Option<Vec<u8>> {
        let (key, qend) = cache_key(pkt)?;
        let chosen = {
            let entries = self.entries.lock();
            let e = entries.map.get(&key).filter(|e| e.generation == generation && e.variants.len() >= VARIANTS)?;
            use rand::RngExt;
            e.variants[rand::rng().random_range(0..e.variants.len())].clone()
        };
        let mut out = chosen.bytes.as_ref().clone();
        out[0..2].copy_from_slice(&pkt[0..2]);
        let name = &pkt[HEADER_LEN..qend];
        for &at in chosen.name_at.iter() {
            out[at..at + name.len()].copy_from_slice(name);
        }
        Some(out)
    }

    /// Keep `answer` to `pkt`, built from the catalog at `generation`, if it can be reused.
    pub(crate) fn store(&self, pkt: &[u8], generation: u64, answer: &[u8]) {
        let Some((key, qend)) = cache_key(pkt) else { return };
        let reusable = answer.len() >= qend + 4
            && answer[2] & AA_BIT != 0
            && matches!(answer[3] & 0x0f, 0 | 3)
            && answer[4..6] == [0, 1]
            && answer[HEADER_LEN..qend + 4].eq_ignore_ascii_case(&pkt[HEADER_LEN..qend + 4]);
        if !reusable {
            return;
        }
        let mut guard = self.entries.lock();
        let entries = &mut *guard;
        if (entries.map.len() >= MAX_ENTRIES && !entries.map.contains_key(&key)) || entries.bytes + answer.len() > MAX_BYTES {
            entries.map.clear();
            entries.bytes = 0;
        }
        let e = entries.map.entry(key).or_insert_with(|| Entry { generation, variants: Vec::new() });
        if e.generation != generation {
            if e.generation > generation {
                return;
            }
            entries.bytes -= e.variants.iter().map(|v| v.bytes.len()).sum::<usize>();
            *e = Entry { generation, variants: Vec::new() };
        }
        if e.variants.len() < VARIANTS {
            let name = &pkt[HEADER_LEN..qend];
            let name_at = (HEADER_LEN..=answer.len() - name.len()).filter(|&at| answer[at..at + name.len()].eq_ignore_ascii_case(name)).collect();
            e.variants.push(Variant { bytes: Arc::new(answer.to_vec()), name_at: Arc::new(name_at) });
            entries.bytes += answer.len();
        }
    }
}

/// Serve DNS over UDP on `socket` until `shutdown`.
pub(crate) async fn serve(socket: UdpSocket, handler: Handler, catalog: Arc<dyn DnsCatalog>, shutdown: CancellationToken) {
    let socket = Arc::new(socket);
    let cache = Arc::new(AnswerCache::default());
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut buf = vec![0u8; u16::MAX as usize];
    loop {
        let (n, src) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                // ICMP errors from earlier sends surface here on Linux; the socket is fine.
                Err(e) => { debug!(error = %e, "dns udp receive"); continue; }
            },
        };
        let pkt = &buf[..n];
        let generation = catalog.generation();
        if let Some(g) = generation
            && let Some(answer) = cache.answer(pkt, g)
        {
            let _ = socket.send_to(&answer, src).await;
            continue;
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            continue;
        };
        let (pkt, socket, handler, cache) = (pkt.to_vec(), socket.clone(), handler.clone(), cache.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Some(answer) = respond(&handler, pkt.clone(), src, Protocol::Udp).await else { return };
            if let Some(g) = generation
                && cacheable(&handler, &pkt)
            {
                cache.store(&pkt, g, &answer);
            }
            let _ = socket.send_to(&answer, src).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::{OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};

    use super::*;

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    fn answer_to(req: &[u8], aa: bool) -> Vec<u8> {
        let mut m = Message::from_vec(req).unwrap();
        m.metadata.message_type = MessageType::Response;
        m.metadata.authoritative = aa;
        m.to_vec().unwrap()
    }

    #[test]
    fn hits_carry_the_askers_id_and_spelling_and_wait_for_every_variant() {
        let cache = AnswerCache::default();
        let first = query(7, "web.service.consul.");
        for _ in 0..VARIANTS {
            assert!(cache.answer(&first, 5).is_none(), "not served before every variant exists");
            cache.store(&first, 5, &answer_to(&first, true));
        }
        let other = query(42, "WEB.Service.consul.");
        let hit = Message::from_vec(&cache.answer(&other, 5).unwrap()).unwrap();
        assert_eq!(hit.metadata.id, 42);
        assert_eq!(hit.queries[0].name().to_ascii(), "WEB.Service.consul.");
        assert!(cache.answer(&other, 6).is_none(), "a newer catalog generation misses");
    }

    #[test]
    fn only_authoritative_catalog_answers_are_kept() {
        let cache = AnswerCache::default();
        let q = query(1, "example.org.");
        for _ in 0..VARIANTS {
            cache.store(&q, 1, &answer_to(&q, false));
        }
        assert!(cache.answer(&q, 1).is_none());
        assert!(question_end(&[0; 11]).is_none());
    }
}
