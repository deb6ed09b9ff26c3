// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `metrics`: the status in the Prometheus text exposition format (version 0.0.4), every name
//! prefixed `vhost_user_pcache_`.

use std::fmt::Write;

use super::Status;

const PREFIX: &str = "vhost_user_pcache_";

enum Kind {
    Gauge,
    Counter,
}

struct Writer(String);

impl Writer {
    fn metric(&mut self, name: &str, kind: Kind, help: &str, value: u64) {
        let kind = match kind {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        };
        let _ = writeln!(self.0, "# HELP {PREFIX}{name} {help}");
        let _ = writeln!(self.0, "# TYPE {PREFIX}{name} {kind}");
        let _ = writeln!(self.0, "{PREFIX}{name} {value}");
    }
}

/// Renders `status` as Prometheus text.
pub fn render_metrics(status: &Status) -> String {
    use Kind::{Counter, Gauge};
    let mut w = Writer(String::new());
    let e = &status.engine;
    let _ = writeln!(
        w.0,
        "# HELP {PREFIX}info Engine serving the disk (label engine: pcache or none).\n\
         # TYPE {PREFIX}info gauge\n\
         {PREFIX}info{{engine=\"{}\"}} 1",
        e.engine
    );
    w.metric(
        "capacity_bytes",
        Gauge,
        "Size of the disk in bytes.",
        e.capacity_bytes,
    );
    w.metric(
        "read_only",
        Gauge,
        "1 when the disk is read-only.",
        e.read_only.into(),
    );
    w.metric(
        "write_cache",
        Gauge,
        "1 when the guest has its write cache on.",
        e.write_cache.into(),
    );
    w.metric(
        "drained",
        Gauge,
        "1 between drain and undrain.",
        e.drained.into(),
    );
    w.metric(
        "connected",
        Gauge,
        "1 while a vhost-user frontend is connected.",
        status.connection.connected.into(),
    );
    w.metric(
        "connections_total",
        Counter,
        "Frontend connections accepted since start.",
        status.connection.connections,
    );
    let Some(c) = &e.cache else {
        return w.0;
    };
    let s = &c.stats;
    let gauges: [(&str, &str, u64); 11] = [
        ("segments", "Cache segments.", c.segments_total.into()),
        (
            "segments_used",
            "Cache segments in use (log and data).",
            c.segments_used.into(),
        ),
        (
            "gc_percent",
            "GC threshold in percent of segments used.",
            c.gc_percent.into(),
        ),
        (
            "data_crc",
            "1 when cached data is checksummed.",
            c.flags.data_crc.into(),
        ),
        (
            "writethrough",
            "1 when writes complete only once on the media log.",
            c.flags.writethrough.into(),
        ),
        (
            "dirty_bytes",
            "Bytes in the cache not yet written back.",
            s.dirty_bytes,
        ),
        (
            "writeback_rate_bytes_per_second",
            "Bytes written back per second over the last second.",
            status.writeback_rate_bytes_per_sec,
        ),
        (
            "key_head_seq",
            "Log sequence number of the next kset.",
            c.key_head.seq,
        ),
        (
            "dirty_tail_seq",
            "Log sequence number of the oldest kset not yet written back.",
            c.dirty_tail.seq,
        ),
        (
            "key_tail_seq",
            "Log sequence number of the oldest kset not yet reclaimed.",
            c.key_tail.seq,
        ),
        (
            "segment_data_bytes",
            "Bytes of data one cache segment holds.",
            c.segment_data_bytes.into(),
        ),
    ];
    for (name, help, value) in gauges {
        w.metric(name, Gauge, help, value);
    }
    let counters: [(&str, &str, u64); 10] = [
        (
            "read_hits_total",
            "Reads served entirely from the cache.",
            s.read_hits,
        ),
        (
            "read_misses_total",
            "Reads that needed the backing image.",
            s.read_misses,
        ),
        ("read_bytes_total", "Bytes read by the guest.", s.read_bytes),
        (
            "write_bytes_total",
            "Bytes written by the guest.",
            s.write_bytes,
        ),
        (
            "busy_total",
            "Requests held back because the cache had no room.",
            s.busy,
        ),
        (
            "crc_errors_total",
            "Cached extents that failed their data CRC.",
            s.crc_errors,
        ),
        (
            "writeback_bytes_total",
            "Bytes written back to the backing image.",
            s.writeback_bytes,
        ),
        (
            "writeback_errors_total",
            "Failed writeback attempts.",
            s.writeback_errors,
        ),
        (
            "gc_runs_total",
            "Ksets reclaimed by garbage collection.",
            s.gc_runs,
        ),
        (
            "gc_errors_total",
            "Garbage collection failures.",
            s.gc_errors,
        ),
    ];
    for (name, help, value) in counters {
        w.metric(name, Counter, help, value);
    }
    let h = &c.health;
    w.metric(
        "lost_extents_total",
        Counter,
        "Dirty extents given up because their cached data failed its CRC.",
        h.lost_extents,
    );
    w.metric(
        "lost_bytes_total",
        Counter,
        "Bytes of newest data in those extents, which never reached the backing image.",
        h.lost_bytes,
    );
    w.metric(
        "writeback_stalled",
        Gauge,
        "1 while writeback cannot go on (see ctl status), else 0.",
        u64::from(h.writeback_stalled.is_some()),
    );
    w.0
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
}
