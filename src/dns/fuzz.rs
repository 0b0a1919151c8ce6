//! Property-based fuzzing of the request path: arbitrary bytes and mutated valid queries go
//! through the same steps as hickory's server (header, then message decoding, then our
//! handler), in process so thousands of cases run in seconds. The property: nothing panics,
//! and every packet is either dropped (no header, or a response) or answered with exactly one
//! well-formed response carrying the query's ID and fitting the transport's limit.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use proptest::prelude::*;

use super::handler::Handler;
use super::tests::catalog;
use super::{DnsConfig, Health};

fn src() -> SocketAddr {
    "127.0.0.1:5353".parse().unwrap()
}

/// One runtime for all cases: building one per case would dominate the run time.
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap());

static HANDLER: LazyLock<Handler> = LazyLock::new(|| {
    let mut c = catalog();
    for i in 0..300 {
        let ip = format!("10.9.{}.{}", i / 256, i % 256);
        c.services.push(("many".into(), vec!["t".into()], super::tests::inst(&format!("m{i}"), &ip, "", 1, Health::Passing, "dc1")));
    }
    // A loop of hostnames inside the domain: resolution must stop at the depth limit.
    c.services.push(("loop".into(), vec![], super::tests::inst("n1", "10.0.0.1", "loop.service.consul", 1, Health::Passing, "dc1")));
    let cfg = DnsConfig { alt_domain: Some("alt.test".into()), udp_answer_limit: 0, ..DnsConfig::default() };
    Handler::new(cfg, Arc::new(c), "agent-node".into())
});

#[derive(Debug, PartialEq)]
enum Outcome {
    Dropped,
    /// FORMERR when the body does not decode.
    FormErr,
    Answered(Message),
}

async fn drive(bytes: &[u8], protocol: Protocol) -> Outcome {
    let mut decoder = BinDecoder::new(bytes);
    let Ok(header) = Header::read(&mut decoder) else {
        assert!(super::udp::respond(&HANDLER, bytes.to_vec(), src(), protocol).await.is_none());
        return Outcome::Dropped;
    };
    let decodes = Request::from_bytes(bytes.to_vec(), src(), protocol).ok();
    let Some(answer) = super::udp::respond(&HANDLER, bytes.to_vec(), src(), protocol).await else {
        assert_eq!(header.metadata.message_type, MessageType::Response, "only responses are dropped");
        return Outcome::Dropped;
    };
    let Some(request) = decodes else {
        let reply = Message::from_vec(&answer).expect("the FORMERR decodes");
        assert_eq!(reply.metadata.response_code, hickory_proto::op::ResponseCode::FormErr);
        assert_eq!(reply.metadata.id, header.metadata.id);
        return Outcome::FormErr;
    };
    let sent = [answer];
    let limit = match (protocol, &request.edns) {
        (Protocol::Udp, Some(e)) => e.max_payload().max(512) as usize,
        (Protocol::Udp, None) => 512,
        _ => u16::MAX as usize,
    };
    assert!(sent[0].len() <= limit, "{} bytes over a {limit} limit", sent[0].len());
    let reply = Message::from_vec(&sent[0]).expect("the response decodes");
    assert_eq!(reply.metadata.id, header.metadata.id);
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    Outcome::Answered(reply)
}

const LABELS: &[&str] = &[
    "web", "api", "many", "loop", "db", "alias", "n1", "n6", "t", "v1", "_web", "_tcp", "_many", "_t", "service", "node", "query", "addr", "dc",
    "dc1", "dc2", "nowhere", "fast", "consul", "alt", "test", "arpa", "in-addr", "ip6", "0a000001", "7f000001", "1", "0", "10", "x",
];
const TYPES: &[RecordType] = &[
    RecordType::A,
    RecordType::AAAA,
    RecordType::SRV,
    RecordType::TXT,
    RecordType::ANY,
    RecordType::PTR,
    RecordType::SOA,
    RecordType::NS,
    RecordType::CNAME,
    RecordType::MX,
    RecordType::AXFR,
];

fn valid_query() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u16>(),
        proptest::collection::vec(0..LABELS.len(), 0..7),
        prop_oneof![Just(None), Just(Some("consul")), Just(Some("alt.test")), Just(Some("in-addr.arpa"))],
        0..TYPES.len(),
        proptest::option::of(0u16..=u16::MAX),
    )
        .prop_map(|(id, labels, suffix, t, edns)| {
            let mut name: Vec<&str> = labels.into_iter().map(|i| LABELS[i]).collect();
            name.extend(suffix.iter().flat_map(|s| s.split('.')));
            let name = if name.is_empty() { ".".to_string() } else { format!("{}.", name.join(".")) };
            let mut m = Message::new(id, MessageType::Query, OpCode::Query);
            m.add_query(Query::query(Name::from_ascii(&name).unwrap(), TYPES[t]));
            if let Some(size) = edns {
                let mut e = Edns::new();
                e.set_max_payload(size);
                m.set_edns(e);
            }
            m.to_vec().unwrap()
        })
}

/// A valid query with some bytes overwritten, a cut, and bytes appended.
fn mutated_query() -> impl Strategy<Value = Vec<u8>> {
    (valid_query(), proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6), any::<usize>(), proptest::collection::vec(any::<u8>(), 0..8))
        .prop_map(|(mut bytes, flips, cut, tail)| {
            for (at, byte) in flips {
                let len = bytes.len();
                bytes[at % len] = byte;
            }
            let keep = bytes.len() - cut % (bytes.len() / 4 + 1);
            bytes.truncate(keep);
            bytes.extend(tail);
            bytes
        })
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![Just(Protocol::Udp), Just(Protocol::Tcp)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_are_dropped_or_answered_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..600), p in protocol()) {
        RUNTIME.block_on(drive(&bytes, p));
    }

    #[test]
    fn mutated_queries_are_dropped_or_answered_without_panicking(bytes in mutated_query(), p in protocol()) {
        RUNTIME.block_on(drive(&bytes, p));
    }

    #[test]
    fn every_valid_query_gets_exactly_one_well_formed_answer(bytes in valid_query(), p in protocol()) {
        let outcome = RUNTIME.block_on(drive(&bytes, p));
        prop_assert!(matches!(outcome, Outcome::Answered(_)), "{outcome:?}");
    }
}
