// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Feature bits, request types and status codes of virtio-blk, and the sets this device offers.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

/// Request status codes, as written to the status byte.
pub const STATUS_OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
pub const STATUS_IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
pub const STATUS_UNSUPP: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

/// Length of the request header `{le32 type; le32 ioprio; le64 sector}`.
pub const REQUEST_HEADER_LEN: usize = 16;

/// Length of one discard / write-zeroes segment `{le64 sector; le32 num_sectors; le32 flags}`.
pub const DISCARD_SEGMENT_LEN: usize = 16;

fn bit(n: u32) -> u64 {
    1u64 << n
}

/// The virtio feature bits offered to the frontend. Every bit here is honoured by the request
/// codec; nothing is offered just to be negotiated away.
pub fn device_features(read_only: bool) -> u64 {
    let mut features = bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_CONFIG_WCE)
        | bit(VIRTIO_BLK_F_MQ)
        | bit(VIRTIO_BLK_F_DISCARD)
        | bit(VIRTIO_BLK_F_WRITE_ZEROES)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_F_VERSION_1)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | VhostUserVirtioFeatures::LOG_ALL.bits();
    if read_only {
        features |= bit(VIRTIO_BLK_F_RO);
    }
    features
}

/// The vhost-user protocol features offered. CONFIG is mandatory for QEMU's and Cloud
/// Hypervisor's blk frontends, REPLY_ACK and CONFIGURE_MEM_SLOTS for libblkio. INFLIGHT_SHMFD
/// lets a restarted daemon resubmit what a crashed one left in flight (its messages are
/// answered by the serve loop's relay, since the vhost-user-backend crate refuses them).
/// DEVICE_STATE (an empty state: stopped rings have nothing in flight) lets Cloud Hypervisor
/// take exact ring positions for snapshot and migration. LOG_SHMFD (with the LOG_ALL feature
/// bit) lets QEMU migrate and save the VM: every guest page the daemon writes is marked in the
/// frontend's dirty log. STATUS is absent: the vhost crate's backend handler cannot answer it.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::DEVICE_STATE
        | VhostUserProtocolFeatures::LOG_SHMFD
}

/// Whether `features` (a negotiated set) contains virtio-blk feature bit `n`.
pub fn has_feature(features: u64, n: u32) -> bool {
    features & bit(n) != 0
}

pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_CONFIG_WCE as F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH as F_FLUSH,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_every_handled_feature_and_protocol_bit() {
        let f = device_features(false);
        for n in [1, 2, 6, 9, 10, 11, 12, 13, 14, 26, 28, 29, 30, 32] {
            assert!(has_feature(f, n), "feature bit {n} missing");
        }
        assert!(!has_feature(f, VIRTIO_BLK_F_RO));
        // Features the codec does not implement must never be offered.
        for n in [0, 4, 7, 15, 16, 17, 34, 35, 38] {
            assert!(!has_feature(f, n), "feature bit {n} offered");
        }
    }

    #[test]
    fn read_only_adds_only_the_ro_bit() {
        assert_eq!(
            device_features(true) ^ device_features(false),
            1 << VIRTIO_BLK_F_RO
        );
    }

    #[test]
    fn protocol_features_match_what_frontends_require() {
        let p = protocol_features();
        assert!(p.contains(VhostUserProtocolFeatures::CONFIG));
        assert!(p.contains(VhostUserProtocolFeatures::MQ));
        assert!(p.contains(VhostUserProtocolFeatures::REPLY_ACK));
        assert!(p.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS));
        assert!(!p.contains(VhostUserProtocolFeatures::STATUS));
        assert!(p.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
        assert!(p.contains(VhostUserProtocolFeatures::DEVICE_STATE));
        // QEMU blocks migration and savevm without both dirty-logging bits.
        assert!(p.contains(VhostUserProtocolFeatures::LOG_SHMFD));
        assert!(has_feature(device_features(false), 26), "VHOST_F_LOG_ALL");
    }
}
