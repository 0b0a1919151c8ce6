//! Gossip convergence benchmark: N foca members in one process, talking
//! through in-memory queues on a virtual clock (`membership::sim`), with
//! the production LAN profile. One member is killed after a warm-up; we
//! measure how long until every live member declares it down, and the
//! traffic per member, then compare with the classic SWIM expectation for
//! the same config and with N = 50 as the base.
//!
//! Run: `cargo bench --bench gossip_convergence` (optionally followed by
//! sizes, e.g. `-- 50 200`). Each size is bounded by the simulator's
//! wall-clock budget; results are deterministic for the fixed seed.

use std::time::Duration;

use trellis::membership::Profile;
use trellis::membership::sim::{self, SimConfig, SimReport};

/// Cluster sizes from the design brief: small DC, medium DC, large DC.
const DEFAULT_SIZES: [usize; 3] = [50, 200, 1000];

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_owned(), |d| format!("{:.2}", d.as_secs_f64()))
}

fn ratio(a: Option<Duration>, b: Duration) -> String {
    a.map_or_else(|| "-".to_owned(), |a| format!("{:.2}", a.as_secs_f64() / b.as_secs_f64()))
}

fn main() {
    // cargo passes "--bench"; numeric arguments select sizes.
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { DEFAULT_SIZES.to_vec() } else { sizes };
    let profile = Profile::lan();
    println!(
        "gossip convergence, LAN profile (probe {:?}, rtt {:?}, gossip {:?} x{}), 1 ms +-50% latency, no loss",
        profile.probe_period, profile.probe_rtt, profile.gossip_interval, profile.gossip_fanout
    );
    println!(
        "{:>5} {:>8} {:>8} {:>8} {:>7} {:>8} {:>7} {:>8} {:>9} {:>8} {:>9} {:>6} {:>5} {:>7}",
        "N", "first_s", "all_s", "swim_s", "all/swm", "bound_s", "vs_N50", "msg/s/m", "B/s/m", "fmsg/s/m", "fB/s/m", "maxpkt", "false", "wall_ms"
    );
    let mut base: Option<(Duration, f64)> = None;
    let mut reports: Vec<SimReport> = Vec::new();
    for n in sizes {
        let cfg = SimConfig::new(n);
        let report = sim::run_failure_detection(&cfg);
        let reference = sim::swim_reference(&profile, n);
        let bound = profile.failure_detection_bound(n);
        if base.is_none()
            && let Some(full) = report.full_detection
        {
            base = Some((full, report.steady_msgs_per_member_sec));
        }
        let vs_base = match (report.full_detection, base) {
            (Some(full), Some((base_full, _))) => ratio(Some(full), base_full),
            _ => "-".to_owned(),
        };
        println!(
            "{:>5} {:>8} {:>8} {:>8.2} {:>7} {:>8.2} {:>7} {:>8.2} {:>9.0} {:>8.2} {:>9.0} {:>6} {:>5} {:>7}{}",
            report.members,
            secs(report.first_detection),
            secs(report.full_detection),
            reference.as_secs_f64(),
            ratio(report.full_detection, reference),
            bound.as_secs_f64(),
            vs_base,
            report.steady_msgs_per_member_sec,
            report.steady_bytes_per_member_sec,
            report.failure_msgs_per_member_sec,
            report.failure_bytes_per_member_sec,
            report.max_datagram_bytes,
            report.false_downs,
            report.wall_elapsed.as_millis(),
            if report.hit_wall_budget { "  (wall budget hit)" } else { "" }
        );
        reports.push(report);
    }
    println!(
        "first_s/all_s: kill -> first / every live member declares it failed (virtual time).\n\
         swim_s: T*e/(e-1) + T + rtt + suspicion(N) + T*log2(N); bound_s: Profile::failure_detection_bound.\n\
         msg|B/s/m: per member per second before the kill; fmsg|fB: from kill to full detection.\n\
         bytes include the 29-byte AES-GCM envelope; vs_N50 = all_s / all_s at the first size."
    );
    let missed: Vec<usize> = reports.iter().filter(|r| r.full_detection.is_none()).map(|r| r.members).collect();
    if !missed.is_empty() {
        println!("WARNING: no full detection for N = {missed:?}");
    }
}
