//! Pieces every whole-system benchmark needs: a child process killed with the benchmark, a
//! bounded wait for a condition, and percentiles of microsecond samples.

use std::process::Child;
use std::time::{Duration, Instant};

/// A child process, killed and reaped when dropped (a benchmark that panics leaves nothing
/// behind).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Poll `f` until it holds; panic naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `p`th percentile of sorted microsecond samples, in milliseconds (NaN when empty).
pub fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p / 100.0).round() as usize;
    sorted[i] as f64 / 1000.0
}
