//! Latency histograms in Prometheus's buckets: the shadow's (live and shadow answers) and the
//! observed services' durations, counted by the flows and read by the API, the metrics and
//! `stats --watch`.
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bounds of the latency histograms' buckets, in seconds: Prometheus's 1-2.5-5 steps from
/// 100 µs, since an answer between two pods of one node often takes less than a millisecond.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A latency histogram: counts per bucket of [`LATENCY_BUCKETS`] (one more for the rest).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Latency {
    pub buckets: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl Latency {
    /// Adds `other`'s observations to these.
    pub fn absorb(&mut self, other: &Latency) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (bucket, n) in self.buckets.iter_mut().zip(&other.buckets) {
            *bucket += n;
        }
        self.sum_seconds += other.sum_seconds;
        self.count += other.count;
    }

    /// The observations since `earlier` (an earlier reading of the same histogram).
    pub fn since(&self, earlier: &Latency) -> Latency {
        let at = |buckets: &[u64], i: usize| buckets.get(i).copied().unwrap_or(0);
        Latency {
            buckets: (0..self.buckets.len())
                .map(|i| at(&self.buckets, i).saturating_sub(at(&earlier.buckets, i)))
                .collect(),
            sum_seconds: (self.sum_seconds - earlier.sum_seconds).max(0.0),
            count: self.count.saturating_sub(earlier.count),
        }
    }

    /// The `q` quantile (0 to 1) in seconds, as Prometheus's `histogram_quantile` estimates it:
    /// linearly within its bucket; in the last (unbounded) bucket, the largest bound. `None`
    /// without observations.
    #[expect(
        clippy::cast_precision_loss,
        reason = "counts far below 2^52 observations"
    )]
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count as f64;
        let mut below = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n > 0 && (below + n) as f64 >= rank {
                let Some(&upper) = LATENCY_BUCKETS.get(i) else {
                    return LATENCY_BUCKETS.last().copied();
                };
                let lower = if i == 0 { 0.0 } else { LATENCY_BUCKETS[i - 1] };
                let within = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
                return Some(lower + (upper - lower) * within);
            }
            below += n;
        }
        LATENCY_BUCKETS.last().copied()
    }

    pub fn observe(&mut self, took: Duration) {
        let seconds = took.as_secs_f64();
        if self.buckets.is_empty() {
            self.buckets = vec![0; LATENCY_BUCKETS.len() + 1];
        }
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket] += 1;
        self.sum_seconds += seconds;
        self.count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_fall_into_buckets() {
        let mut latency = Latency::default();
        latency.observe(Duration::from_micros(300));
        latency.observe(Duration::from_millis(30));
        latency.observe(Duration::from_mins(1));
        assert_eq!(latency.count, 3);
        assert_eq!(latency.buckets[2], 1);
        assert_eq!(latency.buckets[8], 1);
        assert_eq!(latency.buckets[LATENCY_BUCKETS.len()], 1);
        // Ranks 1.5 and 2.97 of 3: in the 25-50 ms bucket, and in the last.
        let median = latency.quantile(0.5).expect("observed");
        assert!((0.025..=0.05).contains(&median), "{median}");
        assert_eq!(latency.quantile(0.99), LATENCY_BUCKETS.last().copied());
        assert_eq!(
            latency.quantile(0.0),
            Some(0.000_25),
            "its bucket's lower bound"
        );
        let mut later = latency.clone();
        later.observe(Duration::from_micros(80));
        let since = later.since(&latency);
        assert_eq!((since.count, since.buckets[0]), (1, 1));
        assert_eq!(since.quantile(0.5), Some(0.000_05));
        assert_eq!(Latency::default().quantile(0.5), None);
    }
}
