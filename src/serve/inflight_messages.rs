// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! GET_INFLIGHT_FD and SET_INFLIGHT_FD, answered for the vhost-user-backend daemon (which
//! refuses them): the first creates the shared area the frontend keeps across backend
//! restarts, the second hands it (back) to the backend.

use log::warn;

use super::relay::{Intercept, Message};
use crate::backend::BlkBackend;
use crate::engine::ErrorChain;
use crate::virtio_blk::inflight::InflightArea;

const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
/// `{u64 mmap_size; u64 mmap_offset; u16 num_queues; u16 queue_size}`, padded to 24 by C
/// frontends.
const INFLIGHT_LEN: usize = 20;
const INFLIGHT_REPLY_LEN: usize = 24;

pub struct InflightMessages<'a> {
    pub backend: &'a BlkBackend,
}

struct InflightInfo {
    mmap_size: u64,
    mmap_offset: u64,
    num_queues: u16,
    queue_size: u16,
}

impl InflightInfo {
    fn parse(body: &[u8]) -> Option<InflightInfo> {
        if body.len() < INFLIGHT_LEN {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().unwrap());
        let u16_at = |i: usize| u16::from_le_bytes(body[i..i + 2].try_into().unwrap());
        Some(InflightInfo {
            mmap_size: u64_at(0),
            mmap_offset: u64_at(8),
            num_queues: u16_at(16),
            queue_size: u16_at(18),
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(INFLIGHT_REPLY_LEN);
        body.extend_from_slice(&self.mmap_size.to_le_bytes());
        body.extend_from_slice(&self.mmap_offset.to_le_bytes());
        body.extend_from_slice(&self.num_queues.to_le_bytes());
        body.extend_from_slice(&self.queue_size.to_le_bytes());
        body.resize(INFLIGHT_REPLY_LEN, 0);
        body
    }
}

impl InflightMessages<'_> {
    fn get(&self, msg: &Message) -> Message {
        let no_area = |why: String| {
            warn!("no inflight area for the frontend: {why}");
            // A size of 0 tells the frontend to go on without inflight tracking.
            let info = InflightInfo {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: 0,
                queue_size: 0,
            };
            msg.reply(info.encode(), Vec::new())
        };
        let Some(asked) = InflightInfo::parse(&msg.body) else {
            return no_area(format!("a {}-byte GET_INFLIGHT_FD", msg.body.len()));
        };
        match InflightArea::create(asked.num_queues, asked.queue_size) {
            Ok((file, len)) => {
                let info = InflightInfo {
                    mmap_size: len,
                    mmap_offset: 0,
                    ..asked
                };
                msg.reply(info.encode(), vec![file])
            }
            Err(e) => no_area(e.to_string()),
        }
    }

    fn set(&self, msg: &Message) -> Result<(), SetInflightError> {
        let info = InflightInfo::parse(&msg.body).ok_or(SetInflightError::Size(msg.body.len()))?;
        let [file] = &msg.files[..] else {
            return Err(SetInflightError::Descriptors(msg.files.len()));
        };
        let area = InflightArea::map(
            file,
            info.mmap_offset,
            info.mmap_size,
            info.num_queues,
            info.queue_size,
        )
        .map_err(SetInflightError::Map)?;
        self.backend.set_inflight(area);
        Ok(())
    }
}

/// Why a frontend's inflight area was refused.
#[derive(Debug, thiserror::Error)]
enum SetInflightError {
    #[error("a {0}-byte SET_INFLIGHT_FD")]
    Size(usize),
    #[error("SET_INFLIGHT_FD with {0} descriptors")]
    Descriptors(usize),
    #[error("cannot map the area")]
    Map(#[source] std::io::Error),
}

impl Intercept for InflightMessages<'_> {
    fn intercept(&self, msg: Message) -> Result<Option<Message>, Message> {
        match msg.request {
            GET_INFLIGHT_FD => Ok(Some(self.get(&msg))),
            SET_INFLIGHT_FD => {
                let outcome = self.set(&msg);
                if let Err(e) = &outcome {
                    warn!("refusing the frontend's inflight area: {}", ErrorChain(e));
                }
                Ok(msg.needs_reply().then(|| msg.ack(outcome.is_ok())))
            }
            _ => Err(msg),
        }
    }
}
