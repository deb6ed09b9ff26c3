// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Identity lookup over fake sysfs and udev trees laid out as the kernel lays them out.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::*;
use crate::backing::testutil::loop_device::Loop;

/// A temporary sysfs (`sys/`) and udev database (`udev/`).
struct FakeSys {
    dir: tempfile::TempDir,
}

impl FakeSys {
    fn new() -> FakeSys {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sys/dev/block")).unwrap();
        std::fs::create_dir_all(dir.path().join("udev")).unwrap();
        FakeSys { dir }
    }

    fn roots(&self) -> SysRoots {
        SysRoots {
            sysfs: self.dir.path().join("sys"),
            udev_data: self.dir.path().join("udev"),
        }
    }

    /// A whole disk: its directory under `devices/`, and the `dev/block/MAJ:MIN` link to it.
    fn disk(&self, name: &str, major: u32, minor: u32) -> PathBuf {
        let dir = self.dir.path().join("sys/devices/virtual/block").join(name);
        self.device_at(dir, major, minor)
    }

    /// A partition: a subdirectory of its disk's directory, with its number.
    fn partition(&self, disk: &Path, name: &str, major: u32, minor: u32, number: u32) -> PathBuf {
        let dir = self.device_at(disk.join(name), major, minor);
        attr(&dir, "partition", format!("{number}\n").as_bytes());
        dir
    }

    fn device_at(&self, dir: PathBuf, major: u32, minor: u32) -> PathBuf {
        std::fs::create_dir_all(&dir).unwrap();
        attr(&dir, "dev", format!("{major}:{minor}\n").as_bytes());
        let link = self
            .dir
            .path()
            .join(format!("sys/dev/block/{major}:{minor}"));
        std::os::unix::fs::symlink(&dir, link).unwrap();
        dir
    }

    fn udev(&self, major: u32, minor: u32, text: &str) {
        let path = self.dir.path().join(format!("udev/b{major}:{minor}"));
        std::fs::write(path, text).unwrap();
    }

    fn identity(&self, major: u32, minor: u32) -> BlockIdentity {
        block_device_identity(&self.roots(), major, minor).unwrap()
    }
}

/// Write attribute `rel` (which may name subdirectories) of the device in `dir`.
fn attr(dir: &Path, rel: &str, content: &[u8]) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

fn id(kind: IdentityKind, value: &str) -> BlockIdentity {
    BlockIdentity {
        kind,
        value: value.to_owned(),
    }
}

#[test]
fn dm_uuid_comes_first() {
    let sys = FakeSys::new();
    let dm = sys.disk("dm-3", 252, 3);
    attr(&dm, "dm/uuid", b"LVM-abcdef0123456789\n");
    attr(&dm, "dm/name", b"vg-vm1\n");
    attr(&dm, "wwid", b"naa.5000c500a1b2c3d4\n");
    attr(&dm, "serial", b"SER1\n");
    assert_eq!(
        sys.identity(252, 3),
        id(IdentityKind::DmUuid, "LVM-abcdef0123456789")
    );
}

#[test]
fn wwid_before_serial_from_the_device_or_its_parent_device() {
    let sys = FakeSys::new();
    let nvme = sys.disk("nvme0n1", 259, 0);
    attr(&nvme, "wwid", b"eui.0025388b91b3d1f2\n");
    attr(&nvme, "device/serial", b"S4EWNX0R123456\n");
    assert_eq!(
        sys.identity(259, 0),
        id(IdentityKind::Wwid, "eui.0025388b91b3d1f2")
    );

    let sd = sys.disk("sda", 8, 0);
    attr(&sd, "device/wwid", b"naa.600508b1001c4d2a\n");
    attr(&sd, "serial", b"SER1\n");
    assert_eq!(
        sys.identity(8, 0),
        id(IdentityKind::Wwid, "naa.600508b1001c4d2a")
    );
}

#[test]
fn serial_with_the_namespace_id_when_namespaces_share_it() {
    let sys = FakeSys::new();
    let vda = sys.disk("vda", 254, 0);
    // virtio-blk's serial has no trailing newline.
    attr(&vda, "serial", b"vm1-root");
    assert_eq!(sys.identity(254, 0), id(IdentityKind::Serial, "vm1-root"));

    let ns = sys.disk("nvme0n2", 259, 1);
    attr(&ns, "device/serial", b"S4EWNX0R123456      \n");
    attr(&ns, "nsid", b"2\n");
    assert_eq!(
        sys.identity(259, 1),
        id(IdentityKind::Serial, "S4EWNX0R123456 namespace 2")
    );
}

#[test]
fn whitespace_and_nuls_around_a_value_are_trimmed_and_inner_spaces_kept() {
    let sys = FakeSys::new();
    let sd = sys.disk("sdb", 8, 16);
    attr(
        &sd,
        "device/wwid",
        b"  t10.ATA     QEMU HARDDISK   QM00001  \n\0\0",
    );
    assert_eq!(
        sys.identity(8, 16),
        id(IdentityKind::Wwid, "t10.ATA     QEMU HARDDISK   QM00001")
    );
}

#[test]
fn unusable_values_fall_through_to_the_next_source() {
    let sys = FakeSys::new();
    let cases: [(&[u8], &str); 7] = [
        (b"", "empty"),
        (b" \n\t\n", "only whitespace"),
        (b"naa.\xff\xfe5000\n", "not UTF-8"),
        (b"naa.50\x0100\n", "a control character"),
        (b"eui.0000000000000000\n", "an all-zero placeholder"),
        (b"0000-0000 00\n", "zeroes and separators"),
        (&[b'a'; MAX_IDENTITY_LEN + 1], "too long"),
    ];
    for (minor, (wwid, what)) in cases.into_iter().enumerate() {
        let minor = minor as u32;
        let disk = sys.disk(&format!("sd{minor}"), 8, minor);
        attr(&disk, "wwid", wwid);
        attr(&disk, "serial", b"SER-OK\n");
        assert_eq!(
            sys.identity(8, minor),
            id(IdentityKind::Serial, "SER-OK"),
            "a wwid that is {what}"
        );
    }
}

#[test]
fn nothing_stable_falls_back_to_the_device_number() {
    let sys = FakeSys::new();
    let disk = sys.disk("zram0", 253, 0);
    attr(&disk, "serial", b"00000000\n");
    attr(&disk, "device/wwid", b"\n");
    let found = sys.identity(253, 0);
    assert_eq!(found, id(IdentityKind::DeviceNumber, "253:0"));
    assert!(!found.kind.is_stable());
    assert_eq!(found.to_string(), "device-number 253:0");
}

#[test]
fn a_device_missing_from_sysfs_is_an_error() {
    let sys = FakeSys::new();
    let err = block_device_identity(&sys.roots(), 8, 99).unwrap_err();
    assert!(
        matches!(
            err,
            IdentityError::NoSysfsEntry {
                major: 8,
                minor: 99,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("8:99"), "{err}");
}

#[test]
fn an_attribute_that_cannot_be_read_is_an_error_not_a_fallback() {
    let sys = FakeSys::new();
    let disk = sys.disk("sdc", 8, 32);
    // Reading a directory fails with EISDIR: not "absent", so not silently skipped.
    std::fs::create_dir_all(disk.join("wwid")).unwrap();
    attr(&disk, "serial", b"SER1\n");
    let err = block_device_identity(&sys.roots(), 8, 32).unwrap_err();
    assert!(matches!(err, IdentityError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("wwid"), "{err}");
}

#[test]
fn a_loop_device_is_its_backing_file_and_offset() {
    let sys = FakeSys::new();
    let file = sys.dir.path().join("disk.img");
    std::fs::write(&file, b"image").unwrap();
    let meta = std::fs::metadata(&file).unwrap();
    let lo = sys.disk("loop0", 7, 0);
    attr(
        &lo,
        "loop/backing_file",
        format!("{}\n", file.display()).as_bytes(),
    );
    attr(&lo, "loop/offset", b"4096\n");
    let want = format!(
        "{}:{} inode {} offset 4096",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    assert_eq!(sys.identity(7, 0), id(IdentityKind::LoopFile, &want));

    // Same file, another offset: another disk.
    let lo1 = sys.disk("loop1", 7, 1);
    attr(
        &lo1,
        "loop/backing_file",
        format!("{}\n", file.display()).as_bytes(),
    );
    attr(&lo1, "loop/offset", b"0\n");
    assert_ne!(sys.identity(7, 1), sys.identity(7, 0));
}

#[test]
fn a_loop_device_whose_file_is_gone_has_only_its_number() {
    let sys = FakeSys::new();
    let lo = sys.disk("loop2", 7, 2);
    let gone = sys.dir.path().join("gone.img");
    attr(
        &lo,
        "loop/backing_file",
        format!("{} (deleted)\n", gone.display()).as_bytes(),
    );
    assert_eq!(sys.identity(7, 2), id(IdentityKind::DeviceNumber, "7:2"));
    attr(
        &lo,
        "loop/backing_file",
        format!("{}\n", gone.display()).as_bytes(),
    );
    assert_eq!(sys.identity(7, 2), id(IdentityKind::DeviceNumber, "7:2"));
}

/// A block device node for `major:minor` in `dir`, or `None` where nodes cannot be made.
fn device_node(dir: &Path, major: u32, minor: u32) -> Option<PathBuf> {
    let node = dir.join(format!("node-{major}-{minor}"));
    let made = std::process::Command::new("mknod")
        .arg(&node)
        .arg("b")
        .arg(major.to_string())
        .arg(minor.to_string())
        .output()
        .is_ok_and(|out| out.status.success());
    if !made {
        eprintln!("skipped: cannot create a block device node (needs root)");
        return None;
    }
    Some(node)
}

#[test]
fn a_loop_device_over_a_block_device_is_that_device_and_the_offset() {
    let sys = FakeSys::new();
    let Some(node) = device_node(sys.dir.path(), 8, 48) else {
        return;
    };
    let sd = sys.disk("sdd", 8, 48);
    attr(&sd, "device/wwid", b"naa.5000c500deadbeef\n");
    let lo = sys.disk("loop3", 7, 3);
    attr(
        &lo,
        "loop/backing_file",
        format!("{}\n", node.display()).as_bytes(),
    );
    attr(&lo, "loop/offset", b"512\n");
    assert_eq!(
        sys.identity(7, 3),
        id(
            IdentityKind::LoopFile,
            "on wwid naa.5000c500deadbeef offset 512"
        )
    );
}

#[test]
fn a_loop_device_over_itself_is_refused_not_followed_forever() {
    let sys = FakeSys::new();
    let Some(node) = device_node(sys.dir.path(), 7, 4) else {
        return;
    };
    let lo = sys.disk("loop4", 7, 4);
    attr(
        &lo,
        "loop/backing_file",
        format!("{}\n", node.display()).as_bytes(),
    );
    let err = block_device_identity(&sys.roots(), 7, 4).unwrap_err();
    assert!(matches!(err, IdentityError::TooDeep { .. }), "{err:?}");
}

#[test]
fn a_partition_is_its_disk_and_number_else_its_partuuid() {
    let sys = FakeSys::new();
    let sd = sys.disk("sde", 8, 64);
    attr(&sd, "device/wwid", b"naa.5000c500a1b2c3d4\n");
    sys.partition(&sd, "sde2", 8, 66, 2);
    sys.udev(
        8,
        66,
        "S:disk/by-partuuid/1234\nE:ID_PART_ENTRY_UUID=1234\n",
    );
    assert_eq!(
        sys.identity(8, 66),
        id(
            IdentityKind::Partition,
            "wwid naa.5000c500a1b2c3d4 partition 2"
        )
    );

    // A disk without a stable identity: the partition table's UUID for the partition.
    let vdb = sys.disk("vdb", 254, 16);
    sys.partition(&vdb, "vdb1", 254, 17, 1);
    sys.udev(
        254,
        17,
        "I:123\nE:ID_PART_ENTRY_SCHEME=gpt\nE:ID_PART_ENTRY_UUID=4f68bce3-e8cd-4db1-96e7-fbcaf984b709\n",
    );
    assert_eq!(
        sys.identity(254, 17),
        id(
            IdentityKind::PartUuid,
            "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
        )
    );

    // Neither (no udev, or a garbage entry): the device number.
    sys.partition(&vdb, "vdb2", 254, 18, 2);
    assert_eq!(
        sys.identity(254, 18),
        id(IdentityKind::DeviceNumber, "254:18")
    );
    sys.partition(&vdb, "vdb3", 254, 19, 3);
    sys.udev(254, 19, "E:ID_PART_ENTRY_UUID=\n");
    assert_eq!(
        sys.identity(254, 19),
        id(IdentityKind::DeviceNumber, "254:19")
    );
}

#[test]
fn a_dm_device_without_uuid_is_known_by_its_name() {
    let sys = FakeSys::new();
    let dm = sys.disk("dm-0", 252, 0);
    attr(&dm, "dm/uuid", b"\n");
    attr(&dm, "dm/name", b"backing-vm1\n");
    assert_eq!(
        sys.identity(252, 0),
        id(IdentityKind::DmName, "backing-vm1")
    );
}

#[test]
fn an_unreadable_udev_database_is_an_error() {
    // A directory in place of the file: reading it fails (permissions would not stop root).
    let sys = FakeSys::new();
    let vdc = sys.disk("vdc", 254, 32);
    sys.partition(&vdc, "vdc1", 254, 33, 1);
    let entry = sys.roots().udev_data.join("b254:33");
    std::fs::create_dir(&entry).unwrap();
    let err = block_device_identity(&sys.roots(), 254, 33).unwrap_err();
    assert!(matches!(err, IdentityError::Read { .. }), "{err:?}");
}

#[test]
fn kind_codes_round_trip_and_unknown_codes_are_refused() {
    for kind in IdentityKind::ALL {
        assert_eq!(IdentityKind::from_code(kind.code()), Some(kind));
    }
    let names: std::collections::HashSet<_> = IdentityKind::ALL.iter().map(|k| k.name()).collect();
    assert_eq!(names.len(), IdentityKind::ALL.len());
    assert_eq!(IdentityKind::from_code(0), None);
    assert_eq!(IdentityKind::from_code(9), None);
}

#[test]
fn device_numbers_parse_as_sysfs_writes_them() {
    assert_eq!(parse_dev("259:12\n"), Some((259, 12)));
    assert_eq!(parse_dev("8:0"), Some((8, 0)));
    assert_eq!(parse_dev("8"), None);
    assert_eq!(parse_dev("a:1"), None);
    assert_eq!(parse_dev("1:-1"), None);
}

#[test]
fn a_real_loop_device_is_known_by_its_file_on_the_real_sysfs() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
    let Some(dev) = Loop::attach(&file, None) else {
        return;
    };
    let node = std::fs::metadata(dev.device()).unwrap();
    let found = identity_of_rdev(node.rdev());
    drop(dev);
    assert!(node.file_type().is_block_device());
    let meta = std::fs::metadata(&file).unwrap();
    let want = format!(
        "{}:{} inode {} offset 0",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    assert_eq!(found.unwrap(), id(IdentityKind::LoopFile, &want));
}

#[test]
fn stable_paths_follow_udevs_rules_where_they_name_the_identity_alone() {
    let path = |kind, value| id(kind, value).stable_path();
    assert_eq!(
        path(IdentityKind::DmUuid, "LVM-abc").as_deref(),
        Some("/dev/disk/by-id/dm-uuid-LVM-abc")
    );
    assert_eq!(
        path(IdentityKind::Wwid, "naa.5000c500a1b2c3d4").as_deref(),
        Some("/dev/disk/by-id/wwn-0x5000c500a1b2c3d4")
    );
    assert_eq!(
        path(IdentityKind::Wwid, "eui.0025388b91b3d1f2").as_deref(),
        Some("/dev/disk/by-id/nvme-eui.0025388b91b3d1f2")
    );
    assert_eq!(
        path(IdentityKind::PartUuid, "1234-01").as_deref(),
        Some("/dev/disk/by-partuuid/1234-01")
    );
    assert_eq!(
        path(IdentityKind::DmName, "vg-vm1").as_deref(),
        Some("/dev/mapper/vg-vm1")
    );
    assert_eq!(path(IdentityKind::Wwid, "t10.ATA     QEMU"), None);
    assert_eq!(path(IdentityKind::Serial, "vm1-root"), None);
    assert_eq!(path(IdentityKind::DeviceNumber, "8:0"), None);
}
