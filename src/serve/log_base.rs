// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Keeps the frontend's dirty log applied to guest memory that is mapped after it was set.
//!
//! vhost-user-backend attaches the log (SET_LOG_BASE) to the memory regions that exist when it
//! arrives; regions from a later SET_MEM_TABLE or ADD_MEM_REG start with no log, and QEMU sends
//! SET_LOG_BASE again only when the log grows. Pages the daemon then wrote into such regions
//! during a migration would not be marked and the copy would keep their old contents. So while
//! logging is on (`VHOST_F_LOG_ALL` acked and a log set), the relay sends the last SET_LOG_BASE
//! to the daemon again right after each memory-table change, and drops the daemon's answer to
//! it, which the frontend does not expect.

use std::collections::VecDeque;
use std::fs::File;

use log::{debug, warn};

use super::relay::{Message, FLAG_REPLY, FLAG_VERSION};

const SET_FEATURES: u32 = 2;
const SET_MEM_TABLE: u32 = 5;
const SET_LOG_BASE: u32 = 6;
const ADD_MEM_REG: u32 = 37;
const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// The last SET_LOG_BASE the frontend sent, kept to be sent again.
struct SavedLog {
    body: Vec<u8>,
    file: File,
}

#[derive(Default)]
pub struct LogBaseReplay {
    log_all: bool,
    saved: Option<SavedLog>,
    /// One entry per SET_LOG_BASE sent to the daemon and not answered yet, in order (the daemon
    /// answers in order): `true` for the ones the relay sent itself.
    pending: VecDeque<bool>,
}

impl LogBaseReplay {
    /// Notes `msg`, which the frontend sent and the relay has just forwarded to the daemon;
    /// returns a SET_LOG_BASE to forward after it when `msg` changed the memory table while
    /// logging is on.
    pub fn after_forwarding(&mut self, msg: &Message) -> Option<Message> {
        match msg.request {
            SET_FEATURES => {
                if let Some(bytes) = msg.body.get(..8) {
                    let features = u64::from_le_bytes(bytes.try_into().unwrap());
                    self.log_all = features & VHOST_F_LOG_ALL != 0;
                }
                None
            }
            SET_LOG_BASE => {
                self.pending.push_back(false);
                self.saved = match &msg.files[..] {
                    [file] => match file.try_clone() {
                        Ok(file) => Some(SavedLog {
                            body: msg.body.clone(),
                            file,
                        }),
                        Err(e) => {
                            warn!("cannot keep the dirty log for later memory regions: {e}");
                            None
                        }
                    },
                    _ => None,
                };
                None
            }
            SET_MEM_TABLE | ADD_MEM_REG if self.log_all => {
                let saved = self.saved.as_ref()?;
                let file = match saved.file.try_clone() {
                    Ok(file) => file,
                    Err(e) => {
                        warn!("cannot apply the dirty log to the new memory table: {e}");
                        return None;
                    }
                };
                debug!("applying the dirty log to the new memory table");
                self.pending.push_back(true);
                Some(Message {
                    request: SET_LOG_BASE,
                    flags: FLAG_VERSION,
                    body: saved.body.clone(),
                    files: vec![file],
                })
            }
            _ => None,
        }
    }

    /// Whether `msg`, from the daemon, answers a SET_LOG_BASE the relay sent itself (and so
    /// must not reach the frontend).
    pub fn swallow(&mut self, msg: &Message) -> bool {
        msg.request == SET_LOG_BASE
            && msg.flags & FLAG_REPLY != 0
            && self.pending.pop_front() == Some(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    fn message(request: u32, body: Vec<u8>, files: Vec<File>) -> Message {
        Message {
            request,
            flags: FLAG_VERSION,
            body,
            files,
        }
    }

    fn features(log_all: bool) -> Message {
        let bits = if log_all { VHOST_F_LOG_ALL } else { 0 } | 1 << 32;
        message(SET_FEATURES, bits.to_le_bytes().to_vec(), Vec::new())
    }

    fn answer(request: u32) -> Message {
        Message {
            request,
            flags: FLAG_VERSION | FLAG_REPLY,
            body: vec![0; 16],
            files: Vec::new(),
        }
    }

    #[test]
    fn the_log_is_sent_again_after_memory_changes_only_while_logging() {
        let mut replay = LogBaseReplay::default();
        let mut log = tempfile::tempfile().unwrap();
        log.write_all(b"log").unwrap();
        let table = || message(SET_MEM_TABLE, vec![0; 8], Vec::new());

        assert!(replay.after_forwarding(&table()).is_none(), "no log yet");
        assert!(replay.after_forwarding(&features(true)).is_none());
        let set_log = message(SET_LOG_BASE, vec![9; 16], vec![log]);
        assert!(replay.after_forwarding(&set_log).is_none());
        // The frontend's own SET_LOG_BASE is answered to the frontend.
        assert!(!replay.swallow(&answer(SET_LOG_BASE)));

        for request in [SET_MEM_TABLE, ADD_MEM_REG] {
            let again = replay
                .after_forwarding(&message(request, vec![0; 8], Vec::new()))
                .expect("the log is sent again after a memory change");
            assert_eq!(
                (again.request, again.flags, &again.body[..]),
                (SET_LOG_BASE, FLAG_VERSION, &[9; 16][..])
            );
            let mut file = again.files.into_iter().next().expect("with the log's fd");
            let mut text = String::new();
            file.rewind().unwrap();
            file.read_to_string(&mut text).unwrap();
            assert_eq!(text, "log");
            // Other answers pass; the one to the relay's SET_LOG_BASE is dropped, once.
            assert!(!replay.swallow(&answer(request)));
            assert!(replay.swallow(&answer(SET_LOG_BASE)));
            assert!(!replay.swallow(&answer(SET_LOG_BASE)));
        }

        assert!(replay.after_forwarding(&features(false)).is_none());
        assert!(
            replay.after_forwarding(&table()).is_none(),
            "logging is off: nothing to apply"
        );
    }
}
