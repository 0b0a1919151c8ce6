//! Heap held by the state store per catalog instance, beside a reference measured in the same
//! run: the same rows kept in plain `BTreeMap`s keyed by `String` (what a store without
//! persistent maps, shared rows or indexes would hold).
//!
//!   cargo bench --bench state_memory [-- INSTANCES]
//!
//! Each instance is the shape `benches/catalog_scale.sh` registers over HTTP (a new node with one
//! service and one node check), applied through `Store::apply` in group-committed batches of 256
//! as the leader's batcher proposes them. A counting allocator measures live heap bytes, so the
//! figure excludes allocator slack and everything outside the state (Raft log, HTTP, gossip);
//! `catalog_scale.sh` measures the whole server's RSS.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use trellis::state::{CheckStatus, Command, HealthCheck, Node, Registration, Request, Service, Store};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// What the HTTP handler builds from benches/kv/trellis_catalog.lua's body for node `i`.
fn registration(i: usize) -> Registration {
    let node = format!("bench-{i}");
    Registration {
        node: Node { node: node.as_str().into(), address: "10.1.2.3".into(), datacenter: "dc1".into(), ..Default::default() },
        service: Some(Service { id: "web-1".into(), service: "web".into(), port: 8080, tags: vec!["v1".into()], ..Default::default() }),
        checks: vec![HealthCheck {
            node: node.into(),
            check_id: "node-ok".into(),
            name: "node ok".into(),
            status: CheckStatus::Passing,
            ..Default::default()
        }],
        skip_node_update: false,
    }
}

fn main() {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(200_000);

    let base = live();
    let mut store = Store::new();
    for (index, first) in (1..).zip((0..n).step_by(256)) {
        let batch = (first..n.min(first + 256)).map(|i| Request { now_ms: 0, command: Command::Register(registration(i)) }).collect();
        store.apply(index, &Request { now_ms: 0, command: Command::Batch(batch) });
    }
    let trellis = live() - base;

    let base = live();
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    let mut services: BTreeMap<(String, String), Service> = BTreeMap::new();
    let mut checks: BTreeMap<(String, String), HealthCheck> = BTreeMap::new();
    for i in 0..n {
        let r = registration(i);
        let name = r.node.node.to_string();
        let s = r.service.unwrap();
        services.insert((name.clone(), s.id.to_string()), s);
        for c in r.checks {
            checks.insert((name.clone(), c.check_id.to_string()), c);
        }
        nodes.insert(name, r.node);
    }
    let reference = live() - base;

    println!("state memory, {n} catalog instances (node + service + node check), live heap bytes");
    println!("trellis store       {:>6} bytes/instance", trellis / n);
    println!("reference BTreeMaps {:>6} bytes/instance", reference / n);
    println!("ratio               {:.2}x", trellis as f64 / reference as f64);
    std::hint::black_box((&store, &nodes, &services, &checks));
}
