//! Metrics: what each worker measures (its [`Counters`], with two [`Histogram`]s), and their
//! Prometheus text exposition, made by a kept crate (`prometheus-client`) from the reports the
//! workers send the master every second.
//!
//! The master serves them (`[metrics] listen`, `metrics_server.rs` in `master/`), so one scrape
//! covers every group and worker, and a scrape never touches the data path: it reads the
//! master's copy of the last reports. Every series has the labels `group` and `worker` (the
//! slot); a slot's series follows the worker serving it, and restarts at a new worker, which
//! Prometheus's `rate()` reads as a counter reset.
//!
//! [`Counters`]: crate::control::Counters

use crate::control::{BusState, Status, WorkerState, WorkerStatus};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Upper bounds (seconds) of the hook duration buckets: a hook should take microseconds.
pub const HOOK_BOUNDS: [f64; 10] = [
    0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 1.0,
];
/// Upper bounds (seconds) of the handshake duration buckets, from accept to the `101`: a slow
/// client's request, or a wss:// handshake's round trips, show here.
pub const HANDSHAKE_BOUNDS: [f64; 9] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// A histogram a worker keeps: a count per bucket (not cumulative; the last counts what is
/// over every bound) and the sum of what was observed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Observations per bucket: `bounds.len() + 1` of them once one was observed.
    pub counts: Vec<u64>,
    /// Their sum, in seconds.
    pub sum: f64,
}

impl Histogram {
    /// Counts `took` in the bucket of `bounds` it falls in.
    pub fn observe(&mut self, bounds: &[f64], took: Duration) {
        let secs = took.as_secs_f64();
        if self.counts.len() != bounds.len() + 1 {
            self.counts = vec![0; bounds.len() + 1];
        }
        let at = bounds.partition_point(|&b| b < secs);
        self.counts[at] += 1;
        self.sum += secs;
    }

    /// The total count, and `(upper bound, count)` per bucket with `+Inf` last: each bucket's
    /// own count, which the encoder sums into Prometheus's cumulative `le` buckets.
    fn buckets(&self, bounds: &[f64]) -> (u64, Vec<(f64, u64)>) {
        let out: Vec<(f64, u64)> = (bounds.iter().copied().chain([f64::INFINITY]))
            .enumerate()
            .map(|(i, bound)| (bound, self.counts.get(i).copied().unwrap_or(0)))
            .collect();
        (out.iter().map(|(_, n)| n).sum(), out)
    }
}

/// The whole exposition for `status`: every worker's last report.
pub fn exposition(status: &Status) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot(status.clone())));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

/// The `Content-Type` of [`exposition`].
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Debug)]
struct Snapshot(Status);

type Labels = Vec<(&'static str, String)>;
/// A counter or gauge family: name, help, and a worker's value.
type Series = (&'static str, &'static str, fn(&WorkerStatus) -> u64);
/// A histogram family: name, help, bucket bounds, and where a worker's report keeps it.
type HistogramSeries = (
    &'static str,
    &'static str,
    &'static [f64],
    fn(&WorkerStatus) -> &Histogram,
);

fn labels(w: &WorkerStatus) -> Labels {
    vec![("group", w.name.clone()), ("worker", w.slot.to_string())]
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // One series per slot: the worker serving it, not one a reload is retiring.
        let workers: Vec<&WorkerStatus> = self
            .0
            .workers
            .iter()
            .filter(|w| w.pid > 0 && w.status != WorkerState::Stopping)
            .collect();
        let gauges: [Series; 3] = [
            ("wsd_connections", "Open WebSocket connections.", |w| {
                w.counters.connections
            }),
            (
                "wsd_send_queue_bytes",
                "Bytes queued for clients that read slower than they are sent to.",
                |w| w.counters.send_queue,
            ),
            (
                "wsd_resident_memory_bytes",
                "Resident memory of the worker process.",
                |w| w.counters.memory,
            ),
        ];
        for (name, help, value) in gauges {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for w in &workers {
                m.encode_family(&labels(w))?.encode_gauge(&value(w))?;
            }
        }
        let counters: [Series; 10] = [
            (
                "wsd_upgrades_accepted",
                "WebSocket upgrades accepted.",
                |w| w.counters.upgraded,
            ),
            ("wsd_messages_in", "Messages received from clients.", |w| {
                w.counters.total_request
            }),
            ("wsd_messages_out", "Messages sent to clients.", |w| {
                w.counters.messages_out
            }),
            (
                "wsd_bytes_in",
                "Payload bytes received from clients.",
                |w| w.counters.bytes_in,
            ),
            ("wsd_bytes_out", "Payload bytes sent to clients.", |w| {
                w.counters.bytes_out
            }),
            (
                "wsd_send_failures",
                "Sends refused: the connection was gone or its send buffer full.",
                |w| w.counters.send_fail,
            ),
            (
                "wsd_buffer_full",
                "Times a connection's send queue reached half of max_send_buffer.",
                |w| w.counters.buffer_full,
            ),
            (
                "wsd_bus_dropped",
                "Bus messages a full or gone peer, or Redis, could not take.",
                |w| w.counters.bus_dropped,
            ),
            ("wsd_bus_sent", "Bus messages sent.", |w| {
                w.counters.bus_sent
            }),
            (
                "wsd_webhook_failures",
                "Webhook requests that got an error status or no answer.",
                |w| w.counters.webhook_failures,
            ),
        ];
        for (name, help, value) in counters {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for w in &workers {
                m.encode_family(&labels(w))?
                    .encode_counter::<Labels, _, f64>(&value(w), None)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "wsd_upgrades_rejected",
            "WebSocket upgrades refused, by the HTTP status they got (401 token, 403 origin, \
             429 per-address limit, 400 bad request or subprotocol, 431 too large, ...).",
            None,
            MetricType::Counter,
        )?;
        for w in &workers {
            for (status, n) in &w.counters.rejected {
                let mut l = labels(w);
                l.push(("status", status.clone()));
                m.encode_family(&l)?
                    .encode_counter::<Labels, _, f64>(n, None)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "wsd_api_requests",
            "Backend API requests answered, by endpoint and status.",
            None,
            MetricType::Counter,
        )?;
        for w in &workers {
            for (key, n) in &w.counters.api {
                let (endpoint, status) = key.split_once(' ').unwrap_or((key, ""));
                let mut l = labels(w);
                l.push(("endpoint", endpoint.to_string()));
                l.push(("status", status.to_string()));
                m.encode_family(&l)?
                    .encode_counter::<Labels, _, f64>(n, None)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "wsd_redis_up",
            "1 when the worker's link to the cluster bus's Redis is up, 0 when it is down or \
             connecting. Absent without [server] bus.",
            None,
            MetricType::Gauge,
        )?;
        for w in &workers {
            let up = match w.counters.bus_state {
                BusState::Up => 1u64,
                BusState::Down | BusState::Connecting => 0,
                BusState::Local | BusState::Unknown => continue,
            };
            m.encode_family(&labels(w))?.encode_gauge(&up)?;
        }
        let histograms: [HistogramSeries; 2] = [
            (
                "wsd_handshake_duration_seconds",
                "From accepting a connection to its 101 (or its refusal).",
                &HANDSHAKE_BOUNDS,
                |w| &w.counters.handshake_seconds,
            ),
            (
                "wsd_hook_duration_seconds",
                "Time spent in the app's connection hooks (on_connect, on_message, ...).",
                &HOOK_BOUNDS,
                |w| &w.counters.hook_seconds,
            ),
        ];
        for (name, help, bounds, value) in histograms {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for w in &workers {
                let h = value(w);
                let (count, buckets) = h.buckets(bounds);
                m.encode_family(&labels(w))?
                    .encode_histogram::<Labels>(h.sum, count, &buckets, None)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_fall_in_their_buckets() {
        let mut h = Histogram::default();
        let bounds = [0.001, 0.01];
        h.observe(&bounds, Duration::from_micros(500));
        h.observe(&bounds, Duration::from_millis(1));
        h.observe(&bounds, Duration::from_millis(5));
        h.observe(&bounds, Duration::from_secs(2));
        assert_eq!(h.counts, vec![2, 1, 1]);
        let (count, buckets) = h.buckets(&bounds);
        assert_eq!(count, 4);
        assert_eq!(buckets, vec![(0.001, 2), (0.01, 1), (f64::INFINITY, 1)]);
        assert!((h.sum - 2.0065).abs() < 1e-9);
        // Never observed: every bucket zero.
        let (count, buckets) = Histogram::default().buckets(&bounds);
        assert_eq!((count, buckets.len()), (0, 3));
    }
}
