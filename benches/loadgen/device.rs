// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Connection to the backend through libblkio, and the request buffers it must allocate.

use anyhow::{bail, Context, Result};
use blkio::{Blkio, Blkioq, MemoryRegion};
use std::path::Path;

/// libblkio's own default; raised only when the queue depth needs more descriptors.
const DEFAULT_QUEUE_SIZE: u32 = 256;
/// Header, data and status: one request's descriptors without indirect tables.
const DESCRIPTORS_PER_REQUEST: u32 = 3;

pub struct Device {
    pub queues: Vec<Blkioq>,
    pub capacity: u64,
    pub request_alignment: u64,
    pub max_transfer: u64,
    region: MemoryRegion,
    // Dropped last: the queues and the buffer region belong to this instance.
    _blkio: Blkio,
}

fn blkio_error(what: &str) -> impl FnOnce(blkio::Error) -> anyhow::Error + '_ {
    move |error| anyhow::anyhow!("{what}: {error} (errno {})", error.errno().raw_os_error())
}

impl Device {
    /// Connects to `socket`, starts `queues` queues and maps `buffer_bytes` of request buffers.
    pub fn open(socket: &Path, queues: u32, iodepth: u32, buffer_bytes: u64) -> Result<Self> {
        let path = socket
            .to_str()
            .with_context(|| format!("socket path {} is not UTF-8", socket.display()))?;
        let mut blkio = Blkio::new("virtio-blk-vhost-user")
            .map_err(blkio_error("creating libblkio instance"))?;
        blkio
            .set_str("path", path)
            .map_err(blkio_error("setting the socket path"))?;
        blkio
            .connect()
            .map_err(blkio_error(&format!("connecting to {path}")))?;

        let max_queues = blkio
            .get_i32("max-queues")
            .map_err(blkio_error("reading max-queues"))?;
        if i64::from(queues) > i64::from(max_queues) {
            bail!("--queues {queues} asked, but the device offers only {max_queues}");
        }
        blkio
            .set_i32("num-queues", queues as i32)
            .map_err(blkio_error("setting num-queues"))?;
        let wanted = (iodepth * DESCRIPTORS_PER_REQUEST).next_power_of_two();
        if wanted > DEFAULT_QUEUE_SIZE {
            let max = blkio
                .get_i32("max-queue-size")
                .map_err(blkio_error("reading max-queue-size"))?;
            let size = wanted.min(max.max(1) as u32);
            blkio
                .set_i32("queue-size", size as i32)
                .map_err(blkio_error("setting queue-size"))?;
        }

        let started = blkio.start().map_err(blkio_error("starting the device"))?;
        let capacity = blkio
            .get_u64("capacity")
            .map_err(blkio_error("reading capacity"))?;
        let request_alignment = blkio
            .get_i32("request-alignment")
            .map_err(blkio_error("reading request-alignment"))?
            as u64;
        let max_transfer = blkio
            .get_i32("max-transfer")
            .map_err(blkio_error("reading max-transfer"))? as u64;
        let alignment = blkio
            .get_u64("mem-region-alignment")
            .map_err(blkio_error("reading mem-region-alignment"))?
            .max(1);

        let length = buffer_bytes.div_ceil(alignment) * alignment;
        let length = usize::try_from(length).context("request buffers do not fit in memory")?;
        let region = blkio
            .alloc_mem_region(length)
            .map_err(blkio_error("allocating request buffers"))?;
        blkio
            .map_mem_region(&region)
            .map_err(blkio_error("sharing request buffers with the backend"))?;

        Ok(Self {
            queues: started.queues,
            capacity,
            request_alignment,
            max_transfer,
            region,
            _blkio: blkio,
        })
    }

    /// The queues, each with its own share of the request buffers.
    pub fn queues_and_buffers(&mut self, bytes_per_queue: usize) -> Vec<(&mut Blkioq, &mut [u8])> {
        // SAFETY: the region is a mapping of `region.len` bytes that lives as long as
        // `self._blkio`, which outlives the returned borrow of `self`. The backend writes into
        // it only while a read is in flight on a slot, and no slot is touched by this process
        // between submission and completion.
        let buffers =
            unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) };
        self.queues
            .iter_mut()
            .zip(buffers.chunks_mut(bytes_per_queue))
            .collect()
    }
}
