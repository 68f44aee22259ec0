//! Prometheus metrics, served at `GET /metrics` in the text format. Names
//! follow Prometheus conventions (`confab_…_total` for counters, base units
//! in the name); every label has a handful of values at most.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use confab_core::conn::Outbound;
use confab_core::{Chat, Observer};
use confab_proto::ErrorCode;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets, in seconds: 50 µs to 2.5 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];
/// Jobs per storage commit.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

pub(crate) struct Metrics {
    registry: Registry,
    connections: IntGaugeVec,
    connections_total: IntCounterVec,
    logins: IntCounterVec,
    requests: IntCounterVec,
    rate_limited: IntCounterVec,
    messages_stored: IntCounter,
    /// By [`Transport`], resolved once: a label look-up (hashing the label)
    /// per delivery showed in the fan-out profile.
    deliveries: [IntCounter; 2],
    delivery_latency: DeliveryLatency,
    commit_batch: Histogram,
    commit_latency: Histogram,
    evictions: IntCounterVec,
    users_online: IntGauge,
    rooms_active: IntGauge,
    request_latency: HistogramVec,
    pool: IntGaugeVec,
    broker_connected: IntGauge,
    broker_events: IntCounterVec,
    /// Reads the storage pool: (connections in use, most).
    pool_status: std::sync::OnceLock<PoolStatus>,
}

/// (connections in use, the pool's size), read at each scrape.
pub(crate) type PoolStatus = Box<dyn Fn() -> Option<(usize, usize)> + Send + Sync>;

/// The two transports, as label values.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Transport {
    Ws,
    Line,
}

impl Transport {
    const ALL: [Transport; 2] = [Transport::Ws, Transport::Line];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Line => "line",
        }
    }
}

/// Counts a connection as open until dropped.
pub(crate) struct OpenConnection<'a> {
    metrics: &'a Metrics,
    transport: Transport,
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.metrics
            .connections
            .with_label_values(&[self.transport.label()])
            .dec();
    }
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, buckets: &[f64], labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            let h = HistogramVec::new(opts, labels).expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let connections = IntGaugeVec::new(
            Opts::new("confab_connections", "Open chat connections."),
            &["transport"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(connections.clone()))
            .expect("unique metric");
        Metrics {
            connections,
            connections_total: counter(
                "confab_connections_total",
                "Chat connections accepted.",
                &["transport"],
            ),
            logins: counter(
                "confab_logins_total",
                "Login attempts (register, login, guest, resume) by outcome.",
                &["method", "outcome"],
            ),
            requests: counter(
                "confab_requests_total",
                "Requests answered, by type and result (ok or the error code).",
                &["type", "result"],
            ),
            rate_limited: counter(
                "confab_rate_limited_total",
                "Requests refused by a rate limit.",
                &["type"],
            ),
            messages_stored: counter(
                "confab_messages_stored_total",
                "Messages committed to storage.",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            deliveries: Transport::ALL.map({
                let vec = counter(
                    "confab_deliveries_total",
                    "Message events written to connections.",
                    &["transport"],
                );
                move |t| vec.with_label_values(&[t.label()])
            }),
            delivery_latency: {
                let latency = DeliveryLatency::new();
                registry
                    .register(Box::new(latency.clone()))
                    .expect("unique metric");
                latency
            },
            commit_batch: histogram(
                "confab_store_commit_batch_size",
                "Writes committed together in one storage transaction.",
                BATCH_BUCKETS,
                &[],
            )
            .with_label_values(&[] as &[&str]),
            commit_latency: histogram(
                "confab_store_commit_seconds",
                "Time to run and commit one storage transaction.",
                LATENCY_BUCKETS,
                &[],
            )
            .with_label_values(&[] as &[&str]),
            evictions: counter(
                "confab_slow_consumer_evictions_total",
                "Connections closed because they did not read fast enough.",
                &["transport"],
            ),
            request_latency: histogram(
                "confab_request_seconds",
                "Time to answer a request, from reading it to its reply (its storage \
                 operations included), by type.",
                LATENCY_BUCKETS,
                &["type"],
            ),
            pool: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "confab_store_pool_connections",
                        "Storage connections: in use, and the most the pool keeps (PostgreSQL).",
                    ),
                    &["state"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            pool_status: std::sync::OnceLock::new(),
            broker_connected: gauge(
                "confab_broker_connected",
                "1 while the broker (Redis) is connected, or on a single node.",
            ),
            broker_events: counter(
                "confab_broker_events_total",
                "Events between nodes: published, received, dropped (not published), \
                 malformed (not readable), and resubscriptions after a lost connection.",
                &["kind"],
            ),
            users_online: gauge("confab_users_online", "Users with a connection here."),
            rooms_active: gauge(
                "confab_rooms_active",
                "Rooms with at least one connected member here.",
            ),
            registry,
        }
    }

    pub(crate) fn connection(&self, transport: Transport) -> OpenConnection<'_> {
        let label = [transport.label()];
        self.connections.with_label_values(&label).inc();
        self.connections_total.with_label_values(&label).inc();
        OpenConnection {
            metrics: self,
            transport,
        }
    }

    /// Count the messages among `items` as delivered, each with its
    /// latency since accept: one clock read and one count for them all.
    /// (A clock read, a count and an observation per delivery were about
    /// 5 % of the server's samples at 700,000 deliveries a second; the
    /// observations, 2-3 %, went to [`DeliveryLatency`].)
    pub(crate) fn delivered<'a>(
        &self,
        transport: Transport,
        items: impl Iterator<Item = &'a Outbound>,
    ) {
        let mut now = None;
        let mut messages = 0;
        for item in items {
            let Outbound::Event(shared) = item else {
                continue;
            };
            if !matches!(shared.event, confab_proto::Event::Message(_)) {
                continue;
            }
            messages += 1;
            if let Some(at) = shared.accepted {
                let now = *now.get_or_insert_with(Instant::now);
                self.delivery_latency
                    .observe(transport, now.saturating_duration_since(at));
            }
        }
        if messages > 0 {
            self.deliveries[transport as usize].inc_by(messages);
        }
    }

    pub(crate) fn evicted(&self, transport: Transport) {
        self.evictions.with_label_values(&[transport.label()]).inc();
    }

    pub(crate) fn committed(&self, jobs: usize, took: Duration) {
        self.commit_batch.observe(jobs as f64);
        self.commit_latency.observe(took.as_secs_f64());
    }

    /// Read the storage pool at each scrape (once; later calls are ignored).
    pub(crate) fn watch_pool(&self, status: PoolStatus) {
        let _ = self.pool_status.set(status);
    }

    pub(crate) fn messages_stored(&self) -> u64 {
        self.messages_stored.get()
    }

    pub(crate) fn open_connections(&self, transport: Transport) -> i64 {
        self.connections
            .with_label_values(&[transport.label()])
            .get()
    }

    /// The text exposition, with the gauges read from the engine now.
    pub(crate) fn render(&self, chat: &Chat) -> String {
        let (users, rooms) = chat.counts();
        self.users_online.set(users as i64);
        self.rooms_active.set(rooms as i64);
        let (connected, stats) = chat.broker_status();
        self.broker_connected.set(i64::from(connected));
        for (kind, value) in [
            ("published", stats.published),
            ("received", stats.received),
            ("dropped", stats.dropped),
            ("malformed", stats.malformed),
            ("reconnect", stats.reconnects),
        ] {
            let c = self.broker_events.with_label_values(&[kind]);
            c.inc_by(value.saturating_sub(c.get()));
        }
        if let Some((in_use, max)) = self.pool_status.get().and_then(|status| status()) {
            self.pool.with_label_values(&["in_use"]).set(in_use as i64);
            self.pool.with_label_values(&["max"]).set(max as i64);
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding metrics");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// The histogram of `confab_delivery_latency_seconds`, by transport: the
/// one observed on every delivery. Its counts are spread over shards, one
/// per thread (each thread takes a slot once), each on cache lines of its
/// own, and summed at a scrape: an observation is two atomic adds that no
/// other thread contends for, where prometheus' `Histogram` made four on
/// lines every worker shares, one of them a compare-and-swap loop on the
/// sum (2-3 % of the server's samples under fan-out). Its `_count` is the
/// sum of its buckets; its `_sum` is read beside them, so a scrape during
/// deliveries may see it a few observations apart. Clones share the
/// counts (one is registered).
#[derive(Clone)]
pub(crate) struct DeliveryLatency {
    desc: Desc,
    /// Each bucket's upper bound, in nanoseconds.
    bounds: [u64; LATENCY_BUCKETS.len()],
    shards: std::sync::Arc<[[Shard; 2]]>,
}

/// Shards a histogram is spread over: more than the worker threads of most
/// machines. Threads beyond share slots (correct, only contended).
const SHARDS: usize = 16;

/// One thread slot's counts for one transport: a count per bucket (the
/// last past every bound) and the sum, in nanoseconds.
#[derive(Default)]
#[repr(align(128))]
struct Shard {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

/// This thread's slot among the [`SHARDS`].
fn shard_slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SLOT.with(|slot| *slot)
}

impl DeliveryLatency {
    fn new() -> DeliveryLatency {
        let desc = Desc::new(
            "confab_delivery_latency_seconds".into(),
            "From accepting a message to writing it to a recipient's socket.".into(),
            vec!["transport".into()],
            Default::default(),
        )
        .expect("valid metric");
        DeliveryLatency {
            desc,
            bounds: std::array::from_fn(|i| (LATENCY_BUCKETS[i] * 1e9) as u64),
            shards: (0..SHARDS).map(|_| Default::default()).collect(),
        }
    }

    fn observe(&self, transport: Transport, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let bucket = self.bounds.partition_point(|&bound| bound < ns);
        let shard = &self.shards[shard_slot()][transport as usize];
        shard.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        shard.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The counts per bucket (not cumulative) and the sum, in
    /// nanoseconds, over every shard.
    fn totals(&self, transport: Transport) -> ([u64; LATENCY_BUCKETS.len() + 1], u64) {
        let mut buckets = [0; LATENCY_BUCKETS.len() + 1];
        let mut sum = 0u64;
        for shards in self.shards.iter() {
            let shard = &shards[transport as usize];
            for (total, count) in buckets.iter_mut().zip(&shard.buckets) {
                *total += count.load(Ordering::Relaxed);
            }
            sum = sum.wrapping_add(shard.sum_ns.load(Ordering::Relaxed));
        }
        (buckets, sum)
    }

    /// Observations so far (for tests).
    #[cfg(test)]
    fn count(&self, transport: Transport) -> u64 {
        self.totals(transport).0.iter().sum()
    }
}

impl Collector for DeliveryLatency {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let metrics = Transport::ALL
            .map(|transport| {
                let (counts, sum_ns) = self.totals(transport);
                let mut cumulative = 0;
                let buckets = LATENCY_BUCKETS
                    .iter()
                    .zip(counts)
                    .map(|(&bound, count)| {
                        cumulative += count;
                        let mut bucket = proto::Bucket::default();
                        bucket.set_upper_bound(bound);
                        bucket.set_cumulative_count(cumulative);
                        bucket
                    })
                    .collect();
                let mut histogram = proto::Histogram::default();
                histogram.set_bucket(buckets);
                histogram.set_sample_count(counts.iter().sum());
                histogram.set_sample_sum(sum_ns as f64 / 1e9);
                let mut label = proto::LabelPair::default();
                label.set_name("transport".into());
                label.set_value(transport.label().into());
                let mut metric = proto::Metric::default();
                metric.set_label(vec![label]);
                metric.set_histogram(histogram);
                metric
            })
            .to_vec();
        let mut family = MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(MetricType::HISTOGRAM);
        family.set_metric(metrics);
        vec![family]
    }
}

impl Observer for Metrics {
    fn request(&self, kind: &'static str, result: Result<(), ErrorCode>, took: Duration) {
        let outcome = match result {
            Ok(()) => "ok",
            Err(code) => code.as_str(),
        };
        self.requests.with_label_values(&[kind, outcome]).inc();
        self.request_latency
            .with_label_values(&[kind])
            .observe(took.as_secs_f64());
        if matches!(kind, "register" | "login" | "guest" | "resume") {
            self.logins.with_label_values(&[kind, outcome]).inc();
        }
        if result == Err(ErrorCode::RateLimited) {
            self.rate_limited.with_label_values(&[kind]).inc();
        }
    }

    fn message_stored(&self) {
        self.messages_stored.inc();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use confab_proto::{Event, Message, Reply, SharedEvent};

    use super::*;

    fn event(event: Event, accepted: Option<Instant>) -> Outbound {
        Outbound::Event(Arc::new(SharedEvent::new(event).accepted_at(accepted)))
    }

    #[test]
    fn a_batch_counts_its_messages_and_their_latencies_only() {
        let metrics = Metrics::new();
        let message = || Event::Message(Message::default());
        let batch = [
            event(message(), Some(Instant::now())),
            // From another node: no accept time here.
            event(message(), None),
            event(
                Event::Presence {
                    user: "ann".into(),
                    online: true,
                },
                Some(Instant::now()),
            ),
            Outbound::Reply(Box::new(Reply {
                id: None,
                result: Ok(confab_proto::OkBody::Pong),
            })),
            event(message(), Some(Instant::now())),
        ];
        metrics.delivered(Transport::Line, batch.iter());
        metrics.delivered(Transport::Line, std::iter::empty());
        let line = Transport::Line as usize;
        assert_eq!(metrics.deliveries[line].get(), 3);
        assert_eq!(metrics.delivery_latency.count(Transport::Line), 2);
        assert_eq!(metrics.delivery_latency.count(Transport::Ws), 0);
        assert_eq!(metrics.deliveries[Transport::Ws as usize].get(), 0);
    }

    #[test]
    fn delivery_latency_counts_every_thread_s_observations_in_their_buckets() {
        let latency = DeliveryLatency::new();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        latency.observe(Transport::Ws, Duration::from_micros(70));
                    }
                    // Past every bound.
                    latency.observe(Transport::Ws, Duration::from_secs(3));
                });
            }
        });
        // On a bound: counted in it.
        latency.observe(Transport::Line, Duration::from_micros(50));
        let registry = Registry::new();
        registry.register(Box::new(latency.clone())).unwrap();
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        for line in [
            r#"confab_delivery_latency_seconds_bucket{transport="ws",le="0.00005"} 0"#,
            r#"confab_delivery_latency_seconds_bucket{transport="ws",le="0.0001"} 4000"#,
            r#"confab_delivery_latency_seconds_bucket{transport="ws",le="2.5"} 4000"#,
            r#"confab_delivery_latency_seconds_bucket{transport="ws",le="+Inf"} 4004"#,
            r#"confab_delivery_latency_seconds_sum{transport="ws"} 12.28"#,
            r#"confab_delivery_latency_seconds_count{transport="ws"} 4004"#,
            r#"confab_delivery_latency_seconds_bucket{transport="line",le="0.00005"} 1"#,
            r#"confab_delivery_latency_seconds_count{transport="line"} 1"#,
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }
}
