//! The metrics in `OpenMetrics` text: every counter (see `mirror_common::counters`), what is
//! watched, and the agent's own state.
use std::time::SystemTime;

use mirror_common::{CounterField, Counters, HookCounters, Metric};
use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric, counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

use super::Labels;
use crate::{
    state::{Applied, Shared, Stats},
    targets::{
        TargetCounters,
        observe::HttpStats,
        shadow::{LATENCY_BUCKETS, Latency, ShadowStats},
    },
};

impl Shared {
    /// The counters of `stats` and the state of the agent in `OpenMetrics` text.
    pub(super) fn metrics(&self, stats: &Stats) -> anyhow::Result<String> {
        let mut registry = Registry::with_prefix("mirror");
        let rules = CounterFamilies::register(&mut registry, Counters::FIELDS);
        for session in &stats.sessions {
            for rule in &session.rules {
                let labels = vec![
                    ("session", session.name.clone()),
                    ("rule", rule.rule.clone()),
                ];
                rules.record(&labels, rule.counters.named());
            }
        }
        let hooks = CounterFamilies::register(&mut registry, HookCounters::FIELDS);
        for (name, hook) in [
            ("ingress", &stats.ingress),
            ("egress", &stats.egress),
            ("xdp", &stats.xdp),
            ("copy", &stats.copy),
        ] {
            hooks.record(&vec![("hook", name.to_owned())], hook.named());
        }
        self.applied().register_watching(&mut registry);
        self.register_agent(&mut registry, stats);
        register_shadows(
            &mut registry,
            stats.sessions.iter().filter_map(|session| {
                let labels = vec![("session", session.name.clone())];
                session.shadow.as_ref().map(|shadow| (labels, shadow))
            }),
        );
        register_http(
            &mut registry,
            stats
                .sessions
                .iter()
                .filter_map(|session| Some((session.name.as_str(), session.http.as_ref()?))),
        );
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        Ok(in_stable_order(&out))
    }

    /// The agent's own metrics: its build, its configuration's generation and last reload, its
    /// tasks, and what it counted of the targets (see `TargetCounters`).
    fn register_agent(&self, registry: &mut Registry, stats: &Stats) {
        let gauge = |registry: &mut Registry, name: &str, help: &str, value: i64| {
            let gauge = Gauge::<i64>::default();
            gauge.set(value);
            registry.register(name, help, gauge);
        };
        let build = Family::<Labels, Gauge>::default();
        registry.register(
            "build_info",
            "The agent's version (always 1)",
            build.clone(),
        );
        build
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_owned())])
            .set(1);
        gauge(
            registry,
            "config_generation",
            "The configuration applied: 1 at the start, one more with every reload",
            i64::try_from(stats.generation).unwrap_or(i64::MAX),
        );
        let last = *self
            .last_reload
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        gauge(
            registry,
            "config_last_reload_success",
            "1 when the last reload was applied (or there was none), 0 when it was rejected",
            i64::from(last.is_none_or(|(_, applied)| applied)),
        );
        gauge(
            registry,
            "config_last_reload_timestamp_seconds",
            "When the last reload was tried, seconds since the Unix epoch (0: none yet)",
            last.and_then(|(at, _)| at.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
        );
        let failed = Family::<Labels, Gauge>::default();
        registry.register(
            "task_failed",
            "1 for each of the agent's tasks that ended with an error (the agent is then not ready)",
            failed.clone(),
        );
        for task in self.failed_tasks().keys() {
            failed
                .get_or_create(&vec![("task", (*task).to_owned())])
                .set(1);
        }
        let targets = CounterFamilies::register(registry, TargetCounters::FIELDS);
        for session in &stats.sessions {
            targets.record(
                &vec![("session", session.name.clone())],
                session.target.named(),
            );
        }
        let dropped = counter_family(
            registry,
            "target_tx_dropped_packets",
            "Packets the kernel dropped on an interface copies leave by (a target interface or a tunnel's underlay; all its traffic, not only copies)",
        );
        let errors = counter_family(
            registry,
            "target_tx_error_packets",
            "Transmit errors the kernel counted on an interface copies leave by",
        );
        for loss in &stats.targets {
            let labels = vec![("interface", loss.interface.clone())];
            dropped.get_or_create(&labels).inc_by(loss.tx_dropped);
            errors.get_or_create(&labels).inc_by(loss.tx_errors);
        }
    }
}

impl Applied {
    /// The gauges of what is watched now: hooks by session, and the pods sessions select.
    fn register_watching(&self, registry: &mut Registry) {
        let attached = Family::<Labels, Gauge>::default();
        registry.register(
            "attached_hooks",
            "Watched (interface, direction) hooks, by session",
            attached.clone(),
        );
        for (session, hooks) in self.view.sessions.iter().zip(self.session_hooks()) {
            for (interface, direction) in hooks {
                attached
                    .get_or_create(&vec![
                        ("session", session.name.clone()),
                        ("interface", interface),
                        ("direction", direction),
                    ])
                    .set(1);
            }
        }
        let pods = Family::<Labels, Gauge>::default();
        registry.register(
            "selected_pods",
            "Pods a pod-selector session selects, by whether their interface is watched",
            pods.clone(),
        );
        for session in self.view.sessions.iter().filter(|s| s.selects_pods) {
            for watched in ["true", "false"] {
                let count = self
                    .pods
                    .iter()
                    .filter(|p| p.sessions.contains(&session.name))
                    .filter(|p| p.interface.is_some() == (watched == "true"))
                    .count();
                pods.get_or_create(&vec![
                    ("session", session.name.clone()),
                    ("watched", watched.to_owned()),
                ])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
            }
        }
    }
}

/// The metric families of a counters struct (see `mirror_common::Metric`): one per counter with a
/// family of its own, and `rule_copies_not_sent` with a `reason` label for the others.
struct CounterFamilies {
    own: Vec<Option<Family<Labels, Counter>>>,
    not_sent: Option<Family<Labels, Counter>>,
}

impl CounterFamilies {
    fn register(registry: &mut Registry, fields: &[CounterField]) -> Self {
        // The client adds the full stop the doc comments end with.
        let mut family = |name: &str, help: &str| {
            counter_family(registry, name, help.trim().trim_end_matches('.'))
        };
        let own = fields
            .iter()
            .map(|field| match field.metric {
                Metric::Own(name) => Some(family(name, field.help)),
                Metric::NotSent => None,
            })
            .collect();
        let not_sent = fields
            .iter()
            .any(|field| field.metric == Metric::NotSent)
            .then(|| family("rule_copies_not_sent", "Copies not made, by reason"));
        CounterFamilies { own, not_sent }
    }

    /// Records one struct's counters under `labels`.
    fn record<'a>(&self, labels: &Labels, counters: impl Iterator<Item = (&'a CounterField, u64)>) {
        for ((field, value), own) in counters.zip(&self.own) {
            if let Some(family) = own {
                family.get_or_create(labels).inc_by(value);
            } else if let Some(family) = &self.not_sent {
                let mut labels = labels.clone();
                labels.push(("reason", field.name.to_owned()));
                family.get_or_create(&labels).inc_by(value);
            }
        }
    }
}

/// Registers a family of counters labelled alike.
/// What shadow targets did with the requests they saw, and what compare found; each labelled
/// with its labels (the agent's by session, the collector's by shadow).
pub(crate) fn register_shadows<'a>(
    registry: &mut Registry,
    shadows: impl Iterator<Item = (Labels, &'a ShadowStats)>,
) {
    let requests = counter_family(
        registry,
        "shadow_requests",
        "Requests a shadow session saw, by outcome: replayed (the shadow answered), or the reason it was lost (see the README's Shadow a service)",
    );
    let compared = counter_family(
        registry,
        "shadow_compared",
        "Replayed exchanges compared with the live answer, by result: same, differ, or error (no whole live answer)",
    );
    let latencies = Family::<Labels, CountedHistogram>::default();
    registry.register_with_unit(
        "shadow_latency",
        "From a request's last byte to its answer's first, by answer: live (as seen on the wire) or shadow (the replay's)",
        Unit::Seconds,
        latencies.clone(),
    );
    let with = |labels: &Labels, name: &'static str, value: &str| {
        let mut labels = labels.clone();
        labels.push((name, value.to_owned()));
        labels
    };
    for (labels, shadow) in shadows {
        let outcomes = std::iter::once(("replayed", shadow.replayed))
            .chain(shadow.lost.named().map(|(field, n)| (field.name, n)));
        for (outcome, n) in outcomes {
            requests
                .get_or_create(&with(&labels, "outcome", outcome))
                .inc_by(n);
        }
        for (result, n) in [
            ("same", shadow.compared.same),
            ("differ", shadow.compared.differ),
            ("error", shadow.compared.errors),
        ] {
            compared
                .get_or_create(&with(&labels, "result", result))
                .inc_by(n);
        }
        for (answer, latency) in [
            ("live", &shadow.live_latency),
            ("shadow", &shadow.shadow_latency),
        ] {
            latencies
                .get_or_create(&with(&labels, "answer", answer))
                .set(latency);
        }
    }
}

/// What observed sessions counted of their services: requests by method, status class (and
/// route, with routes set), and their durations.
fn register_http<'a>(
    registry: &mut Registry,
    sessions: impl Iterator<Item = (&'a str, &'a HttpStats)>,
) {
    let requests = counter_family(
        registry,
        "http_requests",
        "HTTP requests an observed session saw, by service (its destination), method, status class (unanswered: no whole answer seen), route (with routes set), and for gRPC calls grpc_method and grpc_code",
    );
    let unread = counter_family(
        registry,
        "http_unread_requests",
        "HTTP requests an observed session knows only by the bytes they left missing, so of no service, by reason: ring_full, gap, unreadable, undecodable",
    );
    let durations = Family::<Labels, CountedHistogram>::default();
    registry.register_with_unit(
        "http_request_duration",
        "From a request's first byte to its answer's last, as the wire saw them, by service",
        Unit::Seconds,
        durations.clone(),
    );
    for (session, http) in sessions {
        for (reason, n) in [
            ("ring_full", http.unread.ring_full),
            ("gap", http.unread.gap),
            ("unreadable", http.unread.unreadable),
            ("undecodable", http.unread.undecodable),
        ] {
            unread
                .get_or_create(&vec![
                    ("session", session.to_owned()),
                    ("reason", reason.to_owned()),
                ])
                .inc_by(n);
        }
        for service in &http.services {
            let labels = vec![
                ("session", session.to_owned()),
                ("service", service.service.clone()),
            ];
            for series in &service.requests {
                let mut labels = labels.clone();
                labels.push(("method", series.method.clone()));
                labels.push(("status_class", series.status_class.clone()));
                for (name, value) in [
                    ("route", &series.route),
                    ("grpc_method", &series.grpc_method),
                    ("grpc_code", &series.grpc_code),
                ] {
                    if let Some(value) = value {
                        labels.push((name, value.clone()));
                    }
                }
                requests.get_or_create(&labels).inc_by(series.count);
            }
            durations.get_or_create(&labels).set(&service.duration);
        }
    }
}

/// A histogram the shadow session filled: its buckets are given whole, not observed here.
#[derive(Debug, Default)]
struct CountedHistogram(std::sync::Mutex<Latency>);

impl CountedHistogram {
    fn set(&self, latency: &Latency) {
        if let Ok(mut mine) = self.0.lock() {
            mine.clone_from(latency);
        }
    }
}

impl TypedMetric for CountedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for CountedHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let latency = self.0.lock().map_err(|_| std::fmt::Error)?;
        let bounds = LATENCY_BUCKETS.iter().copied().chain([f64::INFINITY]);
        // A session that has seen no answer has no buckets yet: all of them empty.
        let counts = latency.buckets.iter().copied().chain(std::iter::repeat(0));
        let buckets: Vec<(f64, u64)> = bounds.zip(counts).collect();
        encoder.encode_histogram::<NoLabelSet>(latency.sum_seconds, latency.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// `OpenMetrics` text with each family's series sorted by their labels: prometheus-client keeps
/// them in hash order, which changes from one scrape to the next. A histogram's lines of one
/// label set (its buckets, sum and count) stay together, in their order.
pub(crate) fn in_stable_order(text: &str) -> String {
    fn flush(series: &mut Vec<(String, Vec<&str>)>, out: &mut String) {
        series.sort_by(|a, b| a.0.cmp(&b.0));
        for line in series.drain(..).flat_map(|(_, lines)| lines) {
            out.push_str(line);
            out.push('\n');
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut series: Vec<(String, Vec<&str>)> = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            flush(&mut series, &mut out);
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let key = series_labels(line);
        match series.last_mut() {
            Some((last, lines)) if *last == key => lines.push(line),
            _ => series.push((key, vec![line])),
        }
    }
    flush(&mut series, &mut out);
    out
}

/// A sample line's labels, a bucket's `le` left out: what its series is known by.
fn series_labels(line: &str) -> String {
    let Some((_, labels)) = line.split_once('{') else {
        return String::new();
    };
    let labels = labels.rsplit_once('}').map_or(labels, |(labels, _)| labels);
    labels
        .split(',')
        .filter(|pair| !pair.starts_with("le="))
        .collect::<Vec<_>>()
        .join(",")
}

pub(crate) fn counter_family(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    registry.register(name, help, family.clone());
    family
}

#[cfg(test)]
mod tests {
    #[test]
    fn series_come_out_sorted_by_their_labels_with_histograms_whole() {
        let text = "\
# HELP mirror_rule_copies Copies.
# TYPE mirror_rule_copies counter
mirror_rule_copies_total{session=\"web\",rule=\"filter-1\"} 3
mirror_rule_copies_total{session=\"dns\",rule=\"default\"} 0
mirror_rule_copies_total{session=\"dns\",rule=\"filter-1\"} 7
# HELP mirror_shadow_latency_seconds Latency.
# TYPE mirror_shadow_latency_seconds histogram
mirror_shadow_latency_seconds_sum{session=\"web\"} 0.5
mirror_shadow_latency_seconds_count{session=\"web\"} 2
mirror_shadow_latency_seconds_bucket{le=\"0.1\",session=\"web\"} 1
mirror_shadow_latency_seconds_bucket{le=\"+Inf\",session=\"web\"} 2
mirror_shadow_latency_seconds_sum{session=\"api\"} 0
mirror_shadow_latency_seconds_count{session=\"api\"} 0
mirror_shadow_latency_seconds_bucket{le=\"0.1\",session=\"api\"} 0
mirror_shadow_latency_seconds_bucket{le=\"+Inf\",session=\"api\"} 0
# EOF
";
        let sorted = super::in_stable_order(text);
        let lines: Vec<&str> = sorted.lines().collect();
        assert_eq!(lines.len(), text.lines().count());
        assert_eq!(
            lines[2..5],
            [
                "mirror_rule_copies_total{session=\"dns\",rule=\"default\"} 0",
                "mirror_rule_copies_total{session=\"dns\",rule=\"filter-1\"} 7",
                "mirror_rule_copies_total{session=\"web\",rule=\"filter-1\"} 3",
            ]
        );
        assert!(
            lines[7].contains("api") && lines[7].contains("_sum"),
            "{sorted}"
        );
        assert!(
            lines[10].contains("api") && lines[10].contains("+Inf"),
            "{sorted}"
        );
        assert!(
            lines[11].contains("web") && lines[11].contains("_sum"),
            "{sorted}"
        );
        assert_eq!(lines.last(), Some(&"# EOF"));
        // Already sorted, it is unchanged.
        assert_eq!(super::in_stable_order(&sorted), sorted);
    }
}
