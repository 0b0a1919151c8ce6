//! The state store's apply path: a KV set, a catalog registration and a five-op transaction
//! through `Store::apply`, each beside a reference measured in the same run (a bare `BTreeMap`
//! insert of the same entry: the least work any store must do), so the ratio shows what
//! indexes, watches and validation cost; and 256 KV sets applied as one group-committed batch
//! against the same writes applied one entry each.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use trellis::state::{CheckStatus, Command, HealthCheck, KvEntry, KvVerb, Node, Registration, Request, Service, Store, TxnOp};

fn set(key: String) -> Request {
    let op = TxnOp { verb: KvVerb::Set, key, value: Some(vec![7u8; 128]), flags: 0, index: 0, session: String::new() };
    Request { now_ms: 0, command: Command::Txn(vec![op]) }
}

fn register(i: u64) -> Request {
    let node = format!("node-{}", i % 1000);
    Request {
        now_ms: 0,
        command: Command::Register(Registration {
            node: Node { node: node.into(), address: format!("10.0.{}.{}", (i / 250) % 250, i % 250).into(), ..Default::default() },
            service: Some(Service {
                id: format!("web-{i}").into(),
                service: "web".into(),
                port: 8080,
                tags: vec!["v1".into()],
                ..Default::default()
            }),
            checks: vec![HealthCheck {
                check_id: format!("web-{i}-check").into(),
                status: CheckStatus::Passing,
                service_id: format!("web-{i}").into(),
                ..Default::default()
            }],
            skip_node_update: false,
        }),
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("kv_set_128B");
    g.bench_function("reference_btreemap_insert", |b| {
        let mut m: BTreeMap<String, KvEntry> = BTreeMap::new();
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            let key = format!("bench/{i}");
            m.insert(key.clone(), KvEntry { key, value: Some(vec![7u8; 128]), create_index: i, modify_index: i, ..Default::default() });
        })
    });
    g.bench_function("trellis_store_apply", |b| {
        let mut s = Store::new();
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            black_box(s.apply(i, &set(format!("bench/{i}"))));
        })
    });
    g.finish();

    let mut g = c.benchmark_group("catalog_register");
    g.bench_function("reference_btreemap_insert", |b| {
        let mut m: BTreeMap<(String, String), Service> = BTreeMap::new();
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            if let Command::Register(r) = register(i).command {
                let s = r.service.unwrap();
                m.insert((r.node.node.to_string(), s.id.to_string()), s);
            }
        })
    });
    g.bench_function("trellis_store_apply", |b| {
        let mut s = Store::new();
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            black_box(s.apply(i, &register(i)));
        })
    });
    g.finish();

    let mut g = c.benchmark_group("txn_5_ops");
    g.bench_function("trellis_store_apply", |b| {
        let mut s = Store::new();
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            let ops = (0..5)
                .map(|k| TxnOp { verb: KvVerb::Set, key: format!("t/{i}/{k}"), value: Some(vec![1; 64]), flags: 0, index: 0, session: String::new() })
                .collect();
            black_box(s.apply(i, &Request { now_ms: 0, command: Command::Txn(ops) }));
        })
    });
    g.finish();

    // Group commit: 256 writes applied as one batched entry (what the leader's batcher proposes
    // under load) against the same 256 writes applied as entries of their own.
    let mut g = c.benchmark_group("kv_set_128B_x256");
    g.throughput(criterion::Throughput::Elements(256));
    g.bench_function("reference_256_entries", |b| {
        let mut s = Store::new();
        let mut i = 0u64;
        b.iter(|| {
            for _ in 0..256 {
                i += 1;
                black_box(s.apply(i, &set(format!("bench/{i}"))));
            }
        })
    });
    g.bench_function("trellis_one_batch", |b| {
        let mut s = Store::new();
        let (mut i, mut index) = (0u64, 0u64);
        b.iter(|| {
            index += 1;
            let batch = (0..256)
                .map(|_| {
                    i += 1;
                    set(format!("bench/{i}"))
                })
                .collect();
            black_box(s.apply(index, &Request { now_ms: 0, command: Command::Batch(batch) }));
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
