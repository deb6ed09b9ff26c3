// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket's messages. A request is one line of JSON such as
//! `{"command":"status"}` or `{"command":"set-gc-percent","value":50}`; the answer is one line
//! holding a [`Response`].

use serde::{Deserialize, Serialize};

use crate::cache::CacheStatus;

/// One request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
    SetGcPercent { value: u8 },
    Flush,
    Drain,
    Undrain,
    Metrics,
}

/// One answer: `ok`, and either `error` or what the request asked for.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The answer to `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// The answer to `metrics`: Prometheus text exposition format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

impl Response {
    pub fn done() -> Response {
        Response {
            ok: true,
            ..Response::default()
        }
    }

    pub fn failed(error: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(error.into()),
            ..Response::default()
        }
    }
}

/// The engine's part of `status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineStatus {
    /// `pcache` for the cache engine, `none` for `--cache none`.
    pub engine: String,
    pub capacity_bytes: u64,
    pub read_only: bool,
    /// The guest's write-cache setting.
    pub write_cache: bool,
    /// Between `drain` and `undrain`.
    pub drained: bool,
    /// Only with a cache.
    pub cache: Option<CacheStatus>,
}

/// The vhost-user frontend connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionStatus {
    /// A frontend is connected now.
    pub connected: bool,
    /// Frontend connections accepted since the daemon started.
    pub connections: u64,
}

/// Everything `status` answers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    #[serde(flatten)]
    pub engine: EngineStatus,
    pub connection: ConnectionStatus,
    /// Bytes written back per second over the last second (0 without a cache).
    pub writeback_rate_bytes_per_sec: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r: Request =
            serde_json::from_str(r#"{"command":"set-gc-percent","value":50}"#).expect("parses");
        assert_eq!(r, Request::SetGcPercent { value: 50 });
        assert_eq!(
            serde_json::to_string(&Request::Drain).unwrap(),
            r#"{"command":"drain"}"#
        );
        for bad in [
            r#"{"command":"explode"}"#,
            r#"{"command":"set-gc-percent","value":300}"#,
            r#"{"command":"set-gc-percent","percent":5}"#,
            "status",
        ] {
            assert!(
                serde_json::from_str::<Request>(bad).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn status_round_trips() {
        let s = Status {
            engine: EngineStatus {
                engine: "pcache".into(),
                capacity_bytes: 1 << 30,
                cache: Some(CacheStatus {
                    segments_total: 64,
                    gc_percent: 70,
                    ..CacheStatus::default()
                }),
                ..EngineStatus::default()
            },
            connection: ConnectionStatus {
                connected: true,
                connections: 3,
            },
            writeback_rate_bytes_per_sec: 42,
        };
        let text = serde_json::to_string(&s).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["engine"], "pcache", "engine fields are flattened: {text}");
        assert_eq!(v["cache"]["segments_total"], 64);
        assert_eq!(serde_json::from_str::<Status>(&text).unwrap(), s);
    }
}
