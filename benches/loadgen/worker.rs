// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One thread per queue: keeps `iodepth` requests in flight until the deadline, until the
//! pass's shared byte budget is spent or until its list of blocks is done, then drains.

use crate::budget::{EndedBy, IoBudget};
use crate::pattern;
use crate::rng::{Rng, VisitOrder};
use crate::stats::{Op, Stats};
use anyhow::{anyhow, Result};
use blkio::{Blkioq, Completion, Errno, ReqFlags};
use std::collections::HashSet;
use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

/// Longest single wait, so the stall timeout is checked even if nothing completes.
const WAIT_SLICE: Duration = Duration::from_millis(500);

/// Which requests a queue issues.
pub enum Work {
    /// Reads and writes for the whole runtime; offsets uniform over the range, or sequential
    /// and wrapping around.
    Mixed { read_percent: u8, random: bool },
    /// Writes the verify pattern to the first `count` blocks of `order`, skipping none.
    VerifyWrite { order: VisitOrder, count: u64 },
    /// Reads and checks the first `count` blocks of `order`, except those in `skip`.
    VerifyRead {
        order: VisitOrder,
        count: u64,
        skip: HashSet<u64>,
    },
}

pub struct Job {
    pub work: Work,
    /// Byte offset of block 0 of this queue's range.
    pub start: u64,
    /// Blocks in this queue's range.
    pub blocks: u64,
    pub block_size: u64,
    pub iodepth: usize,
    pub flush_every: u64,
    pub runtime: Duration,
    pub stall_timeout: Duration,
    pub poll: bool,
    pub generation: u64,
    pub seed: u64,
}

/// What a queue did; `visited` and `failed_writes` feed the verify read pass.
pub struct Outcome {
    pub stats: Stats,
    /// Visit-order indexes handed out (all of them completed, or are counted as lost).
    pub visited: u64,
    pub failed_writes: HashSet<u64>,
    pub ended_by: EndedBy,
}

#[derive(Clone, Copy)]
struct InFlight {
    op: Op,
    offset: u64,
    visit_index: u64,
    submitted: Instant,
}

/// Picks the next request; `None` when the job has no more blocks to visit.
struct Picker<'a> {
    job: &'a Job,
    rng: Rng,
    cursor: u64,
}

impl Picker<'_> {
    fn next(&mut self) -> Option<(Op, u64, u64)> {
        let job = self.job;
        match &job.work {
            Work::Mixed {
                read_percent,
                random,
            } => {
                let op = if self.rng.below(100) < u64::from(*read_percent) {
                    Op::Read
                } else {
                    Op::Write
                };
                let block = if *random {
                    self.rng.below(job.blocks)
                } else {
                    self.cursor % job.blocks
                };
                self.cursor += 1;
                Some((op, job.start + block * job.block_size, 0))
            }
            Work::VerifyWrite { order, count } => {
                let index = self.cursor;
                (index < *count).then(|| {
                    self.cursor += 1;
                    (
                        Op::Write,
                        job.start + order.at(index) * job.block_size,
                        index,
                    )
                })
            }
            Work::VerifyRead { order, count, skip } => loop {
                let index = self.cursor;
                if index >= *count {
                    return None;
                }
                self.cursor += 1;
                if !skip.contains(&index) {
                    return Some((
                        Op::Read,
                        job.start + order.at(index) * job.block_size,
                        index,
                    ));
                }
            },
        }
    }
}

fn completion_message(completion: &Completion) -> String {
    let errno = Errno::from_raw_os_error(-completion.ret);
    if completion.error_msg.is_null() {
        errno.to_string()
    } else {
        // SAFETY: libblkio sets `error_msg` to null or to a static NUL-terminated string.
        let text = unsafe { CStr::from_ptr(completion.error_msg) };
        format!("{errno} ({})", text.to_string_lossy())
    }
}

/// Runs `job` on `queue` with `buffers` (`iodepth` slots of `block_size` bytes), taking the
/// bytes of every read and write from `budget`, which the pass's queues share.
pub fn run(
    job: &Job,
    queue: &mut Blkioq,
    buffers: &mut [u8],
    budget: &IoBudget,
) -> Result<Outcome> {
    let block_size = job.block_size as usize;
    let mut slots: Vec<&mut [u8]> = buffers
        .chunks_exact_mut(block_size)
        .take(job.iodepth)
        .collect();
    if slots.len() < job.iodepth {
        return Err(anyhow!(
            "request buffers too small for iodepth {}",
            job.iodepth
        ));
    }
    if matches!(job.work, Work::Mixed { .. }) {
        // Writes must not carry zeroes a backend could special-case.
        let mut rng = Rng::new(job.seed ^ 0x5a5a);
        for slot in &mut slots {
            for word in slot.chunks_exact_mut(8) {
                word.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
        }
    }
    // The last slot carries flushes, which need no buffer.
    let flush_slot = job.iodepth;
    let mut in_flight: Vec<Option<InFlight>> = vec![None; job.iodepth + 1];
    let mut free: Vec<usize> = (0..job.iodepth).rev().collect();
    let mut busy = 0usize;
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..=job.iodepth).map(|_| MaybeUninit::uninit()).collect();

    let mut picker = Picker {
        job,
        rng: Rng::new(job.seed),
        cursor: 0,
    };
    let mut stats = Stats::default();
    let mut failed_writes = HashSet::new();
    let mut writes_since_flush = 0u64;
    let mut flush_due = false;
    // A write completed since the last flush was submitted: with --flush-every, one more flush
    // at the end covers it, so every completed write of the run is flushed.
    let mut unflushed_completions = false;
    // Set once the queue stops submitting, to the first reason it met.
    let mut ended_by: Option<EndedBy> = None;
    let started = Instant::now();
    let deadline = started + job.runtime;
    let mut last_progress = started;

    loop {
        if ended_by.is_none() && Instant::now() >= deadline {
            ended_by = Some(EndedBy::Runtime);
        }
        let submitting = ended_by.is_none();
        let final_flush = !submitting && busy == 0 && job.flush_every > 0 && unflushed_completions;
        if (submitting && flush_due || final_flush) && in_flight[flush_slot].is_none() {
            flush_due = false;
            unflushed_completions = false;
            in_flight[flush_slot] = Some(InFlight {
                op: Op::Flush,
                offset: 0,
                visit_index: 0,
                submitted: Instant::now(),
            });
            queue.flush(flush_slot, ReqFlags::empty());
            busy += 1;
        }
        while submitting && !flush_due {
            let Some(&slot) = free.last() else { break };
            let Some((op, offset, visit_index)) = picker.next() else {
                ended_by = Some(EndedBy::Done);
                break;
            };
            if !budget.take(job.block_size) {
                // The block is not submitted, so a verify read pass will not look for it.
                picker.cursor -= 1;
                ended_by = Some(EndedBy::IoLimit);
                break;
            }
            free.pop();
            let buffer = &mut slots[slot];
            let submitted = Instant::now();
            in_flight[slot] = Some(InFlight {
                op,
                offset,
                visit_index,
                submitted,
            });
            if op == Op::Write {
                if !matches!(job.work, Work::Mixed { .. }) {
                    pattern::fill(buffer, offset, job.generation);
                }
                queue.write(offset, buffer.as_ptr(), block_size, slot, ReqFlags::empty());
                writes_since_flush += 1;
                if job.flush_every > 0 && writes_since_flush >= job.flush_every {
                    writes_since_flush = 0;
                    flush_due = true;
                }
            } else {
                queue.read(
                    offset,
                    buffer.as_mut_ptr(),
                    block_size,
                    slot,
                    ReqFlags::empty(),
                );
            }
            busy += 1;
        }
        if busy == 0 {
            if submitting {
                continue;
            }
            break;
        }

        let mut wait = WAIT_SLICE;
        let min = if job.poll { 0 } else { 1 };
        let done = match queue.do_io(&mut completions, min, Some(&mut wait), None) {
            Ok(done) => done,
            Err(error) if error.errno() == Errno::TIME || error.errno() == Errno::INTR => 0,
            Err(error) => return Err(anyhow!("waiting for completions: {error}")),
        };
        let now = Instant::now();
        if done == 0 {
            if now.duration_since(last_progress) > job.stall_timeout {
                stats.lost = busy as u64;
                stats.sample(format!(
                    "{busy} requests got no answer for {:.0} s; giving up",
                    job.stall_timeout.as_secs_f64()
                ));
                ended_by = Some(EndedBy::Stall);
                break;
            }
            continue;
        }
        last_progress = now;
        for completion in &completions[..done] {
            // SAFETY: do_io initialised the first `done` entries.
            let completion = unsafe { completion.assume_init_ref() };
            let slot = completion.user_data;
            let Some(request) = in_flight.get_mut(slot).and_then(Option::take) else {
                return Err(anyhow!("completion for unknown request {slot}"));
            };
            busy -= 1;
            if slot != flush_slot {
                free.push(slot);
            }
            let latency_ns = now.duration_since(request.submitted).as_nanos() as u64;
            if completion.ret < 0 {
                stats.op(request.op).errors += 1;
                let message = completion_message(completion);
                stats.sample(format!(
                    "{} at offset {} failed: {message}",
                    request.op.name(),
                    request.offset
                ));
                if request.op == Op::Write {
                    failed_writes.insert(request.visit_index);
                }
                continue;
            }
            if request.op == Op::Write {
                unflushed_completions = true;
            }
            let op_stats = stats.op(request.op);
            op_stats.latency.record(latency_ns);
            if request.op != Op::Flush {
                op_stats.bytes += job.block_size;
                stats.tick(now.duration_since(started).as_secs_f64());
            }
            if request.op == Op::Read && matches!(job.work, Work::VerifyRead { .. }) {
                if let Err(mismatch) = pattern::check(slots[slot], request.offset, job.generation) {
                    stats.verify_mismatches += 1;
                    stats.sample(format!(
                        "verify of block at offset {} failed: {mismatch}",
                        request.offset
                    ));
                }
            }
        }
    }
    stats.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(Outcome {
        stats,
        visited: picker.cursor,
        failed_writes,
        ended_by: ended_by.unwrap_or(EndedBy::Runtime),
    })
}
