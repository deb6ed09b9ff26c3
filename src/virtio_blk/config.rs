// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-blk config space: a 96-byte little-endian `virtio_blk_config`, and the device
//! description it is built from.

use crate::engine::SECTOR_SIZE;

/// Size of `virtio_blk_config` including the zoned fields. Frontends read a prefix of it whose
/// length depends on the features they know (QEMU 57, libblkio and Cloud Hypervisor 60).
pub const CONFIG_SPACE_LEN: usize = 96;

/// Offset of the `writeback` byte, the only field a driver may write.
pub const WRITEBACK_OFFSET: usize = 32;

/// Length of the serial number answered to GET_ID.
pub const SERIAL_LEN: usize = 20;

/// What the device looks like to the guest: everything the config space and the request codec
/// need to agree on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Size in bytes, a multiple of [`SECTOR_SIZE`].
    pub capacity: u64,
    pub read_only: bool,
    pub num_queues: u16,
    /// Most data descriptors per request (`seg_max`).
    pub seg_max: u32,
    /// Largest single data descriptor in bytes (`size_max`).
    pub size_max: u32,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    /// GET_ID answer, NUL-padded ASCII.
    pub serial: [u8; SERIAL_LEN],
}

impl DeviceInfo {
    /// A device of `capacity` bytes with this daemon's standard limits.
    ///
    /// `seg_max` stays at 126 so a request fits a 128-entry ring even without indirect
    /// descriptors; one discard / write-zeroes segment per request keeps one request per chain.
    pub fn new(capacity: u64, read_only: bool, num_queues: u16, serial: &str) -> Self {
        DeviceInfo {
            capacity,
            read_only,
            num_queues,
            seg_max: 126,
            size_max: 1 << 20,
            max_discard_sectors: 1 << 22,
            max_discard_seg: 1,
            max_write_zeroes_sectors: 1 << 22,
            max_write_zeroes_seg: 1,
            serial: serial_bytes(serial),
        }
    }

    /// The full config space; `writeback` is the engine's current write-cache setting.
    pub fn config_space(&self, writeback: bool) -> [u8; CONFIG_SPACE_LEN] {
        let mut c = [0u8; CONFIG_SPACE_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            c[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0, &(self.capacity / SECTOR_SIZE).to_le_bytes());
        put(8, &self.size_max.to_le_bytes());
        put(12, &self.seg_max.to_le_bytes());
        // 16..20: geometry, not offered.
        put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        put(24, &[3]); // physical_block_exp: 4 KiB physical blocks
        put(25, &[0]); // alignment_offset
        put(26, &8u16.to_le_bytes()); // min_io_size, in logical blocks
        put(28, &0u32.to_le_bytes()); // opt_io_size: no preference
        put(WRITEBACK_OFFSET, &[u8::from(writeback)]);
        put(34, &self.num_queues.to_le_bytes());
        put(36, &self.max_discard_sectors.to_le_bytes());
        put(40, &self.max_discard_seg.to_le_bytes());
        put(44, &8u32.to_le_bytes()); // discard_sector_alignment: a hint, 4 KiB
        put(48, &self.max_write_zeroes_sectors.to_le_bytes());
        put(52, &self.max_write_zeroes_seg.to_le_bytes());
        put(56, &[1]); // write_zeroes_may_unmap
        c
    }

    /// Exactly `size` bytes of the config space from `offset`, zero-padded past its end: the
    /// vhost-user GET_CONFIG reply must have the requested size or the frontend rejects it.
    pub fn config_slice(&self, writeback: bool, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space(writeback);
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_SPACE_LEN);
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(CONFIG_SPACE_LEN);
        out[..end - start].copy_from_slice(&space[start..end]);
        out
    }
}

/// Why a SET_CONFIG was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigWriteError {
    #[error("config write at offset {offset} length {len} touches read-only fields")]
    ReadOnlyField { offset: u32, len: usize },
}

/// Interprets a SET_CONFIG: only the `writeback` byte is writable. Returns the new setting.
pub fn parse_config_write(offset: u32, data: &[u8]) -> Result<bool, ConfigWriteError> {
    if offset as usize == WRITEBACK_OFFSET && data.len() == 1 {
        Ok(data[0] != 0)
    } else {
        Err(ConfigWriteError::ReadOnlyField {
            offset,
            len: data.len(),
        })
    }
}

fn serial_bytes(serial: &str) -> [u8; SERIAL_LEN] {
    let mut out = [0u8; SERIAL_LEN];
    let bytes = serial.as_bytes();
    let n = bytes.len().min(SERIAL_LEN);
    out[..n].copy_from_slice(&bytes[..n]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> DeviceInfo {
        DeviceInfo::new(8 << 30, false, 4, "disk0")
    }

    fn le32(c: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(c[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn layout_is_little_endian_at_spec_offsets() {
        let c = info().config_space(true);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (8u64 << 30) / 512
        );
        assert_eq!(le32(&c, 8), 1 << 20);
        assert_eq!(le32(&c, 12), 126);
        assert_eq!(le32(&c, 20), 512);
        assert_eq!(c[WRITEBACK_OFFSET], 1);
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 4);
        assert_eq!(le32(&c, 40), 1);
        assert_eq!(le32(&c, 52), 1);
        assert_eq!(c[56], 1);
        assert!(c[57..].iter().all(|&b| b == 0), "padding must be zero");
        assert_eq!(info().config_space(false)[WRITEBACK_OFFSET], 0);
    }

    #[test]
    fn slices_have_exactly_the_requested_size() {
        let full = info().config_space(true);
        for (offset, size) in [(0u32, 57u32), (0, 60), (0, 36), (0, 96), (32, 1), (90, 20)] {
            let s = info().config_slice(true, offset, size);
            assert_eq!(s.len(), size as usize);
            let end = ((offset + size) as usize).min(CONFIG_SPACE_LEN);
            assert_eq!(&s[..end - offset as usize], &full[offset as usize..end]);
            assert!(s[end - offset as usize..].iter().all(|&b| b == 0));
        }
        assert_eq!(info().config_slice(true, 200, 4), vec![0; 4]);
        assert_eq!(info().config_slice(true, u32::MAX, 4), vec![0; 4]);
    }

    #[test]
    fn only_the_writeback_byte_is_writable() {
        assert_eq!(parse_config_write(32, &[0]), Ok(false));
        assert_eq!(parse_config_write(32, &[1]), Ok(true));
        assert!(parse_config_write(0, &[1]).is_err());
        assert!(parse_config_write(32, &[1, 0]).is_err());
        assert!(parse_config_write(33, &[1]).is_err());
    }

    #[test]
    fn serial_is_truncated_and_nul_padded() {
        let long = DeviceInfo::new(512, false, 1, "abcdefghijklmnopqrstuvwxyz");
        assert_eq!(&long.serial, b"abcdefghijklmnopqrst");
        assert_eq!(&info().serial[..6], b"disk0\0");
    }
}
