// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `serve --config FILE`: every `serve` flag as a key of a TOML file, named exactly like the
//! long flag (`queue-size = 256`, `cache-size = "2G"`). Flags given on the command line win.
//!
//! The file is checked key by key, so an unknown key or a bad value is an error that names the
//! key rather than a position in the file.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use toml::Value;

use super::serve::{parse_cache, CacheArg, MAX_POLL_US};
use super::size::parse_size;
use vhost_user_pcache::cache::format::MAX_GC_PERCENT;
use vhost_user_pcache::cache::media::Persistence;
use vhost_user_pcache::cache::pacing::parse_watermarks;

/// Every key a config file may hold, in `--help` order.
pub const KEYS: [&str; 18] = [
    "socket",
    "backing",
    "create-backing",
    "queues",
    "queue-size",
    "poll-us",
    "read-only",
    "serial",
    "cache",
    "cache-size",
    "persistence",
    "data-crc",
    "gc-percent",
    "writeback-watermarks",
    "writeback-idle-ms",
    "drain-on-exit",
    "control-socket",
    "state-file",
];

/// The settings a config file gave; `None` where it said nothing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FileConfig {
    pub socket: Option<PathBuf>,
    pub backing: Option<PathBuf>,
    pub create_backing: Option<u64>,
    pub queues: Option<u16>,
    pub queue_size: Option<u16>,
    pub poll_us: Option<u32>,
    pub read_only: Option<bool>,
    pub serial: Option<String>,
    pub cache: Option<CacheArg>,
    pub cache_size: Option<u64>,
    pub persistence: Option<Persistence>,
    pub data_crc: Option<bool>,
    pub gc_percent: Option<u8>,
    pub writeback_watermarks: Option<(u8, u8)>,
    pub writeback_idle_ms: Option<u64>,
    pub drain_on_exit: Option<bool>,
    pub control_socket: Option<PathBuf>,
    pub state_file: Option<PathBuf>,
}

/// Reads and checks the config file at `path`.
pub fn load(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    parse(&text).with_context(|| format!("config file {}", path.display()))
}

/// Parses config file text.
pub fn parse(text: &str) -> Result<FileConfig> {
    let table: toml::Table = text.parse().context("not valid TOML")?;
    let mut c = FileConfig::default();
    for (key, value) in table {
        set(&mut c, &key, value).with_context(|| format!("key `{key}`"))?;
    }
    Ok(c)
}

fn set(c: &mut FileConfig, key: &str, value: Value) -> Result<()> {
    match key {
        "socket" => c.socket = Some(path(value)?),
        "backing" => c.backing = Some(path(value)?),
        "create-backing" => c.create_backing = Some(size(value)?),
        "queues" => c.queues = Some(typed(value)?),
        "queue-size" => c.queue_size = Some(typed(value)?),
        "poll-us" => {
            let us: u32 = typed(value)?;
            if us > MAX_POLL_US {
                bail!("{us} is out of range 0..={MAX_POLL_US}");
            }
            c.poll_us = Some(us);
        }
        "read-only" => c.read_only = Some(typed(value)?),
        "serial" => c.serial = Some(typed(value)?),
        "cache" => c.cache = Some(parse_cache(&typed::<String>(value)?).map_err(|e| anyhow!(e))?),
        "cache-size" => c.cache_size = Some(size(value)?),
        "persistence" => {
            let mode: String = typed(value)?;
            c.persistence = Some(
                mode.parse()
                    .map_err(|_| anyhow!("{mode:?} is not one of pmem, msync, volatile"))?,
            );
        }
        "data-crc" => c.data_crc = Some(typed(value)?),
        "gc-percent" => {
            let percent: u8 = typed(value)?;
            if percent > MAX_GC_PERCENT {
                bail!("{percent} is out of range 0..={MAX_GC_PERCENT}");
            }
            c.gc_percent = Some(percent);
        }
        "writeback-watermarks" => {
            let text: String = typed(value)?;
            c.writeback_watermarks = Some(parse_watermarks(&text)?);
        }
        "writeback-idle-ms" => c.writeback_idle_ms = Some(typed(value)?),
        "drain-on-exit" => c.drain_on_exit = Some(typed(value)?),
        "control-socket" => c.control_socket = Some(path(value)?),
        "state-file" => c.state_file = Some(path(value)?),
        _ => bail!("unknown key (known keys: {})", KEYS.join(", ")),
    }
    Ok(())
}

fn typed<T: DeserializeOwned>(value: Value) -> Result<T> {
    T::deserialize(value).map_err(|e| anyhow!("{}", e.to_string().trim()))
}

fn path(value: Value) -> Result<PathBuf> {
    let p: String = typed(value)?;
    if p.is_empty() {
        bail!("an empty path");
    }
    Ok(PathBuf::from(p))
}

/// A size as a string with a suffix ("64M") or a number of bytes.
fn size(value: Value) -> Result<u64> {
    let text = match value {
        Value::String(s) => s,
        Value::Integer(n) => n.to_string(),
        other => bail!(
            "expected a size like \"64M\" or a number of bytes, found a {}",
            other.type_str()
        ),
    };
    parse_size(&text).map_err(|e| anyhow!(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        format!("{:#}", parse(text).expect_err("accepted"))
    }

    #[test]
    fn every_key_is_read() {
        let c = parse(
            r#"
            socket = "/run/vm1.sock"
            backing = "/images/vm1.img"
            create-backing = "10G"
            queues = 2
            queue-size = 256
            poll-us = 50
            read-only = false
            serial = "vm1"
            cache = "/dev/dax0.0"
            cache-size = 1073741824
            persistence = "msync"
            data-crc = true
            gc-percent = 50
            writeback-watermarks = "90,50"
            writeback-idle-ms = 250
            drain-on-exit = true
            control-socket = "/run/vm1.ctl"
            "#,
        )
        .expect("valid");
        assert_eq!(c.socket, Some(PathBuf::from("/run/vm1.sock")));
        assert_eq!(c.create_backing, Some(10 << 30));
        assert_eq!(c.queues, Some(2));
        assert_eq!(c.queue_size, Some(256));
        assert_eq!(c.poll_us, Some(50));
        assert!(error_of("poll-us = 1001").contains("out of range"));
        assert_eq!(c.read_only, Some(false));
        assert_eq!(c.cache, Some(CacheArg::Media("/dev/dax0.0".into())));
        assert_eq!(c.cache_size, Some(1 << 30));
        assert_eq!(c.persistence, Some(Persistence::Msync));
        assert_eq!(c.gc_percent, Some(50));
        assert_eq!(c.writeback_watermarks, Some((90, 50)));
        assert_eq!(c.writeback_idle_ms, Some(250));
        assert_eq!(c.control_socket, Some(PathBuf::from("/run/vm1.ctl")));
        assert_eq!(
            parse("cache = \"none\"").unwrap().cache,
            Some(CacheArg::None)
        );
    }

    #[test]
    fn the_key_list_matches_what_is_read() {
        // Every listed key is accepted (with a wrong type it fails for the value, not the key).
        for key in KEYS {
            let e = error_of(&format!("{key} = [1]"));
            assert!(!e.contains("unknown key"), "{key}: {e}");
            assert!(e.contains(&format!("key `{key}`")), "{key}: {e}");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = error_of("queues = 2\nqueue_size = 4");
        assert!(
            e.contains("key `queue_size`") && e.contains("unknown key"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("queues = \"four\"", "queues"),
            ("queues = 70000", "queues"),
            ("gc-percent = 95", "gc-percent"),
            ("cache-size = \"12X\"", "cache-size"),
            ("cache-size = 100", "cache-size"),
            ("create-backing = true", "create-backing"),
            ("persistence = \"fast\"", "persistence"),
            ("read-only = \"yes\"", "read-only"),
            ("socket = \"\"", "socket"),
            ("cache = \"\"", "cache"),
        ] {
            let e = error_of(text);
            assert!(e.contains(&format!("key `{key}`")), "{text}: {e}");
        }
    }

    #[test]
    fn syntax_errors_are_reported() {
        assert!(error_of("queues = ").contains("not valid TOML"));
    }
}
