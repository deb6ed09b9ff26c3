// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `metrics`: the status in the Prometheus text exposition format (version 0.0.4), every name
//! prefixed `vhost_user_pcache_`.

use std::fmt::Write;

use super::Status;
use crate::cache::CacheStatus;

const PREFIX: &str = "vhost_user_pcache_";

enum Kind {
    Gauge,
    Counter,
}

use Kind::{Counter, Gauge};

/// One metric: its name after [`PREFIX`], its type, its help text and where its value comes
/// from.
struct Metric<F> {
    name: &'static str,
    kind: Kind,
    help: &'static str,
    value: F,
}

/// Reads a metric of every engine.
type EngineValue = fn(&Status) -> u64;
/// Reads a metric of the cache engine.
type CacheValue = fn(&Status, &CacheStatus) -> u64;

/// Metrics of every engine.
const COMMON: &[Metric<EngineValue>] = &[
    Metric {
        name: "capacity_bytes",
        kind: Gauge,
        help: "Size of the disk in bytes.",
        value: |s| s.engine.capacity_bytes,
    },
    Metric {
        name: "read_only",
        kind: Gauge,
        help: "1 when the disk is read-only.",
        value: |s| s.engine.read_only.into(),
    },
    Metric {
        name: "write_cache",
        kind: Gauge,
        help: "1 when the guest has its write cache on.",
        value: |s| s.engine.write_cache.into(),
    },
    Metric {
        name: "drained",
        kind: Gauge,
        help: "1 between drain and undrain.",
        value: |s| s.engine.drained.into(),
    },
    Metric {
        name: "connected",
        kind: Gauge,
        help: "1 while a vhost-user frontend is connected.",
        value: |s| s.connection.connected.into(),
    },
    Metric {
        name: "connections_total",
        kind: Counter,
        help: "Frontend connections accepted since start.",
        value: |s| s.connection.connections,
    },
];

/// Metrics of the cache engine only.
const CACHE: &[Metric<CacheValue>] = &[
    Metric {
        name: "segments",
        kind: Gauge,
        help: "Cache segments.",
        value: |_, c| c.segments_total.into(),
    },
    Metric {
        name: "segments_used",
        kind: Gauge,
        help: "Cache segments in use (log and data).",
        value: |_, c| c.segments_used.into(),
    },
    Metric {
        name: "gc_percent",
        kind: Gauge,
        help: "GC threshold in percent of segments used.",
        value: |_, c| c.gc_percent.into(),
    },
    Metric {
        name: "data_crc",
        kind: Gauge,
        help: "1 when cached data is checksummed.",
        value: |_, c| c.flags.data_crc.into(),
    },
    Metric {
        name: "writethrough",
        kind: Gauge,
        help: "1 when writes complete only once on the media log.",
        value: |_, c| c.flags.writethrough.into(),
    },
    Metric {
        name: "dirty_bytes",
        kind: Gauge,
        help: "Bytes in the cache not yet written back.",
        value: |_, c| c.stats.dirty_bytes,
    },
    Metric {
        name: "writeback_rate_bytes_per_second",
        kind: Gauge,
        help: "Bytes written back per second over the last second.",
        value: |s, _| s.writeback_rate_bytes_per_sec,
    },
    Metric {
        name: "key_head_seq",
        kind: Gauge,
        help: "Log sequence number of the next kset.",
        value: |_, c| c.key_head.seq,
    },
    Metric {
        name: "dirty_tail_seq",
        kind: Gauge,
        help: "Log sequence number of the oldest kset not yet written back.",
        value: |_, c| c.dirty_tail.seq,
    },
    Metric {
        name: "key_tail_seq",
        kind: Gauge,
        help: "Log sequence number of the oldest kset not yet reclaimed.",
        value: |_, c| c.key_tail.seq,
    },
    Metric {
        name: "segment_data_bytes",
        kind: Gauge,
        help: "Bytes of data one cache segment holds.",
        value: |_, c| c.segment_data_bytes.into(),
    },
    Metric {
        name: "read_hits_total",
        kind: Counter,
        help: "Reads served entirely from the cache.",
        value: |_, c| c.stats.read_hits,
    },
    Metric {
        name: "read_misses_total",
        kind: Counter,
        help: "Reads that needed the backing image.",
        value: |_, c| c.stats.read_misses,
    },
    Metric {
        name: "read_bytes_total",
        kind: Counter,
        help: "Bytes read by the guest.",
        value: |_, c| c.stats.read_bytes,
    },
    Metric {
        name: "write_bytes_total",
        kind: Counter,
        help: "Bytes written by the guest.",
        value: |_, c| c.stats.write_bytes,
    },
    Metric {
        name: "busy_total",
        kind: Counter,
        help: "Requests held back because the cache had no room.",
        value: |_, c| c.stats.busy,
    },
    Metric {
        name: "journal_full_total",
        kind: Counter,
        help: "Writes held because the process-kill journal was full (the key log fell behind).",
        value: |_, c| c.stats.journal_full,
    },
    Metric {
        name: "crc_errors_total",
        kind: Counter,
        help: "Cached extents that failed their data CRC.",
        value: |_, c| c.stats.crc_errors,
    },
    Metric {
        name: "writeback_bytes_total",
        kind: Counter,
        help: "Bytes written back to the backing image.",
        value: |_, c| c.stats.writeback_bytes,
    },
    Metric {
        name: "writeback_errors_total",
        kind: Counter,
        help: "Failed writeback attempts.",
        value: |_, c| c.stats.writeback_errors,
    },
    Metric {
        name: "gc_runs_total",
        kind: Counter,
        help: "Ksets reclaimed by garbage collection.",
        value: |_, c| c.stats.gc_runs,
    },
    Metric {
        name: "gc_errors_total",
        kind: Counter,
        help: "Garbage collection failures.",
        value: |_, c| c.stats.gc_errors,
    },
    Metric {
        name: "lost_extents_total",
        kind: Counter,
        help: "Dirty extents given up because their cached data failed its CRC.",
        value: |_, c| c.health.lost_extents,
    },
    Metric {
        name: "lost_bytes_total",
        kind: Counter,
        help: "Bytes of newest data in those extents, which never reached the backing image.",
        value: |_, c| c.health.lost_bytes,
    },
    Metric {
        name: "writeback_stalled",
        kind: Gauge,
        help: "1 while writeback cannot go on (see ctl status), else 0.",
        value: |_, c| u64::from(c.health.writeback_stalled.is_some()),
    },
];

fn write_metric<F>(out: &mut String, metric: &Metric<F>, value: u64) {
    let (name, help) = (metric.name, metric.help);
    let kind = match metric.kind {
        Gauge => "gauge",
        Counter => "counter",
    };
    let _ = writeln!(out, "# HELP {PREFIX}{name} {help}");
    let _ = writeln!(out, "# TYPE {PREFIX}{name} {kind}");
    let _ = writeln!(out, "{PREFIX}{name} {value}");
}

/// Renders `status` as Prometheus text: the engine's name as a label, the metrics of every
/// engine, then those of the cache when there is one.
pub fn render_metrics(status: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP {PREFIX}info Engine serving the disk (label engine: pcache or none).\n\
         # TYPE {PREFIX}info gauge\n\
         {PREFIX}info{{engine=\"{}\"}} 1",
        status.engine.engine
    );
    for metric in COMMON {
        write_metric(&mut out, metric, (metric.value)(status));
    }
    if let Some(cache) = &status.engine.cache {
        for metric in CACHE {
            write_metric(&mut out, metric, (metric.value)(status, cache));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheStatus;
    use crate::control::EngineStatus;

    fn samples(text: &str) -> Vec<(String, u64)> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (name, value) = l.rsplit_once(' ').expect("name value");
                (name.to_string(), value.parse().expect("integer value"))
            })
            .collect()
    }

    #[test]
    fn cache_metrics_carry_the_counters() {
        let mut cache = CacheStatus {
            segments_total: 64,
            ..CacheStatus::default()
        };
        cache.stats.read_hits = 17;
        let status = Status {
            engine: EngineStatus {
                engine: "pcache".into(),
                cache: Some(cache),
                ..EngineStatus::default()
            },
            ..Status::default()
        };
        let text = render_metrics(&status);
        let s = samples(&text);
        assert!(s.iter().all(|(n, _)| n.starts_with(PREFIX)), "{text}");
        assert!(s.contains(&("vhost_user_pcache_read_hits_total".into(), 17)));
        assert!(s.contains(&("vhost_user_pcache_segments".into(), 64)));
        assert!(s.contains(&("vhost_user_pcache_info{engine=\"pcache\"}".into(), 1)));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split(' ').nth(2).unwrap();
            assert_eq!(
                text.matches(&format!("# TYPE {name} ")).count(),
                1,
                "{name}"
            );
        }
    }

    #[test]
    fn no_cache_metrics_stop_after_the_common_ones() {
        let status = Status {
            engine: EngineStatus {
                engine: "none".into(),
                ..EngineStatus::default()
            },
            ..Status::default()
        };
        let text = render_metrics(&status);
        assert!(text.contains("vhost_user_pcache_connected 0"));
        assert!(!text.contains("dirty_bytes"));
    }

    /// Sets every number in `value` to a different value of 2 or more, every flag to true.
    fn distinct_numbers(value: &mut serde_json::Value, next: &mut u64) {
        match value {
            serde_json::Value::Number(_) => {
                *next += 1;
                *value = (*next).into();
            }
            serde_json::Value::Bool(_) => *value = true.into(),
            serde_json::Value::Array(a) => a.iter_mut().for_each(|v| distinct_numbers(v, next)),
            serde_json::Value::Object(o) => o.values_mut().for_each(|v| distinct_numbers(v, next)),
            _ => {}
        }
    }

    #[test]
    fn every_counting_metric_reads_a_field_of_its_own() {
        let mut status = Status::default();
        status.engine.cache = Some(CacheStatus::default());
        let mut json = serde_json::to_value(&status).unwrap();
        distinct_numbers(&mut json, &mut 1);
        let status: Status = serde_json::from_value(json).unwrap();
        let text = render_metrics(&status);
        let mut values: Vec<u64> = samples(&text)
            .into_iter()
            .map(|(_, v)| v)
            .filter(|&v| v > 1)
            .collect();
        let count = values.len();
        values.sort_unstable();
        values.dedup();
        assert_eq!(values.len(), count, "two metrics show one field:\n{text}");
        assert!(count >= 20, "{text}");
    }
}
