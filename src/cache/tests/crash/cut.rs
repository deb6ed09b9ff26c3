// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The cut: at a chosen media event or inside writeback's backing flush, every crash image
//! the cut can leave is reopened on the backing image and checked against the model.

use std::sync::{Arc, Mutex};

use super::checker::{self, Model, SECTOR};
use super::config::{Config, Rng};
use super::image::DurableFile;
use super::report::{Phase, PhaseCell, Report};
use crate::backing::BackingImage;
use crate::cache::driver::Driver;
use crate::cache::media::{CrashChoice, Media, PendingLines, RecordingMedia};
use crate::cache::{CacheEngine, CacheOptions};
use crate::sync::lock;

/// Everything a cut needs, shared by the media hook and the backing flush hook.
pub(super) struct CutCtx {
    pub(super) cfg: Config,
    pub(super) opts: CacheOptions,
    pub(super) media: Arc<RecordingMedia>,
    pub(super) backing: Arc<BackingImage>,
    pub(super) model: Arc<Mutex<Model>>,
    pub(super) report: Arc<Mutex<Report>>,
    pub(super) rng: Rng,
    pub(super) durable: DurableFile,
    pub(super) phase: PhaseCell,
    /// The backing image before the writeback step in progress, taken when that step's
    /// backing flush is to be cut, with the step's number.
    pub(super) backing_before: Option<(u64, Vec<u8>)>,
}

/// How a cut inside writeback's backing flush leaves the sectors the step wrote (and has not
/// flushed): all of them on the image, none, or a seeded mix sector by sector.
#[derive(Clone, Copy, Debug)]
enum BackingLoss {
    None,
    All,
    Random(u64),
}

impl CutCtx {
    pub(super) fn on_event(&mut self, media: &RecordingMedia, event: u64) {
        let phase = self.phase.get();
        // The rarer operations get denser cuts, so every run crashes inside each of them.
        let every = match phase {
            Phase::Write | Phase::Flush | Phase::Writeback => self.cfg.cut_every,
            _ => self.cfg.cut_every / 4,
        };
        let cut = match self.cfg.only_cut {
            Some(c) => c == event,
            None => self.cfg.only_flush_cut.is_none() && self.rng.below(every) == 0,
        };
        if !cut {
            return;
        }
        let pending = media.pending_lines();
        let mut choices = vec![CrashChoice::AllLost];
        if !pending.is_empty() {
            choices.push(CrashChoice::AllKept);
            let n = if self.cfg.only_cut.is_some() {
                32
            } else {
                self.cfg.random_images
            };
            for i in 0..n {
                choices.push(CrashChoice::Random(
                    self.cfg.seed ^ event.rotate_left(20) ^ i,
                ));
            }
        }
        let images: Vec<_> = choices
            .into_iter()
            .map(|c| (c, BackingLoss::None))
            .collect();
        self.cut(
            media,
            &pending,
            &images,
            phase,
            &format!("cut {event}"),
            None,
        );
    }

    /// Whether writeback step `step` gets a cut inside its backing flush (then the backing
    /// image is taken now, to know what the step's unflushed writes replaced).
    pub(super) fn plan_flush_cut(&mut self, step: u64) {
        let cut = match (self.cfg.only_cut, self.cfg.only_flush_cut) {
            (_, Some(s)) => s == step,
            (Some(_), None) => false,
            (None, None) => self.rng.below(self.cfg.flush_cut_every) == 0,
        };
        self.backing_before = cut.then(|| (step, read_backing(&self.backing, self.cfg.disk)));
    }

    /// The backing flush hook: a cut with the step's writes on the image, lost, or mixed.
    pub(super) fn on_backing_flush(&mut self) {
        let Some((step, before)) = self.backing_before.take() else {
            return;
        };
        let media = self.media.clone();
        let pending = media.pending_lines();
        let replay = self.cfg.only_flush_cut.is_some();
        let n = if replay {
            32
        } else {
            self.cfg.random_images / 2
        }
        .max(1);
        let mut images = vec![(CrashChoice::AllLost, BackingLoss::All)];
        if !pending.is_empty() {
            images.push((CrashChoice::AllKept, BackingLoss::All));
        }
        images.push((CrashChoice::AllLost, BackingLoss::None));
        for i in 0..n {
            let r = self.cfg.seed ^ step.rotate_left(24) ^ i;
            let choice = if pending.is_empty() {
                CrashChoice::AllLost
            } else {
                CrashChoice::Random(r)
            };
            images.push((choice, BackingLoss::Random(r)));
        }
        let what = format!("writeback step {step} backing flush");
        self.cut(
            &media,
            &pending,
            &images,
            Phase::BackingFlush,
            &what,
            Some(&before),
        );
    }

    /// Check every image of one cut. `before` is the backing image as it was before the
    /// unflushed writes of a backing-flush cut (which [`BackingLoss`] may take back).
    fn cut(
        &mut self,
        media: &RecordingMedia,
        pending: &PendingLines,
        images: &[(CrashChoice, BackingLoss)],
        phase: Phase,
        what: &str,
        before: Option<&[u8]>,
    ) {
        let model = lock(&self.model).clone();
        let now = before.map(|_| read_backing(&self.backing, self.cfg.disk));
        let mut found = Vec::new();
        self.durable.capture(media);
        for &(choice, loss) in images {
            let changed = match (before, &now, loss) {
                (Some(before), Some(now), BackingLoss::All | BackingLoss::Random(_)) => {
                    set_backing(&self.backing, now, before, loss);
                    Some((before, now))
                }
                _ => None,
            };
            let image = Arc::new(self.durable.image(pending, choice));
            let bad = check_image(image, &self.opts, &self.backing, &model, self.cfg.disk);
            if let Some((before, now)) = changed {
                set_backing(&self.backing, now, before, BackingLoss::None);
            }
            if !bad.is_empty() {
                found.push(format!(
                    "{} seed {} {what} image {choice:?} backing loss {loss:?} ({} non-durable lines): {}",
                    self.cfg.model.name(),
                    self.cfg.seed,
                    pending.len(),
                    bad.join("; ")
                ));
            }
        }
        let mut r = lock(&self.report);
        r.cuts += 1;
        r.cuts_by_phase[phase as usize] += 1;
        r.images += images.len() as u64;
        if !pending.is_empty() {
            r.images_with_pending += images.len() as u64;
        }
        r.violations.extend(found);
    }
}

/// The whole backing image.
fn read_backing(backing: &BackingImage, disk: u64) -> Vec<u8> {
    let mut buf = vec![0u8; disk as usize];
    backing.read_at(0, &mut buf).unwrap();
    buf
}

/// Make the sectors where `now` and `before` differ hold `before` where `loss` takes the
/// write back, `now` elsewhere; consecutive sectors with the same choice are one write.
fn set_backing(backing: &BackingImage, now: &[u8], before: &[u8], loss: BackingLoss) {
    let mut rng = Rng(match loss {
        BackingLoss::Random(seed) => seed,
        _ => 0,
    });
    let sectors = now.len() / SECTOR;
    // The run being gathered: first sector, and whether it takes `before`.
    let mut run: Option<(usize, bool)> = None;
    for s in 0..=sectors {
        let at = s * SECTOR;
        let choice =
            (s < sectors && now[at..at + SECTOR] != before[at..at + SECTOR]).then(|| match loss {
                BackingLoss::None => false,
                BackingLoss::All => true,
                BackingLoss::Random(_) => rng.below(2) == 0,
            });
        if let Some((first, lose)) = run {
            if choice != Some(lose) {
                let src = if lose { before } else { now };
                let range = first * SECTOR..at;
                backing.write_at(range.start as u64, &src[range]).unwrap();
                run = None;
            }
        }
        if let (None, Some(lose)) = (run, choice) {
            run = Some((s, lose));
        }
    }
}

/// Reopen one crash image on the backing image as it is now, read the whole disk and compare
/// it with `model`.
pub fn check_image(
    media: Arc<dyn Media>,
    opts: &CacheOptions,
    backing: &Arc<BackingImage>,
    model: &Model,
    disk: u64,
) -> Vec<String> {
    match CacheEngine::open_stepped(opts, media, backing.clone()) {
        Err(e) => vec![format!("the crash image does not open: {e}")],
        Ok(engine) => {
            let mut d = Driver::new(&engine);
            let bad = checker::check_disk(&mut d, model, disk);
            drop(d);
            engine.shutdown_for_crash_test();
            bad
        }
    }
}
