// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Load generator for vhost-user-blk backends, built on libblkio (`blkio` crate).
//! See `cargo bench --bench loadgen -- --help`.

mod budget;
mod cli;
mod device;
mod histogram;
mod pattern;
mod report;
mod rng;
mod stats;
mod worker;

use anyhow::{bail, Context, Result};
use budget::{EndedBy, IoBudget};
use clap::Parser;
use cli::Args;
use device::Device;
use report::PassReport;
use rng::VisitOrder;
use std::collections::HashSet;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use worker::{Job, Work};

/// The part of the device one queue works on.
#[derive(Clone, Copy)]
struct Range {
    start: u64,
    blocks: u64,
}

/// Splits `blocks` blocks starting at `start` into `parts` contiguous ranges of nearly equal size.
fn split(start: u64, blocks: u64, block_size: u64, parts: u64) -> Vec<Range> {
    let mut next = start;
    (0..parts)
        .map(|part| {
            let blocks = blocks / parts + u64::from(part < blocks % parts);
            let range = Range {
                start: next,
                blocks,
            };
            next += blocks * block_size;
            range
        })
        .collect()
}

fn clock_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    rng::splitmix64(nanos ^ u64::from(std::process::id())) | 1
}

struct Plan {
    args: Args,
    block_size: u64,
    whole: Range,
    per_queue: Vec<Range>,
    generation: u64,
    seed: u64,
}

impl Plan {
    fn new(args: Args, device: &Device) -> Result<Self> {
        let bs = args.bs;
        let alignment = device.request_alignment.max(512);
        if bs == 0 || bs % alignment != 0 {
            bail!("--bs {bs} must be a positive multiple of the device's request alignment ({alignment})");
        }
        if device.max_transfer > 0 && bs > device.max_transfer {
            bail!(
                "--bs {bs} exceeds the device's max transfer ({} bytes)",
                device.max_transfer
            );
        }
        if args.offset % bs != 0 {
            bail!("--offset {} must be a multiple of --bs {bs}", args.offset);
        }
        if args.offset >= device.capacity {
            bail!(
                "--offset {} is beyond the device ({} bytes)",
                args.offset,
                device.capacity
            );
        }
        let size = args.size.unwrap_or(device.capacity - args.offset);
        if args
            .offset
            .checked_add(size)
            .map_or(true, |end| end > device.capacity)
        {
            bail!(
                "--offset {} + --size {size} runs past the device ({} bytes)",
                args.offset,
                device.capacity
            );
        }
        if let Some(limit) = args.io_limit {
            if limit < bs {
                bail!("--io-limit {limit} is less than one block (--bs {bs})");
            }
        }
        let blocks = size / bs;
        let queues = u64::from(args.queues);
        if blocks < queues {
            bail!("the region holds {blocks} blocks of {bs} bytes, fewer than --queues {queues}");
        }
        let generation = args.generation.unwrap_or_else(clock_seed);
        let seed = args.seed.unwrap_or_else(clock_seed);
        Ok(Self {
            block_size: bs,
            whole: Range {
                start: args.offset,
                blocks,
            },
            per_queue: split(args.offset, blocks, bs, queues),
            generation,
            seed,
            args,
        })
    }

    fn job(&self, queue: usize, work: Work, range: Range) -> Job {
        Job {
            work,
            start: range.start,
            blocks: range.blocks,
            block_size: self.block_size,
            iodepth: self.args.iodepth as usize,
            flush_every: self.args.flush_every,
            runtime: Duration::from_secs_f64(self.args.runtime),
            stall_timeout: Duration::from_secs_f64(self.args.stall_timeout),
            poll: self.args.poll,
            generation: self.generation,
            seed: rng::splitmix64(self.seed.wrapping_add(queue as u64)),
        }
    }

    fn summary(&self, capacity: u64, reports: Vec<PassReport>) -> Summary {
        Summary {
            generation: self.generation,
            seed: self.seed,
            capacity,
            reports,
        }
    }

    fn verify_order(&self, queue: usize) -> VisitOrder {
        VisitOrder::new(
            self.per_queue[queue].blocks,
            self.args.rw.is_random(),
            self.seed ^ queue as u64,
        )
    }
}

/// What the queues of a pass did together.
struct PassResult {
    stats: stats::Stats,
    outcomes: Vec<worker::Outcome>,
    ended_by: EndedBy,
}

/// Runs one job per queue in parallel, all taking from one --io-limit budget, and merges what
/// they did.
fn run_pass(device: &mut Device, plan: &Plan, jobs: Vec<Job>) -> Result<PassResult> {
    let bytes_per_queue = plan.args.iodepth as usize * plan.block_size as usize;
    let lanes = device.queues_and_buffers(bytes_per_queue);
    let budget = IoBudget::new(plan.args.io_limit);
    let budget = &budget;
    let outcomes = std::thread::scope(|scope| {
        let handles: Vec<_> = lanes
            .into_iter()
            .zip(&jobs)
            .map(|((queue, buffers), job)| {
                scope.spawn(move || worker::run(job, queue, buffers, budget))
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| bail!("a queue thread panicked"))
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let mut merged = stats::Stats::default();
    let mut ended_by = EndedBy::Done;
    for outcome in &outcomes {
        merged.merge(&outcome.stats);
        ended_by = ended_by.merge(outcome.ended_by);
    }
    Ok(PassResult {
        stats: merged,
        outcomes,
        ended_by,
    })
}

/// What a run did, with what it needs to be repeated or checked later.
struct Summary {
    generation: u64,
    seed: u64,
    capacity: u64,
    reports: Vec<PassReport>,
}

fn run(args: Args) -> Result<Summary> {
    let buffer_bytes = u64::from(args.queues) * u64::from(args.iodepth) * args.bs;
    let mut device = Device::open(&args.socket, args.queues, args.iodepth, buffer_bytes)?;
    let plan = Plan::new(args, &device)?;
    let args = &plan.args;
    let queues = args.queues as usize;
    let read_percent = args.rw.read_percent(args.rwmix_read);
    let mut reports = Vec::new();

    if !args.verify {
        let random = args.rw.is_random();
        let jobs = (0..queues)
            .map(|q| {
                let range = if random {
                    plan.whole
                } else {
                    plan.per_queue[q]
                };
                plan.job(
                    q,
                    Work::Mixed {
                        read_percent,
                        random,
                    },
                    range,
                )
            })
            .collect();
        let pass = run_pass(&mut device, &plan, jobs)?;
        reports.push(PassReport {
            name: "run",
            stats: pass.stats,
            ended_by: pass.ended_by,
            blocks_wanted: 0,
            blocks_done: 0,
        });
        return Ok(plan.summary(device.capacity, reports));
    }

    let wanted: u64 = plan.whole.blocks;
    let mut to_check: Vec<(u64, HashSet<u64>)> = plan
        .per_queue
        .iter()
        .map(|r| (r.blocks, HashSet::new()))
        .collect();
    if read_percent < 100 {
        let jobs = (0..queues)
            .map(|q| {
                let work = Work::VerifyWrite {
                    order: plan.verify_order(q),
                    count: plan.per_queue[q].blocks,
                };
                plan.job(q, work, plan.per_queue[q])
            })
            .collect();
        let pass = run_pass(&mut device, &plan, jobs)?;
        let done = pass.outcomes.iter().map(|o| o.visited).sum();
        to_check = pass
            .outcomes
            .into_iter()
            .map(|o| (o.visited, o.failed_writes))
            .collect();
        reports.push(PassReport {
            name: "verify-write",
            stats: pass.stats,
            ended_by: pass.ended_by,
            blocks_wanted: wanted,
            blocks_done: done,
        });
    }
    let checked_wanted = to_check.iter().map(|(count, _)| count).sum();
    let jobs = to_check
        .into_iter()
        .enumerate()
        .map(|(q, (count, skip))| {
            let work = Work::VerifyRead {
                order: plan.verify_order(q),
                count,
                skip,
            };
            plan.job(q, work, plan.per_queue[q])
        })
        .collect();
    let pass = run_pass(&mut device, &plan, jobs)?;
    let done = pass.outcomes.iter().map(|o| o.visited).sum();
    reports.push(PassReport {
        name: "verify-read",
        stats: pass.stats,
        ended_by: pass.ended_by,
        blocks_wanted: checked_wanted,
        blocks_done: done,
    });
    Ok(plan.summary(device.capacity, reports))
}

type SelfCheck = fn() -> Result<(), String>;

fn self_check() -> ExitCode {
    let checks: [(&str, SelfCheck); 5] = [
        ("budget", budget::self_check),
        ("histogram", histogram::self_check),
        ("pattern", pattern::self_check),
        ("rng", rng::self_check),
        ("cli", cli::self_check),
    ];
    let mut failed = 0;
    for (name, check) in checks {
        match check() {
            Ok(()) => println!("loadgen self-check {name}: ok"),
            Err(message) => {
                failed += 1;
                println!("loadgen self-check {name}: FAILED: {message}");
            }
        }
    }
    if failed == 0 {
        println!("loadgen: no --socket given, so only the self-checks ran; see --help");
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    // `cargo test --benches` runs harness-less benches without arguments.
    if std::env::args_os().len() <= 1 && std::env::var_os("LOADGEN_SOCKET").is_none() {
        return self_check();
    }
    let args = Args::parse();
    let json = args.json;
    let allow_errors = args.allow_errors;
    let describe = format!(
        "rw={:?} bs={} iodepth={} queues={} runtime={}s io-limit={}",
        args.rw,
        args.bs,
        args.iodepth,
        args.queues,
        args.runtime,
        args.io_limit
            .map_or_else(|| "none".to_string(), |bytes| bytes.to_string())
    )
    .to_lowercase();
    let summary = match run(args).context("loadgen") {
        Ok(summary) => summary,
        Err(error) => {
            eprintln!("{error:#}");
            return ExitCode::from(2);
        }
    };
    let reports = &summary.reports;
    let errors: u64 = reports.iter().map(|r| r.stats.errors()).sum();
    let mismatches: u64 = reports.iter().map(|r| r.stats.verify_mismatches).sum();
    let ok = mismatches == 0 && (errors == 0 || allow_errors);
    if json {
        let document = serde_json::json!({
            "ok": ok,
            "errors": errors,
            "verify_mismatches": mismatches,
            "capacity": summary.capacity,
            "generation": summary.generation,
            "seed": summary.seed,
            "passes": reports.iter().map(PassReport::to_json).collect::<Vec<_>>(),
        });
        println!("{document:#}");
    } else {
        println!(
            "loadgen {describe} capacity={} generation={} seed={}",
            summary.capacity, summary.generation, summary.seed
        );
        for report in reports {
            print!("{}", report.to_text());
        }
        println!(
            "{} errors, {} verify mismatches: {}",
            errors,
            mismatches,
            if ok { "OK" } else { "FAILED" }
        );
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
