// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `serve`: its flags, the backing image, the choice of engine, and the serve loop.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use log::info;

use super::config;
use super::size::parse_size;
use vhost_user_pcache::backing::{BackingImage, BackingOptions};
use vhost_user_pcache::cache::format::{Layout, MAX_GC_PERCENT};
use vhost_user_pcache::cache::media::Persistence;
use vhost_user_pcache::cache::pacing::{parse_watermarks, PacingOptions};
use vhost_user_pcache::cache::replay::min_segments;
use vhost_user_pcache::cache::{CacheEngine, CacheOptions, SEGMENT_SIZE};
use vhost_user_pcache::control::{CacheControl, ControlServer, ControlTarget, PassthroughControl};
use vhost_user_pcache::engine::Engine;
use vhost_user_pcache::file_lock::{LockedObject, PathLock};
use vhost_user_pcache::passthrough::PassthroughEngine;
use vhost_user_pcache::serve::{self, ConnectionState, ServeConfig};

/// Backing image used when `--backing` is not given, in the current directory.
pub const DEFAULT_BACKING: &str = "vhost-user-pcache.img";
/// Size of the default backing image when it has to be created.
pub const DEFAULT_BACKING_SIZE: u64 = 4 << 30;
/// Largest cache file created by default (smaller when the image is smaller).
pub const DEFAULT_CACHE_SIZE: u64 = 1 << 30;

#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    /// Read settings from a TOML file; flags given here win
    #[arg(
        long,
        value_name = "FILE",
        long_help = "Read settings from a TOML file whose keys are the long names of these flags \
                     (socket, backing, create-backing, queues, queue-size, poll-us, read-only, serial, \
                     cache, cache-size, persistence, data-crc, gc-percent, writeback-watermarks, \
                     writeback-idle-ms, drain-on-exit, control-socket, state-file), for example `queue-size = 256` or `cache-size = \"2G\"`. \
                     A flag given on the command line wins over the file. An unknown key or a bad \
                     value is an error naming the key."
    )]
    config: Option<PathBuf>,

    /// vhost-user socket to listen on (required, here or in the config file)
    #[arg(
        long,
        value_name = "PATH",
        long_help = "Unix socket the daemon listens on for the vhost-user frontend (QEMU \
                     `-chardev socket,path=PATH`, Cloud Hypervisor `--disk vhost_user=true,socket=PATH`). \
                     An existing file at PATH is replaced. The socket stays open across frontend \
                     reconnects. Required, on the command line or as `socket` in the config file."
    )]
    socket: Option<PathBuf>,

    /// Backing image [default: ./vhost-user-pcache.img]
    #[arg(
        long,
        value_name = "IMAGE",
        long_help = "Raw image file or block device holding the disk's data. Without this flag \
                     the daemon uses vhost-user-pcache.img in the current directory and creates \
                     it as a 4 GiB sparse file if it is missing."
    )]
    backing: Option<PathBuf>,

    /// Create the backing image with this size if it does not exist
    #[arg(
        long,
        value_name = "SIZE",
        value_parser = parse_size,
        long_help = "If the backing image does not exist, create it as a sparse file of SIZE \
                     bytes. SIZE accepts the suffixes K, M, G and T (powers of 1024) and must be \
                     a multiple of 512. An existing image is used as it is."
    )]
    create_backing: Option<u64>,

    /// Number of virtqueues [default: 4]
    #[arg(
        long,
        value_name = "N",
        long_help = "Number of virtqueues offered to the guest, each served by its own thread \
                     (1 to 64). The frontend may use fewer; QEMU's num-queues must not exceed it. \
                     [default: 4]"
    )]
    queues: Option<u16>,

    /// Largest virtqueue size accepted [default: 1024]
    #[arg(
        long,
        value_name = "N",
        long_help = "Largest virtqueue size a frontend may configure (a power of two up to \
                     32768). QEMU's queue-size property must be at most this. [default: 1024]"
    )]
    queue_size: Option<u16>,

    /// Microseconds a queue polls its ring once it runs empty, 0 for never [default: 32; 0 with --cache none]
    #[arg(
        long,
        value_name = "US",
        value_parser = clap::value_parser!(u32).range(..=MAX_POLL_US as i64),
        long_help = "After a queue's ring runs empty, its thread keeps guest notifications off \
                     and polls the ring for up to US microseconds (unless the engine still \
                     holds requests, whose completion wakes it) before it turns notifications \
                     back on and sleeps: a request arriving meanwhile costs no guest kick and \
                     no thread wake-up, which lowers latency at low queue depths. The window adapts per queue: it shrinks to nothing \
                     once fewer than half of the queue's last 16 idle periods were US or \
                     shorter (a guest gone quiet), and grows back while requests come close \
                     together. The cost is CPU time: a busy queue's thread can spin for up to US \
                     microseconds after each burst. 0 turns polling off; at most 1000. \
                     [default: 32; 0 with --cache none, where every request waits on the \
                     backing image and polling measured slower]"
    )]
    poll_us: Option<u32>,

    /// Refuse writes
    #[arg(
        long,
        long_help = "Offer a read-only disk (VIRTIO_BLK_F_RO) and open the backing image \
                     read-only. Writes, write-zeroes and discards fail with an I/O error."
    )]
    read_only: bool,

    /// Serial number reported to the guest [default: backing image file name]
    #[arg(
        long,
        value_name = "ID",
        long_help = "Serial number answered to VIRTIO_BLK_T_GET_ID (visible in the guest as \
                     /sys/block/vdX/serial), at most 20 bytes; longer values are cut. Defaults \
                     to the backing image's file name."
    )]
    serial: Option<String>,

    /// Cache media, or `none` [default: IMAGE.pcache]
    #[arg(
        long,
        value_name = "PATH|none",
        value_parser = parse_cache,
        long_help = "Persistent-memory cache in front of the backing image: a devdax device \
                     (/dev/daxX.Y), a file on a DAX file system (mapped with MAP_SYNC), or an \
                     ordinary file (persisted with msync; weaker than pmem but crash-safe). A new \
                     or unformatted media is formatted; an existing cache is replayed and must \
                     belong to this backing image. Without the flag the cache is IMAGE.pcache \
                     beside the backing image, created if missing. `none` serves the backing \
                     image directly, without a cache."
    )]
    cache: Option<CacheArg>,

    /// Size of a cache file to create [default: 1G, or the image size if smaller]
    #[arg(
        long,
        value_name = "SIZE",
        value_parser = parse_size,
        long_help = "Size of the cache file when it has to be created (suffixes K, M, G, T). It is \
                     used in whole 16 MiB segments; a cache needs at least queues + 4 segments, \
                     and is made that large if SIZE is smaller. Ignored for an existing cache or \
                     a devdax device."
    )]
    cache_size: Option<u64>,

    /// How cache writes are made durable: pmem, msync or volatile [default: detected]
    #[arg(
        long,
        value_name = "MODE",
        long_help = "pmem: CPU cache-line write-back and store fence from userspace; needs a \
                     devdax device or a DAX file mapped with MAP_SYNC. msync: msync of the \
                     written pages, for ordinary files. volatile: nothing is persisted, so a \
                     crash of the host or the daemon loses the cache (and the data only it \
                     holds); only for tests, never detected. The default is pmem where the \
                     mapping allows it and msync otherwise."
    )]
    persistence: Option<Persistence>,

    /// Checksum cached data (when the cache is formatted)
    #[arg(
        long,
        long_help = "Format a new cache with a CRC32C of every cached extent, verified on every \
                     read hit and before writeback: corruption of the cache media becomes an I/O \
                     error instead of wrong data. Costs a CRC computation per write and per read \
                     hit. An existing cache keeps the setting it was formatted with; giving this \
                     flag for a cache formatted without it is an error."
    )]
    data_crc: bool,

    /// GC threshold in percent of segments in use (0-90) [default: the cache's, 70 when new]
    #[arg(
        long,
        value_name = "PERCENT",
        value_parser = clap::value_parser!(u8).range(0..=MAX_GC_PERCENT as i64),
        long_help = "Garbage collection reclaims clean, written-back log space once this share of \
                     the cache's segments is in use (and always when the cache is nearly full). \
                     Stored in the cache, so it stays until changed."
    )]
    gc_percent: Option<u8>,

    /// Dirty share (percent) at which writeback runs flat out, and down to which [default: 80,70]
    #[arg(
        long,
        value_name = "HIGH,LOW",
        value_parser = parse_watermarks,
        long_help = "While the guest is busy and less than HIGH percent of the cache's data space \
                     is dirty, writeback waits, so a burst runs at cache speed without writeback \
                     taking CPU and backing bandwidth from it. From HIGH percent on, writeback runs \
                     flat out whatever the guest does, until the dirty share is below LOW percent \
                     (dm-writecache's high_watermark and low_watermark). It also runs at once \
                     whenever a write waits for room. 0 < LOW <= HIGH <= 100. [default: 80,70]"
    )]
    writeback_watermarks: Option<(u8, u8)>,

    /// Milliseconds without guest requests after which writeback drains [default: 1000]
    #[arg(
        long,
        value_name = "MS",
        long_help = "The guest counts as idle once it made no read or write for MS milliseconds; \
                     writeback then writes dirty data back at full speed, and goes back to \
                     waiting at the guest's next request (unless the dirty share is above the \
                     high watermark). 0 writes back whenever there is dirty data. [default: 1000]"
    )]
    writeback_idle_ms: Option<u64>,

    /// Write all dirty data back before exiting
    #[arg(
        long,
        long_help = "On SIGINT or SIGTERM, write every dirty extent back to the backing image and \
                     flush it before exiting, so the image alone holds the disk (for example \
                     before detaching the cache). Without it, dirty data stays safely in the \
                     cache and is written back after the next start."
    )]
    drain_on_exit: bool,

    /// Serve `ctl` requests (status, drain, metrics...) on this Unix socket
    #[arg(
        long,
        value_name = "PATH",
        long_help = "Listen on PATH (mode 0600) for control requests, one JSON object per line: \
                     status, statistics and Prometheus metrics, gc_percent, flush, drain and \
                     undrain. `vhost-user-pcache ctl --control-socket PATH` is the client. A \
                     stale socket left by a dead daemon is replaced; a live one is an error."
    )]
    control_socket: Option<PathBuf>,

    /// Keep the guest's write-cache choice here across restarts [default: IMAGE.state]
    #[arg(
        long,
        value_name = "PATH",
        long_help = "File holding device state that must survive a restart: the write-cache \
                     setting the guest chose (frontends send it only when the guest changes it, \
                     never again after a reconnect). Replaced atomically on every change. \
                     Defaults to IMAGE.state beside a backing image that is a regular file; with \
                     a block device as backing image and no --state-file, the choice lasts only \
                     as long as the process."
    )]
    state_file: Option<PathBuf>,
}

/// Queues offered when neither a flag nor the config file says.
pub const DEFAULT_QUEUES: u16 = 4;
/// Largest queue size accepted when neither a flag nor the config file says.
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;
/// Polling window when neither a flag nor the config file says: QEMU's iothread default
/// (`poll-max-ns` 32768).
pub const DEFAULT_POLL_US: u32 = 32;
/// Longest polling window accepted: beyond it a queue's thread would hold its lock long
/// enough to delay the frontend's ring messages noticeably.
pub const MAX_POLL_US: u32 = 1000;

/// `--cache`: a cache media path or `none`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheArg {
    None,
    Media(PathBuf),
}

pub(crate) fn parse_cache(text: &str) -> Result<CacheArg, String> {
    match text {
        "" => Err("an empty cache path".into()),
        "none" => Ok(CacheArg::None),
        path => Ok(CacheArg::Media(PathBuf::from(path))),
    }
}

impl ServeArgs {
    /// These flags over the settings of `--config`, if given.
    pub fn with_config_file(&self) -> Result<ServeArgs> {
        let Some(path) = &self.config else {
            return Ok(self.clone());
        };
        let f = config::load(path)?;
        let a = self.clone();
        Ok(ServeArgs {
            config: a.config,
            socket: a.socket.or(f.socket),
            backing: a.backing.or(f.backing),
            create_backing: a.create_backing.or(f.create_backing),
            queues: a.queues.or(f.queues),
            queue_size: a.queue_size.or(f.queue_size),
            poll_us: a.poll_us.or(f.poll_us),
            // A switch given on the command line can only say yes.
            read_only: a.read_only || f.read_only.unwrap_or(false),
            serial: a.serial.or(f.serial),
            cache: a.cache.or(f.cache),
            cache_size: a.cache_size.or(f.cache_size),
            persistence: a.persistence.or(f.persistence),
            data_crc: a.data_crc || f.data_crc.unwrap_or(false),
            gc_percent: a.gc_percent.or(f.gc_percent),
            writeback_watermarks: a.writeback_watermarks.or(f.writeback_watermarks),
            writeback_idle_ms: a.writeback_idle_ms.or(f.writeback_idle_ms),
            drain_on_exit: a.drain_on_exit || f.drain_on_exit.unwrap_or(false),
            control_socket: a.control_socket.or(f.control_socket),
            state_file: a.state_file.or(f.state_file),
        })
    }

    pub fn queues(&self) -> u16 {
        self.queues.unwrap_or(DEFAULT_QUEUES)
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE)
    }

    /// Writeback pacing: the flags over the defaults.
    pub fn pacing(&self) -> PacingOptions {
        let d = PacingOptions::default();
        let (high, low) = self
            .writeback_watermarks
            .unwrap_or((d.high_watermark, d.low_watermark));
        PacingOptions {
            high_watermark: high,
            low_watermark: low,
            idle: self
                .writeback_idle_ms
                .map_or(d.idle, std::time::Duration::from_millis),
        }
    }

    /// `--poll-us`; by default 32 µs in front of a cache and off with `--cache none`, where
    /// every request waits on the backing image and polling measured slower
    /// (docs/performance.md, "Polling").
    pub fn poll(&self) -> std::time::Duration {
        let default = match self.cache {
            Some(CacheArg::None) => 0,
            _ => DEFAULT_POLL_US,
        };
        let us = self.poll_us.unwrap_or(default).min(MAX_POLL_US);
        std::time::Duration::from_micros(u64::from(us))
    }

    pub fn control_socket(&self) -> Option<&Path> {
        self.control_socket.as_deref()
    }

    #[cfg(test)]
    pub fn gc_percent(&self) -> Option<u8> {
        self.gc_percent
    }

    /// `--state-file`, or IMAGE.state when the backing image is (or will be) a regular file.
    pub fn state_file(&self) -> Option<PathBuf> {
        if let Some(path) = &self.state_file {
            return Some(path.clone());
        }
        let image = self.backing_path();
        let is_file = std::fs::metadata(&image)
            .map(|m| m.is_file())
            .unwrap_or(true);
        is_file.then(|| {
            let mut name = image.into_os_string();
            name.push(".state");
            PathBuf::from(name)
        })
    }

    pub fn backing_path(&self) -> PathBuf {
        self.backing
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BACKING))
    }

    /// Size to create a missing backing image with, if it may be created at all.
    pub fn create_size(&self) -> Option<u64> {
        match (&self.backing, self.create_backing) {
            (_, Some(size)) => Some(size),
            (None, None) => Some(DEFAULT_BACKING_SIZE),
            (Some(_), None) => None,
        }
    }
}

impl From<&ServeArgs> for ServeConfig {
    fn from(args: &ServeArgs) -> Self {
        let serial = args.serial.clone().unwrap_or_else(|| {
            args.backing_path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        ServeConfig {
            socket: args.socket.clone().unwrap_or_default(),
            num_queues: args.queues(),
            max_queue_size: args.queue_size(),
            poll: args.poll(),
            serial,
            state_file: args.state_file(),
        }
    }
}

fn prepare_backing(path: &Path, create_size: Option<u64>) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    let Some(size) = create_size else {
        bail!(
            "backing image {} does not exist (use --create-backing SIZE to create it)",
            path.display()
        );
    };
    BackingImage::create_sparse(path, size)
        .with_context(|| format!("creating backing image {}", path.display()))?;
    info!(
        "created sparse backing image {} of {size} bytes",
        path.display()
    );
    Ok(())
}

/// Where the cache media is: `--cache`, or IMAGE.pcache beside the backing image.
fn cache_path(args: &ServeArgs) -> Option<PathBuf> {
    match &args.cache {
        Some(CacheArg::None) => None,
        Some(CacheArg::Media(p)) => Some(p.clone()),
        None => {
            let mut p = args.backing_path().into_os_string();
            p.push(".pcache");
            Some(PathBuf::from(p))
        }
    }
}

/// Size of a cache file to create: `--cache-size` or the default, in whole segments, and at
/// least the minimum for the queue count.
fn cache_create_size(args: &ServeArgs, image_size: u64) -> u64 {
    let wanted = args
        .cache_size
        .unwrap_or_else(|| DEFAULT_CACHE_SIZE.min(image_size));
    let segments = u32::try_from(wanted / SEGMENT_SIZE)
        .unwrap_or(u32::MAX)
        .max(min_segments(usize::from(args.queues())));
    Layout::media_len_for(segments)
}

/// The one place that decides which engine serves the device; also its control-socket face.
fn build_engine(
    args: &ServeArgs,
    image: Arc<BackingImage>,
) -> Result<(Arc<dyn Engine>, Arc<dyn ControlTarget>)> {
    let queues = usize::from(args.queues());
    let Some(path) = cache_path(args) else {
        info!("no cache: requests go straight to the backing image");
        let engine: Arc<dyn Engine> = Arc::new(PassthroughEngine::new(image.clone(), queues));
        let control = Arc::new(PassthroughControl::new(engine.clone(), image));
        return Ok((engine, control));
    };
    let opts = CacheOptions {
        create_size: Some(cache_create_size(args, image.size())),
        persistence: args.persistence,
        data_crc: args.data_crc.then_some(true),
        gc_percent: args.gc_percent,
        queues,
        force_format: false,
        drain_on_shutdown: args.drain_on_exit,
        journal_dir: Some(vhost_user_pcache::cache::journal::default_dir()),
        pacing: args.pacing(),
        path,
    };
    let engine = Arc::new(CacheEngine::open(&opts, image).context("opening the cache")?);
    Ok((engine.clone(), Arc::new(CacheControl(engine))))
}

pub fn run(args: &ServeArgs) -> Result<()> {
    // A panicking queue worker, writeback or GC thread stops the daemon with the panic in the
    // log; the service manager restarts it and the log on the media is replayed.
    vhost_user_pcache::sync::stop_process_on_panic();
    let args = &args.with_config_file()?;
    let Some(socket) = &args.socket else {
        bail!("no vhost-user socket: give --socket PATH or `socket` in the config file");
    };
    let path = args.backing_path();
    prepare_backing(&path, args.create_size())?;
    // Held until the daemon exits: no second daemon or offline tool may use either file.
    let _image_lock = PathLock::acquire(&path, LockedObject::BackingImage, false)?;
    let _cache_lock = cache_path(args)
        .map(|p| PathLock::acquire(&p, LockedObject::CacheMedia, true))
        .transpose()?;
    let options = BackingOptions {
        read_only: args.read_only,
        direct: true,
    };
    let image = BackingImage::open(&path, &options)?;
    info!(
        "backing image {} ({} bytes{})",
        path.display(),
        image.size(),
        if args.read_only { ", read-only" } else { "" }
    );
    let (engine, control) = build_engine(args, image)?;
    let connection = Arc::new(ConnectionState::default());
    let _control_server = match args.control_socket() {
        Some(path) => Some(ControlServer::start(path, control, connection.clone())?),
        None => None,
    };
    let config = ServeConfig::from(args);
    serve::run_with_state(&config, engine, &connection)
        .with_context(|| format!("serving on {}", socket.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::process::Command;
    use std::time::{Duration, Instant};

    /// Set in the child process the test below starts.
    const CHILD_ENV: &str = "VHOST_USER_PCACHE_PANIC_TEST_DIR";

    #[derive(Parser)]
    struct ServeCli {
        #[command(flatten)]
        args: ServeArgs,
    }

    #[test]
    fn writeback_pacing_flags_reach_the_cache_options() {
        let cli = ServeCli::parse_from([
            "serve",
            "--writeback-watermarks",
            "90,60",
            "--writeback-idle-ms",
            "250",
        ]);
        let p = cli.args.pacing();
        assert_eq!((p.high_watermark, p.low_watermark), (90, 60));
        assert_eq!(p.idle, Duration::from_millis(250));
        assert_eq!(
            ServeCli::parse_from(["serve"]).args.pacing(),
            PacingOptions::default()
        );
        for bad in ["60,90", "90", "90,0", "101,50", "a,b", "90,60,30"] {
            let e = parse_watermarks(bad).expect_err(bad);
            assert!(e.to_string().contains("HIGH,LOW"), "{bad}: {e}");
        }
    }

    /// Polling is on by default in front of a cache, off with `--cache none`; a flag wins
    /// either way.
    #[test]
    fn poll_window_defaults_by_engine_and_the_flag_wins() {
        let poll = |extra: &[&str]| {
            let mut argv = vec!["serve", "--socket", "s.sock"];
            argv.extend_from_slice(extra);
            ServeCli::parse_from(argv).args.poll()
        };
        assert_eq!(poll(&[]), Duration::from_micros(u64::from(DEFAULT_POLL_US)));
        assert_eq!(poll(&["--cache", "c.pcache"]), Duration::from_micros(32));
        assert_eq!(poll(&["--cache", "none"]), Duration::ZERO);
        assert_eq!(
            poll(&["--cache", "none", "--poll-us", "50"]),
            Duration::from_micros(50)
        );
        assert_eq!(poll(&["--poll-us", "0"]), Duration::ZERO);
        assert!(ServeCli::try_parse_from(["serve", "--poll-us", "1001"]).is_err());
    }

    /// In a child process, `serve` runs on a thread; once it listens, another thread panics.
    /// Without the daemon's panic policy that thread would just end and the daemon would
    /// serve on (the child would pass its test and exit 0); with it the process stops with
    /// status 70 and the panic's message.
    #[test]
    fn a_panicking_thread_stops_the_serving_daemon() {
        if let Some(dir) = std::env::var_os(CHILD_ENV) {
            let dir = PathBuf::from(dir);
            let socket = dir.join("vhost.sock");
            let image = dir.join("disk.img");
            let cli = ServeCli::parse_from([
                "serve",
                "--socket",
                socket.to_str().unwrap(),
                "--backing",
                image.to_str().unwrap(),
                "--create-backing",
                "1M",
                "--cache",
                "none",
            ]);
            std::thread::spawn(move || run(&cli.args));
            let start = Instant::now();
            while !socket.exists() {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "serve never listened"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            let worker = std::thread::Builder::new()
                .name("queue-worker-test".into())
                .spawn(|| panic!("an invariant broke"))
                .unwrap();
            let _ = worker.join();
            // Still here: the panic did not stop the process.
            std::thread::sleep(Duration::from_millis(200));
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "cli::serve::tests::a_panicking_thread_stops_the_serving_daemon",
                "--exact",
                "--nocapture",
            ])
            .env(CHILD_ENV, dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(70), "{stderr}");
        assert!(stderr.contains("an invariant broke"), "{stderr}");
    }
}
