// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `ctl`: the client of a running daemon's control socket.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};

use vhost_user_pcache::control::{Request, Response, Status};

// The two options are global so they may also follow the command, as in `ctl status --json`.
// clap cannot make a global option required, so `run` asks for the socket itself.
#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The daemon's control socket (`serve --control-socket PATH`); required, before or after
    /// the command
    #[arg(long, value_name = "PATH", global = true)]
    control_socket: Option<PathBuf>,

    /// Print the daemon's answer as JSON, for scripts (before or after the command)
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// Cache state (segments, gc_percent, log positions, flags), statistics and connection
    Status,
    /// Change a setting of the running cache
    #[command(subcommand)]
    Set(SetCommand),
    /// Persist every open kset: all completed writes survive a crash from now on
    Flush,
    /// Write all dirty data back and flush the image, then stay writethrough until `undrain`
    #[command(
        long_about = "Write every dirty extent back to the backing image and flush it; returns once \
                      the image holds all acknowledged data. Until `undrain`, every write completes \
                      only once it is on the backing image too, so the cache can be detached or the \
                      VM migrated."
    )]
    Drain,
    /// Leave drained mode: back to write-back caching
    Undrain,
    /// Statistics in the Prometheus text format
    Metrics,
}

#[derive(Subcommand, Debug)]
pub enum SetCommand {
    /// GC threshold in percent of segments in use (0-90), stored in the cache
    GcPercent {
        #[arg(value_parser = clap::value_parser!(u8).range(0..=90))]
        percent: u8,
    },
}

impl CtlCommand {
    fn request(&self) -> Request {
        match self {
            CtlCommand::Status => Request::Status,
            CtlCommand::Set(SetCommand::GcPercent { percent }) => {
                Request::SetGcPercent { value: *percent }
            }
            CtlCommand::Flush => Request::Flush,
            CtlCommand::Drain => Request::Drain,
            CtlCommand::Undrain => Request::Undrain,
            CtlCommand::Metrics => Request::Metrics,
        }
    }
}

/// Sends one request and returns the daemon's answer.
pub fn call(socket: &Path, request: &Request) -> Result<Response> {
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        ErrorKind::NotFound => anyhow!(
            "no control socket at {} (is the daemon running with --control-socket?)",
            socket.display()
        ),
        ErrorKind::ConnectionRefused => anyhow!(
            "the daemon is not running: nothing listens on {}",
            socket.display()
        ),
        _ => anyhow::Error::new(e).context(format!("cannot connect to {}", socket.display())),
    })?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    (&stream)
        .write_all(line.as_bytes())
        .with_context(|| format!("sending to {}", socket.display()))?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .with_context(|| format!("reading the answer from {}", socket.display()))?;
    if answer.is_empty() {
        bail!("the daemon closed {} without answering", socket.display());
    }
    serde_json::from_str(&answer).with_context(|| format!("a malformed answer: {answer:?}"))
}

pub fn run(args: &CtlArgs) -> Result<()> {
    let socket = args
        .control_socket
        .as_deref()
        .ok_or_else(|| anyhow!("ctl needs --control-socket PATH, the daemon's control socket"))?;
    let response = call(socket, &args.command.request())?;
    if !response.ok {
        bail!(
            "the daemon refused: {}",
            response.error.as_deref().unwrap_or("no reason given")
        );
    }
    let mut out = std::io::stdout().lock();
    match (&args.command, args.json) {
        (CtlCommand::Metrics, false) => write!(out, "{}", response.metrics.unwrap_or_default())?,
        (CtlCommand::Status, false) => {
            let status = response
                .status
                .ok_or_else(|| anyhow!("the daemon's answer holds no status"))?;
            write!(out, "{}", human_status(&status))?;
        }
        (CtlCommand::Status, true) => {
            serde_json::to_writer_pretty(&mut out, &response.status)?;
            writeln!(out)?;
        }
        (_, true) => {
            serde_json::to_writer_pretty(&mut out, &response)?;
            writeln!(out)?;
        }
        (_, false) => writeln!(out, "ok")?,
    }
    Ok(())
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// `status` for people.
pub fn human_status(s: &Status) -> String {
    let e = &s.engine;
    let mut o = String::new();
    let mut line = |k: &str, v: String| o.push_str(&format!("{k:<18}{v}\n"));
    line("engine", e.engine.clone());
    line("capacity", format!("{} bytes", e.capacity_bytes));
    line("read-only", yes_no(e.read_only).into());
    line(
        "write cache",
        format!(
            "{} (guest setting)",
            if e.write_cache { "on" } else { "off" }
        ),
    );
    line("drained", yes_no(e.drained).into());
    line(
        "frontend",
        format!(
            "{} ({} connections since start)",
            if s.connection.connected {
                "connected"
            } else {
                "not connected"
            },
            s.connection.connections
        ),
    );
    let Some(c) = &e.cache else {
        return o;
    };
    let pos = |p: &vhost_user_pcache::cache::status::LogPosition| {
        format!("{}:{} seq {}", p.seg, p.off, p.seq)
    };
    line("persistence", c.persistence.clone());
    line(
        "segments",
        format!("{} used of {}", c.segments_used, c.segments_total),
    );
    line("gc_percent", c.gc_percent.to_string());
    line("key_head", pos(&c.key_head));
    line("dirty_tail", pos(&c.dirty_tail));
    line("key_tail", pos(&c.key_tail));
    line(
        "flags",
        format!(
            "data_crc={} writethrough={} drained={}",
            c.flags.data_crc, c.flags.writethrough, c.flags.drained
        ),
    );
    let st = &c.stats;
    line(
        "reads",
        format!(
            "{} hits, {} misses, {} bytes",
            st.read_hits, st.read_misses, st.read_bytes
        ),
    );
    line("writes", format!("{} bytes", st.write_bytes));
    line("dirty", format!("{} bytes", st.dirty_bytes));
    line(
        "writeback",
        format!(
            "{} bytes, {} bytes/s, {} errors",
            st.writeback_bytes, s.writeback_rate_bytes_per_sec, st.writeback_errors
        ),
    );
    let w = &c.writeback;
    line(
        "pacing",
        format!(
            "{} (watermarks {}%/{}% dirty, idle after {} ms)",
            w.state, w.high_watermark, w.low_watermark, w.idle_ms
        ),
    );
    line("busy", format!("{} waits for cache room", st.busy));
    line(
        "journal full",
        format!("{} writes held for the key log", st.journal_full),
    );
    line(
        "gc",
        format!("{} runs, {} errors", st.gc_runs, st.gc_errors),
    );
    line("crc errors", st.crc_errors.to_string());
    let h = &c.health;
    line(
        "lost",
        format!("{} extents, {} bytes", h.lost_extents, h.lost_bytes),
    );
    if let Some(why) = &h.writeback_stalled {
        line("ALARM", format!("writeback stopped: {why}"));
    }
    o
}
