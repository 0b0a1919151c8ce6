//! Network coordinates: Vivaldi, as Serf computes them (Dabek et al., "Vivaldi: A Decentralized
//! Network Coordinate System", with Serf's height vector, adjustment term and gravity), so the
//! JSON matches Consul's `/v1/coordinate/*` and distances can be estimated between any two
//! nodes that never talked to each other. Servers keep one coordinate in the WAN pool
//! (`federation`) and every agent one in its datacenter (`agent::coordinates`, stored in the
//! replicated state for `/v1/coordinate/nodes` and `?near=` sorting).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Serf's defaults.
pub const DIMENSIONALITY: usize = 8;
const VIVALDI_ERROR_MAX: f64 = 1.5;
const VIVALDI_CE: f64 = 0.25;
const VIVALDI_CC: f64 = 0.25;
const ADJUSTMENT_WINDOW: usize = 20;
const HEIGHT_MIN: f64 = 10.0e-6;
const LATENCY_FILTER: usize = 3;
const GRAVITY_RHO: f64 = 150.0;
const ZERO_THRESHOLD: f64 = 1.0e-6;
/// Round trips above this are measurement noise (Serf rejects them too).
const MAX_RTT: Duration = Duration::from_secs(10);

/// A point in the coordinate space, in seconds (Consul's JSON shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Coordinate {
    pub vec: Vec<f64>,
    pub error: f64,
    pub adjustment: f64,
    pub height: f64,
}

impl Default for Coordinate {
    fn default() -> Self {
        Coordinate { vec: vec![0.0; DIMENSIONALITY], error: VIVALDI_ERROR_MAX, adjustment: 0.0, height: HEIGHT_MIN }
    }
}

impl Coordinate {
    /// The right number of dimensions and nothing infinite or NaN.
    pub fn is_valid(&self) -> bool {
        self.vec.len() == DIMENSIONALITY && self.vec.iter().chain([&self.error, &self.adjustment, &self.height]).all(|v| v.is_finite())
    }

    fn raw_distance(&self, other: &Coordinate) -> f64 {
        magnitude(&diff(&self.vec, &other.vec)) + self.height + other.height
    }

    /// The estimated round trip between two coordinates.
    pub fn distance_to(&self, other: &Coordinate) -> Duration {
        let dist = self.raw_distance(other);
        let adjusted = dist + self.adjustment + other.adjustment;
        Duration::from_secs_f64(if adjusted > 0.0 { adjusted } else { dist }.max(0.0))
    }

    /// Move along the unit vector from `other` to us by `force` (seconds).
    fn apply_force(&mut self, force: f64, other: &Coordinate) {
        let (unit, mag) = unit_vector_at(&self.vec, &other.vec);
        for (v, u) in self.vec.iter_mut().zip(&unit) {
            *v += u * force;
        }
        if mag > ZERO_THRESHOLD {
            self.height = ((self.height + other.height) * force / mag + self.height).max(HEIGHT_MIN);
        }
    }
}

fn diff(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

fn magnitude(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// The unit vector from `b` to `a` and the distance; a random direction when they coincide.
fn unit_vector_at(a: &[f64], b: &[f64]) -> (Vec<f64>, f64) {
    let d = diff(a, b);
    let mag = magnitude(&d);
    if mag > ZERO_THRESHOLD {
        return (d.iter().map(|x| x / mag).collect(), mag);
    }
    use rand::RngExt;
    let mut rng = rand::rng();
    let r: Vec<f64> = (0..a.len()).map(|_| rng.random::<f64>() - 0.5).collect();
    let m = magnitude(&r);
    if m > ZERO_THRESHOLD {
        return (r.iter().map(|x| x / m).collect(), 0.0);
    }
    (vec![0.0; a.len()], 0.0)
}

/// One node's view: its own coordinate, updated from measured round trips to others.
#[derive(Debug, Default)]
pub struct Client {
    coord: Coordinate,
    origin: Coordinate,
    adjustment_samples: VecDeque<f64>,
    latency: HashMap<String, VecDeque<f64>>,
}

impl Client {
    pub fn coordinate(&self) -> Coordinate {
        self.coord.clone()
    }

    /// Take one round-trip sample to `node` at `other`. Invalid input changes nothing.
    pub fn update(&mut self, node: &str, other: &Coordinate, rtt: Duration) {
        if !other.is_valid() || rtt.is_zero() || rtt > MAX_RTT {
            return;
        }
        // The median of the last few samples per node filters out spikes.
        let samples = self.latency.entry(node.to_string()).or_default();
        samples.push_back(rtt.as_secs_f64());
        if samples.len() > LATENCY_FILTER {
            samples.pop_front();
        }
        let mut sorted: Vec<f64> = samples.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let rtt = sorted[sorted.len() / 2];

        let before = self.coord.clone();
        self.update_vivaldi(other, rtt);
        self.update_adjustment(other, rtt);
        self.update_gravity();
        if !self.coord.is_valid() {
            self.coord = before;
        }
    }

    fn update_vivaldi(&mut self, other: &Coordinate, rtt: f64) {
        let rtt = rtt.max(ZERO_THRESHOLD);
        let dist = self.coord.raw_distance(other);
        let wrongness = (dist - rtt).abs() / rtt;
        let total_error = (self.coord.error + other.error).max(ZERO_THRESHOLD);
        let weight = self.coord.error / total_error;
        self.coord.error = (VIVALDI_CE * weight * wrongness + self.coord.error * (1.0 - VIVALDI_CE * weight)).min(VIVALDI_ERROR_MAX);
        let force = VIVALDI_CC * weight * (rtt - dist);
        self.coord.apply_force(force, other);
    }

    fn update_adjustment(&mut self, other: &Coordinate, rtt: f64) {
        self.adjustment_samples.push_back(rtt - self.coord.raw_distance(other));
        if self.adjustment_samples.len() > ADJUSTMENT_WINDOW {
            self.adjustment_samples.pop_front();
        }
        self.coord.adjustment = self.adjustment_samples.iter().sum::<f64>() / (2.0 * ADJUSTMENT_WINDOW as f64);
    }

    fn update_gravity(&mut self) {
        let dist = self.origin.raw_distance(&self.coord);
        let force = -(dist / GRAVITY_RHO).powi(2);
        let origin = self.origin.clone();
        self.coord.apply_force(force, &origin);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four nodes at the corners of a 10 ms x 20 ms rectangle, each measuring the others:
    /// after some rounds every estimated round trip is within 20% of the true one.
    #[test]
    fn coordinates_converge_to_the_measured_distances() {
        let pos = [(0.0, 0.0), (10.0, 0.0), (0.0, 20.0), (10.0, 20.0)];
        let truth = |a: usize, b: usize| {
            let (dx, dy): (f64, f64) = (pos[a].0 - pos[b].0, pos[a].1 - pos[b].1);
            Duration::from_secs_f64((dx * dx + dy * dy).sqrt() / 1000.0)
        };
        let mut clients: Vec<Client> = (0..4).map(|_| Client::default()).collect();
        for _ in 0..500 {
            for a in 0..4 {
                for b in (0..4).filter(|b| *b != a) {
                    let other = clients[b].coordinate();
                    clients[a].update(&format!("n{b}"), &other, truth(a, b));
                }
            }
        }
        for a in 0..4 {
            for b in (0..4).filter(|b| *b != a) {
                let est = clients[a].coordinate().distance_to(&clients[b].coordinate()).as_secs_f64();
                let want = truth(a, b).as_secs_f64();
                assert!((est - want).abs() / want < 0.2, "{a}-{b}: estimated {est:.4}s, true {want:.4}s");
            }
        }
    }

    #[test]
    fn bad_samples_are_ignored() {
        let mut c = Client::default();
        let start = c.coordinate();
        c.update("x", &Coordinate { vec: vec![f64::NAN; DIMENSIONALITY], ..Default::default() }, Duration::from_millis(5));
        c.update("x", &Coordinate { vec: vec![0.0; 2], ..Default::default() }, Duration::from_millis(5));
        c.update("x", &Coordinate::default(), Duration::ZERO);
        c.update("x", &Coordinate::default(), Duration::from_secs(60));
        assert_eq!(c.coordinate(), start);
    }
}
