//! `/v1/agent/metrics`: counters and timing samples recorded by the API, plus gauges read from
//! Raft and the state store at scrape time, rendered as Consul's JSON or Prometheus text.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use serde_json::{Value, json};

use super::Ctx;

type Labels = Vec<(&'static str, String)>;

#[derive(Default, Clone, Copy)]
struct Stats {
    count: u64,
    sum: f64,
    sum_sq: f64,
    min: f64,
    max: f64,
}

impl Stats {
    fn add(&mut self, v: f64) {
        if self.count == 0 || v < self.min {
            self.min = v;
        }
        if self.count == 0 || v > self.max {
            self.max = v;
        }
        self.count += 1;
        self.sum += v;
        self.sum_sq += v * v;
    }
    fn json(&self, name: &str, labels: &Labels) -> Value {
        let mean = if self.count > 0 { self.sum / self.count as f64 } else { 0.0 };
        let var = if self.count > 1 { (self.sum_sq - self.sum * mean) / (self.count - 1) as f64 } else { 0.0 };
        json!({
            "Name": name, "Count": self.count, "Rate": self.sum / 10.0, "Sum": self.sum,
            "Min": self.min, "Max": self.max, "Mean": mean, "Stddev": var.max(0.0).sqrt(),
            "Labels": labels.iter().cloned().collect::<BTreeMap<_, _>>(),
        })
    }
}

/// In-process metrics; cheap to clone.
#[derive(Clone, Default)]
pub struct Registry {
    counters: Arc<Mutex<BTreeMap<(&'static str, Labels), Stats>>>,
    samples: Arc<Mutex<BTreeMap<(&'static str, Labels), Stats>>>,
}

impl Registry {
    pub fn count(&self, name: &'static str, labels: Labels, by: f64) {
        self.counters.lock().expect("metrics lock").entry((name, labels)).or_default().add(by);
    }
    pub fn sample(&self, name: &'static str, labels: Labels, v: f64) {
        self.samples.lock().expect("metrics lock").entry((name, labels)).or_default().add(v);
    }
}

/// Middleware: count every request by method and status, and time it.
pub async fn track(State(ctx): State<Ctx>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    ctx.metrics.count("consul.http.request", vec![("method", method.clone()), ("code", resp.status().as_u16().to_string())], 1.0);
    ctx.metrics.sample("consul.http.request_duration_ms", vec![("method", method)], ms);
    resp
}

fn gauges(ctx: &Ctx) -> Vec<(&'static str, f64)> {
    let mut out = vec![("consul.runtime.uptime_seconds", ctx.started.elapsed().as_secs_f64())];
    let Some(node) = &ctx.node else { return out };
    let m = node.raft.metrics().borrow().clone();
    let (nodes, services, kv, sessions) = {
        let s = node.store.read().expect("state lock");
        let d = s.data();
        (d.nodes.len(), d.services.len(), d.kv.len(), d.sessions.len())
    };
    out.extend([
        ("consul.raft.leader", f64::from(u8::from(m.current_leader == Some(node.id)))),
        ("consul.raft.term", m.current_term as f64),
        ("consul.raft.last_index", m.last_log_index.unwrap_or(0) as f64),
        ("consul.raft.applied_index", m.last_applied.map(|l| l.index).unwrap_or(0) as f64),
        ("consul.raft.peers", m.membership_config.membership().voter_ids().count() as f64),
        ("consul.state.nodes", nodes as f64),
        ("consul.state.services", services as f64),
        ("consul.state.kv_entries", kv as f64),
        ("consul.state.sessions", sessions as f64),
    ]);
    out
}

pub fn render_json(ctx: &Ctx) -> Value {
    let counters: Vec<Value> = ctx.metrics.counters.lock().expect("metrics lock").iter().map(|((n, l), s)| s.json(n, l)).collect();
    let samples: Vec<Value> = ctx.metrics.samples.lock().expect("metrics lock").iter().map(|((n, l), s)| s.json(n, l)).collect();
    let gauges: Vec<Value> = gauges(ctx).into_iter().map(|(n, v)| json!({ "Name": n, "Value": v, "Labels": {} })).collect();
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    json!({ "Timestamp": secs.to_string(), "Gauges": gauges, "Points": [], "Counters": counters, "Samples": samples })
}

fn prom_name(n: &str) -> String {
    n.replace(['.', '-'], "_")
}

fn prom_labels(l: &Labels) -> String {
    if l.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = l.iter().map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))).collect();
    format!("{{{}}}", inner.join(","))
}

pub fn render_prometheus(ctx: &Ctx) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for (n, v) in gauges(ctx) {
        let n = prom_name(n);
        let _ = writeln!(out, "# TYPE {n} gauge\n{n} {v}");
    }
    let mut last = String::new();
    for ((n, l), s) in ctx.metrics.counters.lock().expect("metrics lock").iter() {
        let n = format!("{}_total", prom_name(n));
        if n != last {
            let _ = writeln!(out, "# TYPE {n} counter");
            last = n.clone();
        }
        let _ = writeln!(out, "{n}{} {}", prom_labels(l), s.sum);
    }
    for ((n, l), s) in ctx.metrics.samples.lock().expect("metrics lock").iter() {
        let n = prom_name(n);
        if n != last {
            let _ = writeln!(out, "# TYPE {n} summary");
            last = n.clone();
        }
        let _ = writeln!(out, "{n}_sum{} {}\n{n}_count{} {}", prom_labels(l), s.sum, prom_labels(l), s.count);
    }
    out
}
