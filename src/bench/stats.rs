//! Latency percentiles and rates from raw samples. A run holds at most a few hundred thousand
//! samples, so sorting them is cheaper and more exact than a histogram.

use std::time::Duration;

use serde::Serialize;

/// What one server did under one load level, over all its rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Completed calls inside the measuring windows.
    pub calls: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Mean latency. With many clients on few cores it is about clients / rate (Little's
    /// law) whoever is served first, so it shows how fast the server is where the median
    /// shows how evenly it serves its connections.
    pub mean_ms: f64,
    /// Completed calls per second of measuring window.
    pub per_sec: f64,
    /// Server CPU time per completed call, in microseconds (all server threads).
    pub server_cpu_us: f64,
    /// Fewest and most calls one client completed in one window: how evenly the clients
    /// were served. Absent where one client was measured alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_calls: Option<[usize; 2]>,
    /// The p50 and p99 of each round on its own, in order: what the ratios to the floor are
    /// made of (see [`paired_median`]), and whether a tail is spread over the run or comes
    /// from a few rounds. Absent where rounds are not kept apart.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub round_p50_ms: Vec<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub round_p99_ms: Vec<f64>,
}

impl Summary {
    /// Summarises latency `samples` collected over `window` of wall time, during which the
    /// server used `server_cpu`.
    pub fn of(mut samples: Vec<Duration>, window: Duration, server_cpu: Duration) -> Self {
        samples.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        Self {
            calls: samples.len(),
            p50_ms: ms(percentile(&samples, 0.50)),
            p99_ms: ms(percentile(&samples, 0.99)),
            mean_ms: ms(samples.iter().sum::<Duration>() / samples.len().max(1) as u32),
            per_sec: samples.len() as f64 / window.as_secs_f64().max(1e-9),
            server_cpu_us: server_cpu.as_secs_f64() * 1e6 / samples.len().max(1) as f64,
            client_calls: None,
            round_p50_ms: Vec::new(),
            round_p99_ms: Vec::new(),
        }
    }

    /// Adds the spread of `per_client`, each client's count of calls in each window.
    pub fn with_clients(self, per_client: &[usize]) -> Self {
        let (min, max) = (per_client.iter().min(), per_client.iter().max());
        Self {
            client_calls: min.zip(max).map(|(a, b)| [*a, *b]),
            ..self
        }
    }
}

/// Nearest-rank percentile of sorted samples (zero when there are none).
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median over rounds of `a[i] / b[i]`, each round's figure for one server divided by
/// the other's from the same round (`None` without a round). Rounds are paired because the
/// two servers of a round ran back to back, under the same load from the rest of the
/// machine; the median, because on a shared machine a stall lands in one server's window
/// now and then, and a percentile pooled over all rounds is set by those few windows.
pub fn paired_median(a: &[f64], b: &[f64]) -> Option<f64> {
    let mut ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
    ratios.sort_unstable_by(f64::total_cmp);
    let mid = ratios.len() / 2;
    match ratios.len() {
        0 => None,
        n if n % 2 == 1 => Some(ratios[mid]),
        _ => Some((ratios[mid - 1] + ratios[mid]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.50), Duration::from_millis(50));
        assert_eq!(percentile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&v[..1], 0.99), Duration::from_millis(1));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
        let s = Summary::of(v, Duration::from_secs(2), Duration::from_millis(10));
        assert_eq!(s.client_calls, None);
        let s = s.with_clients(&[30, 70, 40]);
        assert_eq!(s.calls, 100);
        assert_eq!(s.per_sec, 50.0);
        assert_eq!(s.p99_ms, 99.0);
        assert_eq!(s.mean_ms, 50.5);
        assert_eq!(s.server_cpu_us, 100.0);
        assert_eq!(s.client_calls, Some([30, 70]));
    }

    #[test]
    fn paired_median_of_rounds() {
        assert_eq!(paired_median(&[], &[]), None);
        assert_eq!(paired_median(&[3.0], &[2.0]), Some(1.5));
        // Rounds are paired by position, not sorted apart: 2/1, 4/4, 9/3.
        assert_eq!(paired_median(&[2.0, 4.0, 9.0], &[1.0, 4.0, 3.0]), Some(2.0));
        assert_eq!(paired_median(&[1.0, 3.0], &[1.0, 1.0]), Some(2.0));
        // One round where a stall hit one server moves the median by one rank, not by the
        // stall: pooled, its 40 ms would be the first server's p99.
        let a = [1.1, 1.2, 40.0, 1.0, 1.3];
        let b = [1.0, 1.0, 1.0, 1.0, 1.0];
        assert_eq!(paired_median(&a, &b), Some(1.2));
    }
}
