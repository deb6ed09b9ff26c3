// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The stable identity of a block device, so that a cache recognises its backing device by
//! what the device *is*, not by the name or device number it happens to have this boot.
//!
//! A device number (`major:minor`) is not an identity: device-mapper and loop minors are handed
//! out in creation order, so a reboot renumbers LVM volumes, and two disks of the same size can
//! swap names. The kernel (and udev) know better identities for most devices; they are read
//! from sysfs under a root given by the caller (tests build fake trees), in this order:
//!
//! 1. device-mapper UUID (`dm/uuid`: LVM, LUKS, multipath set one);
//! 2. WWID (`wwid`, `device/wwid`: NVMe namespaces, SCSI/SATA disks);
//! 3. serial number (`serial`, `device/serial`: virtio-blk, NVMe controllers — with the
//!    namespace id appended, as namespaces share their controller's serial);
//! 4. a loop device's backing file (its file system device, inode and offset, as `losetup
//!    --list` shows them; or, over a block device, that device's identity and the offset);
//! 5. a partition: its disk's stable identity and the partition number, else the partition
//!    table's UUID for it (PARTUUID, from udev's database: sysfs does not have it);
//! 6. a device-mapper name without UUID (chosen by whoever created it; stable across reboots,
//!    unlike its minor);
//! 7. nothing stable: the device number, [`IdentityKind::DeviceNumber`].
//!
//! A value that is empty, not printable text, unreasonably long, or an all-zero placeholder
//! (cheap devices report `eui.0000000000000000` or a serial of zeroes, shared by all of them)
//! does not count: the next source is tried.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Longest identity value kept, in bytes; a longer one is treated as garbage. Long enough for
/// every real identity (a device-mapper UUID is at most 128 bytes).
pub const MAX_IDENTITY_LEN: usize = 255;

/// How deep loop devices over partitions over loop devices... are followed.
const MAX_NESTING: u32 = 4;

/// Where the kernel's and udev's views of devices are mounted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysRoots {
    /// sysfs, normally `/sys`.
    pub sysfs: PathBuf,
    /// udev's device database, normally `/run/udev/data` (absent where udev does not run).
    pub udev_data: PathBuf,
}

impl Default for SysRoots {
    fn default() -> Self {
        SysRoots {
            sysfs: PathBuf::from("/sys"),
            udev_data: PathBuf::from("/run/udev/data"),
        }
    }
}

/// Where an identity came from. The code is what a cache stores on media: never renumber.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IdentityKind {
    /// No stable identity: the device number, valid only until the next reboot or re-creation.
    DeviceNumber = 1,
    DmUuid = 2,
    Wwid = 3,
    Serial = 4,
    LoopFile = 5,
    /// The stable identity of the partition's disk and the partition number.
    Partition = 6,
    PartUuid = 7,
    DmName = 8,
}

impl IdentityKind {
    const ALL: [IdentityKind; 8] = [
        IdentityKind::DeviceNumber,
        IdentityKind::DmUuid,
        IdentityKind::Wwid,
        IdentityKind::Serial,
        IdentityKind::LoopFile,
        IdentityKind::Partition,
        IdentityKind::PartUuid,
        IdentityKind::DmName,
    ];

    /// The tag stored on media.
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<IdentityKind> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }

    /// Name in messages and in the format document.
    pub fn name(self) -> &'static str {
        match self {
            IdentityKind::DeviceNumber => "device-number",
            IdentityKind::DmUuid => "dm-uuid",
            IdentityKind::Wwid => "wwid",
            IdentityKind::Serial => "serial",
            IdentityKind::LoopFile => "loop-file",
            IdentityKind::Partition => "partition",
            IdentityKind::PartUuid => "partuuid",
            IdentityKind::DmName => "dm-name",
        }
    }

    /// False only for [`IdentityKind::DeviceNumber`].
    pub fn is_stable(self) -> bool {
        self != IdentityKind::DeviceNumber
    }
}

impl fmt::Display for IdentityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A block device's identity: two devices are the same device when kind and value are equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlockIdentity {
    pub kind: IdentityKind,
    /// Printable text of at most [`MAX_IDENTITY_LEN`] bytes.
    pub value: String,
}

impl fmt::Display for BlockIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.value)
    }
}

impl BlockIdentity {
    /// Where udev's standard rules link the device with this identity, when they name it after
    /// the identity alone, so that an operator can point at the right device by a name that
    /// does not change. `None` for kinds udev names after more than the identity.
    pub fn stable_path(&self) -> Option<String> {
        let v = &self.value;
        match self.kind {
            IdentityKind::DmUuid => Some(format!("/dev/disk/by-id/dm-uuid-{v}")),
            IdentityKind::DmName => Some(format!("/dev/mapper/{v}")),
            IdentityKind::PartUuid => Some(format!("/dev/disk/by-partuuid/{v}")),
            IdentityKind::Wwid => {
                if let Some(naa) = v.strip_prefix("naa.") {
                    Some(format!("/dev/disk/by-id/wwn-0x{naa}"))
                } else if ["eui.", "uuid.", "nvme."].iter().any(|p| v.starts_with(p)) {
                    Some(format!("/dev/disk/by-id/nvme-{v}"))
                } else {
                    None
                }
            }
            _ => None,
        }
    }
}

/// Why the identity of a block device could not be determined. A source that is merely absent
/// or unusable is not an error (the next one is tried); these are the cases where looking
/// itself failed, so no answer, not even the device number, can be trusted to be the best one.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "block device {major}:{minor} has no entry {} (is sysfs mounted?)",
        path.display()
    )]
    NoSysfsEntry {
        major: u32,
        minor: u32,
        path: PathBuf,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("block devices nested more than {MAX_NESTING} deep under {major}:{minor}")]
    TooDeep { major: u32, minor: u32 },
}

/// The identity of block device `major:minor`, the most stable one the system knows.
pub fn block_device_identity(
    roots: &SysRoots,
    major: u32,
    minor: u32,
) -> Result<BlockIdentity, IdentityError> {
    Ok(match stable_identity(roots, major, minor, 0)? {
        Some(id) => id,
        None => device_number(major, minor),
    })
}

/// The identity of the block device whose `st_rdev` is `rdev`, from the real sysfs and udev.
pub fn identity_of_rdev(rdev: u64) -> Result<BlockIdentity, IdentityError> {
    block_device_identity(&SysRoots::default(), libc::major(rdev), libc::minor(rdev))
}

/// The stable identity of the block device `rdev` that backing image `path` is, if it has
/// one, logged either way. Failing to look it up is not fatal: the device number stands in,
/// and a cache that recorded a stable identity refuses the device rather than guess.
pub(crate) fn stable_identity_of_image(path: &Path, rdev: u64) -> Option<BlockIdentity> {
    match identity_of_rdev(rdev) {
        Ok(id) if id.kind.is_stable() => {
            log::info!("backing image {}: {id}", path.display());
            Some(id)
        }
        Ok(_) => {
            log::warn!(
                "backing image {}: the system knows no stable identity of this device (no \
                 device-mapper UUID, WWID, serial, loop backing file or partition UUID); a cache \
                 recognises it by its device number, which can change at reboot",
                path.display()
            );
            None
        }
        Err(e) => {
            log::warn!(
                "backing image {}: cannot read its stable identity ({e}); a cache recognises \
                 it by its device number",
                path.display()
            );
            None
        }
    }
}

/// The fallback identity: the device number.
pub fn device_number(major: u32, minor: u32) -> BlockIdentity {
    BlockIdentity {
        kind: IdentityKind::DeviceNumber,
        value: format!("{major}:{minor}"),
    }
}

fn stable_identity(
    roots: &SysRoots,
    major: u32,
    minor: u32,
    depth: u32,
) -> Result<Option<BlockIdentity>, IdentityError> {
    if depth > MAX_NESTING {
        return Err(IdentityError::TooDeep { major, minor });
    }
    let dir = roots.sysfs.join(format!("dev/block/{major}:{minor}"));
    if !dir.exists() {
        return Err(IdentityError::NoSysfsEntry {
            major,
            minor,
            path: dir,
        });
    }
    let found = |kind, value: String| Ok(Some(BlockIdentity { kind, value }).filter(fits));

    if let Some(uuid) = read_id(&dir.join("dm/uuid"))? {
        return found(IdentityKind::DmUuid, uuid);
    }
    for wwid in ["wwid", "device/wwid"] {
        if let Some(wwid) = read_id(&dir.join(wwid))? {
            return found(IdentityKind::Wwid, wwid);
        }
    }
    for serial in ["serial", "device/serial"] {
        if let Some(serial) = read_id(&dir.join(serial))? {
            let value = match read_number(&dir.join("nsid"))? {
                Some(nsid) => format!("{serial} namespace {nsid}"),
                None => serial,
            };
            return found(IdentityKind::Serial, value);
        }
    }
    if let Some(backing) = read_attr(&dir.join("loop/backing_file"))? {
        let offset = read_number(&dir.join("loop/offset"))?.unwrap_or(0);
        if let Some(id) = loop_identity(roots, &backing, offset, depth)? {
            return found(IdentityKind::LoopFile, id);
        }
    }
    if let Some(number) = read_number(&dir.join("partition"))? {
        if let Some(disk) = partition_disk(roots, &dir, depth)? {
            return found(
                IdentityKind::Partition,
                format!("{disk} partition {number}"),
            );
        }
        let udev = roots.udev_data.join(format!("b{major}:{minor}"));
        if let Some(uuid) = udev_property(&udev, "ID_PART_ENTRY_UUID")? {
            return found(IdentityKind::PartUuid, uuid);
        }
    }
    if let Some(name) = read_id(&dir.join("dm/name"))? {
        return found(IdentityKind::DmName, name);
    }
    Ok(None)
}

fn fits(id: &BlockIdentity) -> bool {
    id.value.len() <= MAX_IDENTITY_LEN
}

/// The identity of what a loop device reads from: a file (its file system device, inode and
/// offset), or a block device (its own identity and the offset). `None` when the file is gone
/// (deleted, or renamed since it was attached): then only the device number is left.
fn loop_identity(
    roots: &SysRoots,
    backing: &str,
    offset: u64,
    depth: u32,
) -> Result<Option<String>, IdentityError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if backing.ends_with("(deleted)") {
        return Ok(None);
    }
    let meta = match std::fs::metadata(backing) {
        Ok(meta) => meta,
        Err(e) if is_absent(&e) => return Ok(None),
        Err(source) => {
            return Err(IdentityError::Read {
                path: backing.into(),
                source,
            })
        }
    };
    if meta.file_type().is_block_device() {
        let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
        return Ok(stable_identity(roots, major, minor, depth + 1)?
            .map(|inner| format!("on {inner} offset {offset}")));
    }
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    Ok(Some(format!(
        "{major}:{minor} inode {} offset {offset}",
        meta.ino()
    )))
}

/// The stable identity of the disk partition `dir` belongs to, if the disk has one. The
/// partition's sysfs directory is a subdirectory of its disk's.
fn partition_disk(
    roots: &SysRoots,
    dir: &Path,
    depth: u32,
) -> Result<Option<BlockIdentity>, IdentityError> {
    let real = std::fs::canonicalize(dir).map_err(|source| IdentityError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let Some(disk_dir) = real.parent() else {
        return Ok(None);
    };
    let Some((major, minor)) = read_attr(&disk_dir.join("dev"))?.and_then(|d| parse_dev(&d)) else {
        return Ok(None);
    };
    stable_identity(roots, major, minor, depth + 1)
}

/// `MAJ:MIN` as sysfs `dev` files hold it.
pub fn parse_dev(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// A udev property (`E:NAME=value` line) of the device whose database file is `path`.
fn udev_property(path: &Path, name: &str) -> Result<Option<String>, IdentityError> {
    let Some(text) = read_attr(path)? else {
        return Ok(None);
    };
    let prefix = format!("E:{name}=");
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|v| usable_id(v.as_bytes())))
}

/// An identity attribute, `None` when absent or unusable as an identity.
fn read_id(path: &Path) -> Result<Option<String>, IdentityError> {
    Ok(read_bytes(path)?.and_then(|b| usable_id(&b)))
}

/// A plain attribute (path, number), trimmed; `None` when absent, empty or not text.
fn read_attr(path: &Path) -> Result<Option<String>, IdentityError> {
    Ok(read_bytes(path)?.and_then(|b| {
        let text = String::from_utf8(b).ok()?;
        let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
        (!text.is_empty()).then(|| text.to_owned())
    }))
}

fn read_number(path: &Path) -> Result<Option<u64>, IdentityError> {
    Ok(read_attr(path)?.and_then(|t| t.parse().ok()))
}

fn read_bytes(path: &Path) -> Result<Option<Vec<u8>>, IdentityError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if is_absent(&e) => Ok(None),
        Err(source) => Err(IdentityError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Errors that mean "this attribute has nothing to say" rather than "reading failed": the
/// file is not there, or the kernel has no data for it (a SCSI disk without a VPD page
/// answers its `wwid` with EINVAL or ENODATA).
fn is_absent(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
        || matches!(
            e.raw_os_error(),
            Some(libc::ENODATA | libc::EINVAL | libc::ENXIO | libc::EOPNOTSUPP | libc::ENOTDIR)
        )
}

/// `bytes` as an identity: trimmed of whitespace and NULs, printable ASCII only, not too long,
/// not a placeholder. Inner spaces are kept (SCSI T10 identifiers pad fields with them).
fn usable_id(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?;
    let text = text.trim_matches(|c: char| c.is_ascii_whitespace() || c == '\0');
    if text.is_empty()
        || text.len() > MAX_IDENTITY_LEN
        || !text.bytes().all(|b| (0x20..0x7f).contains(&b))
        || is_placeholder(text)
    {
        return None;
    }
    Some(text.to_owned())
}

/// True when every digit or letter after an optional `type.` prefix is `0`.
fn is_placeholder(text: &str) -> bool {
    let body = match text.split_once('.') {
        Some((prefix, rest))
            if prefix.len() <= 4 && prefix.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            rest
        }
        _ => text,
    };
    body.bytes()
        .filter(u8::is_ascii_alphanumeric)
        .all(|b| b == b'0')
}

#[cfg(test)]
mod tests;
