//! `/v1/agent/metrics`: counters and timing samples recorded by the API, plus gauges read from
//! Raft and the state store at scrape time, rendered as Consul's JSON or Prometheus text.

use parking_lot::Mutex;
use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::Ctx;

pub type Labels = Vec<(&'static str, String)>;
/// One metric series: its name, labels and what was recorded.
type Series = (&'static str, Labels, Stats);

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

/// The methods requests are counted by; anything else is `OTHER`, so that a client inventing
/// methods cannot grow the metrics without bound.
const METHODS: [&str; 7] = ["GET", "PUT", "POST", "DELETE", "HEAD", "PATCH", "OTHER"];
/// Status codes are 100..=599; one slot each.
const CODES: usize = 500;

pub(super) fn method_slot(m: &axum::http::Method) -> usize {
    METHODS.iter().position(|x| *x == m.as_str()).unwrap_or(METHODS.len() - 1)
}

/// HTTP request metrics: a count per method and status code, and request durations per
/// method. Fixed-size, so recording costs a few atomic operations and no allocation.
pub struct Registry {
    counts: Vec<std::sync::atomic::AtomicU64>,
    durations: [Mutex<Stats>; METHODS.len()],
    /// Parked blocking queries woken by a change of what they watch.
    pub blocking_wakeups: std::sync::atomic::AtomicU64,
    /// Counters kept by other parts of the process (the mesh gateway's, the sidecars').
    pub sources: Mutex<Vec<CounterSource>>,
    pub histograms: Mutex<Vec<HistogramSource>>,
}

/// A histogram some other part of the process keeps (cumulative buckets by upper bound).
pub struct Histogram {
    pub name: &'static str,
    pub labels: Labels,
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

pub type HistogramSource = std::sync::Arc<dyn Fn() -> Vec<Histogram> + Send + Sync>;

/// Counters some other part of the process keeps: (name, labels, value) each.
pub type CounterSource = std::sync::Arc<dyn Fn() -> Vec<(&'static str, Labels, u64)> + Send + Sync>;

impl Default for Registry {
    fn default() -> Self {
        Registry {
            counts: (0..METHODS.len() * CODES).map(|_| std::sync::atomic::AtomicU64::new(0)).collect(),
            durations: std::array::from_fn(|_| Mutex::new(Stats::default())),
            blocking_wakeups: std::sync::atomic::AtomicU64::new(0),
            sources: Mutex::new(Vec::new()),
            histograms: Mutex::new(Vec::new()),
        }
    }
}

impl Registry {
    pub(super) fn record(&self, method: usize, code: u16, ms: f64) {
        let code = usize::from(code.clamp(100, 599)) - 100;
        self.counts[method * CODES + code].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.durations[method].lock().add(ms);
    }

    /// Every (name, labels, stats) recorded so far: counters, then samples.
    fn snapshot(&self) -> (Vec<Series>, Vec<Series>) {
        let mut counters = Vec::new();
        for (i, c) in self.counts.iter().enumerate() {
            let n = c.load(std::sync::atomic::Ordering::Relaxed);
            if n == 0 {
                continue;
            }
            let (m, code) = (METHODS[i / CODES], i % CODES + 100);
            let st = Stats { count: n, sum: n as f64, sum_sq: n as f64, min: 1.0, max: 1.0 };
            counters.push(("consul.http.request", vec![("method", m.to_string()), ("code", code.to_string())], st));
        }
        for source in self.sources.lock().iter() {
            for (name, labels, n) in source() {
                let n = n as f64;
                counters.push((name, labels, Stats { count: n as u64, sum: n, sum_sq: n, min: 1.0, max: 1.0 }));
            }
        }
        let mut samples = Vec::new();
        for (i, d) in self.durations.iter().enumerate() {
            let st = *d.lock();
            if st.count > 0 {
                samples.push(("consul.http.request_duration_ms", vec![("method", METHODS[i].to_string())], st));
            }
        }
        (counters, samples)
    }
}

fn gauges(ctx: &Ctx) -> Vec<(&'static str, f64)> {
    let parked = ctx.limits.http_max_blocking_queries.saturating_sub(ctx.blocking_slots.available_permits());
    let mut out = vec![
        ("consul.runtime.uptime_seconds", ctx.started.elapsed().as_secs_f64()),
        ("trellis.http.blocking_queries", parked as f64),
        ("trellis.http.blocking_wakeups", ctx.metrics.blocking_wakeups.load(std::sync::atomic::Ordering::Relaxed) as f64),
        ("trellis.http.shared_answers", ctx.results.len() as f64),
    ];
    if let Some(c) = &ctx.agent_cache {
        out.push(("trellis.agent_cache.entries", c.len() as f64));
        out.push(("trellis.agent_cache.upstream_watches", c.upstream_watches.load(std::sync::atomic::Ordering::Relaxed) as f64));
    }
    let Some(node) = &ctx.node else { return out };
    let m = node.raft.metrics().borrow().clone();
    let (nodes, services, kv, tombstones, sessions) = {
        let s = node.store.read();
        let d = s.data();
        (d.nodes.len(), d.services.len(), d.kv.len(), d.kv_tombstones.len(), d.sessions.len())
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
        ("consul.state.kv_tombstones", tombstones as f64),
        ("consul.state.sessions", sessions as f64),
    ]);
    out
}

pub fn render_json(ctx: &Ctx) -> Value {
    let (counters, samples) = ctx.metrics.snapshot();
    let counters: Vec<Value> = counters.iter().map(|(n, l, s)| s.json(n, l)).collect();
    let samples: Vec<Value> = samples.iter().map(|(n, l, s)| s.json(n, l)).collect();
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
    let (counters, samples) = ctx.metrics.snapshot();
    for (n, l, s) in &counters {
        let n = format!("{}_total", prom_name(n));
        if n != last {
            let _ = writeln!(out, "# TYPE {n} counter");
            last = n.clone();
        }
        let _ = writeln!(out, "{n}{} {}", prom_labels(l), s.sum);
    }
    for (n, l, s) in &samples {
        let n = prom_name(n);
        if n != last {
            let _ = writeln!(out, "# TYPE {n} summary");
            last = n.clone();
        }
        let _ = writeln!(out, "{n}_sum{} {}\n{n}_count{} {}", prom_labels(l), s.sum, prom_labels(l), s.count);
    }
    for source in ctx.metrics.histograms.lock().iter() {
        for h in source() {
            let n = prom_name(h.name);
            if n != last {
                let _ = writeln!(out, "# TYPE {n} histogram");
                last = n.clone();
            }
            for (le, count) in &h.buckets {
                let mut l = h.labels.clone();
                l.push(("le", le.to_string()));
                let _ = writeln!(out, "{n}_bucket{} {count}", prom_labels(&l));
            }
            let mut l = h.labels.clone();
            l.push(("le", "+Inf".into()));
            let _ = writeln!(out, "{n}_bucket{} {}", prom_labels(&l), h.count);
            let _ = writeln!(out, "{n}_sum{} {}\n{n}_count{} {}", prom_labels(&h.labels), h.sum, prom_labels(&h.labels), h.count);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invented_methods_share_one_label() {
        let r = Registry::default();
        for m in ["GET", "FROB", "XYZZY", "BREW"] {
            r.record(method_slot(&axum::http::Method::from_bytes(m.as_bytes()).unwrap()), 200, 1.0);
        }
        let (counters, samples) = r.snapshot();
        let methods: Vec<&str> = counters.iter().map(|(_, l, _)| l[0].1.as_str()).collect();
        assert_eq!(methods, ["GET", "OTHER"]);
        assert_eq!(counters[1].2.count, 3);
        assert_eq!(samples.len(), 2);
    }
}
