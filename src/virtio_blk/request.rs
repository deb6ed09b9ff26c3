// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The request codec: turns one descriptor chain into an engine request, or into an immediate
//! answer for requests that need no engine (GET_ID, errors, unsupported types).
//!
//! Descriptor boundaries are arbitrary, so the chain is handled as two byte streams: the
//! readable part (header, then OUT data or discard segments) and the writable part (IN data,
//! then the status byte last). Nothing the guest puts in a chain makes this code panic or touch
//! the image: bad requests get IOERR or UNSUPP, and a chain without a usable status byte is
//! completed with used length 0.

use std::ops::Deref;

use log::{debug, warn};
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::config::DeviceInfo;
use super::features::*;
use super::split_ring::Desc;
use crate::engine::{DataSeg, DataSegs, RequestKind, SECTOR_SIZE};

/// What to do with one descriptor chain.
#[derive(Debug)]
pub struct Decoded {
    pub head: u16,
    /// Guest address of the status byte; `None` when the chain has none the device may write.
    pub status_addr: Option<GuestAddress>,
    pub action: Action,
    /// The guest ranges an engine request writes through raw pointers (IN data), which the
    /// guest memory's dirty bitmap cannot see: they are marked when the request completes.
    /// Empty unless `action` is `Submit`.
    pub data_in: Vec<(GuestAddress, u64)>,
}

#[derive(Debug)]
pub enum Action {
    /// Hand to the engine; on success the used length is `used_len`, on failure 1.
    Submit { kind: RequestKind, used_len: u32 },
    /// Already answered: write `status`, report `used_len`.
    Answer { status: u8, used_len: u32 },
    /// No usable status byte: return the chain with used length 0.
    Discard,
}

/// Why a chain is refused. Logged at debug level: a guest can produce these at will.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("descriptor at {addr:#x} length {len} is outside guest memory")]
    BadDescriptor { addr: u64, len: u32 },
    #[error("a readable descriptor follows a writable one")]
    ReadableAfterWritable,
    #[error("chain has {0} readable bytes, less than a request header")]
    ShortHeader(u64),
    #[error("chain has no writable status byte")]
    NoStatus,
    #[error("data goes the wrong direction for request type {0}")]
    WrongDirection(u32),
    #[error("data length {0} is not a multiple of the sector size")]
    Misaligned(u64),
    #[error("sector {sector} plus {len} bytes is outside the device")]
    OutOfRange { sector: u64, len: u64 },
    #[error("the device is read-only")]
    ReadOnly,
    #[error("{count} discard/write-zeroes segments ({bytes} bytes) where 1..={max} are allowed")]
    BadSegmentCount { count: u64, bytes: u64, max: u32 },
    #[error("segment of {0} sectors exceeds the advertised maximum")]
    SegmentTooLong(u32),
    #[error("unsupported flags {0:#x}")]
    UnsupportedFlags(u32),
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
}

impl DecodeError {
    fn status(&self) -> u8 {
        match self {
            DecodeError::UnsupportedFlags(_) | DecodeError::UnsupportedType(_) => STATUS_UNSUPP,
            _ => STATUS_IOERR,
        }
    }
}

/// A window of `len` bytes, starting `skip` bytes in, over an ordered list of guest byte
/// ranges: part of one chain. Splitting a window makes two windows over the same list, so
/// decoding a request allocates nothing.
#[derive(Clone, Copy, Debug)]
struct Ranges<'a> {
    list: &'a [(GuestAddress, u64)],
    skip: u64,
    len: u64,
}

impl<'a> Ranges<'a> {
    /// The whole of `list`.
    fn new(list: &'a [(GuestAddress, u64)]) -> Ranges<'a> {
        Ranges {
            list,
            skip: 0,
            len: list.iter().map(|r| r.1).sum(),
        }
    }

    fn total(&self) -> u64 {
        self.len
    }

    /// The first `n` bytes and the rest.
    fn split_at(&self, n: u64) -> (Ranges<'a>, Ranges<'a>) {
        let n = n.min(self.len);
        (
            Ranges { len: n, ..*self },
            Ranges {
                skip: self.skip + n,
                len: self.len - n,
                ..*self
            },
        )
    }

    /// The window's ranges, in order, without empty ones.
    fn iter(&self) -> impl Iterator<Item = (GuestAddress, u64)> + 'a {
        let (mut skip, mut left) = (self.skip, self.len);
        self.list.iter().filter_map(move |&(addr, len)| {
            if skip >= len {
                skip -= len;
                return None;
            }
            let take = (len - skip).min(left);
            if take == 0 {
                return None;
            }
            let piece = (addr.unchecked_add(skip), take);
            skip = 0;
            left -= take;
            Some(piece)
        })
    }

    /// Copies the first `buf.len()` bytes out of guest memory; false when the ranges are
    /// shorter or not all readable. For the few bytes of a header or a segment: each is read
    /// through the mapping's host address, not vm-memory's generic (and far longer) path.
    fn read<M: GuestMemoryBackend>(&self, mem: &M, buf: &mut [u8]) -> bool {
        let mut done = 0;
        for (addr, len) in self.iter() {
            if done == buf.len() {
                break;
            }
            let n = (len as usize).min(buf.len() - done);
            let whole = host_pieces(mem, addr, n as u64, |ptr, len| {
                for (i, byte) in buf[done..done + len as usize].iter_mut().enumerate() {
                    // SAFETY: `host_pieces` hands out host addresses of `len` bytes inside
                    // one region of `mem`, whose mapping outlives this call. Volatile: the
                    // guest may change the bytes meanwhile.
                    *byte = unsafe { ptr.add(i).read_volatile() };
                }
                done += len as usize;
            });
            if !whole {
                return false;
            }
        }
        done == buf.len()
    }

    /// Copies `buf` into the start of the ranges (which must be at least as long); false when
    /// guest memory refused a part.
    fn write<M: GuestMemoryBackend>(&self, mem: &M, buf: &[u8]) -> bool {
        let mut done = 0;
        for (addr, len) in self.iter() {
            if done == buf.len() {
                break;
            }
            let n = (len as usize).min(buf.len() - done);
            if mem.write_slice(&buf[done..done + n], addr).is_err() {
                return false;
            }
            done += n;
        }
        true
    }

    /// Host addresses of the ranges, split where guest memory regions end: the zero-copy
    /// buffers handed to the engine (inline up to [`crate::engine::INLINE_DATA_SEGS`], so a
    /// typical request allocates nothing here).
    fn data_segs<M: GuestMemoryBackend>(&self, mem: &M) -> Result<DataSegs, DecodeError> {
        // Sized by the window's ranges, not the whole list (which holds the header or the
        // status byte too): a list that fits inline must not go to the heap.
        let mut segs = DataSegs::with_capacity(self.iter().count());
        for (addr, len) in self.iter() {
            let whole = host_pieces(mem, addr, len, |ptr, len| {
                segs.push(DataSeg {
                    ptr,
                    len: len as usize,
                })
            });
            if !whole {
                return Err(DecodeError::BadDescriptor {
                    addr: addr.raw_value(),
                    len: len as u32,
                });
            }
        }
        Ok(segs)
    }
}

/// Calls `piece` with the host address and length of each part of guest range `addr..addr +
/// len` that one memory region holds, in order; false when part of the range is not guest
/// memory. vm-memory's `check_range` and `get_slices` would build a slice per part, each
/// holding a reference to the region's dirty bitmap, where only addresses are wanted.
fn host_pieces<M: GuestMemoryBackend>(
    mem: &M,
    addr: GuestAddress,
    len: u64,
    mut piece: impl FnMut(*mut u8, u64),
) -> bool {
    let (mut at, mut left) = (addr, len);
    while left > 0 {
        let Some((region, start)) = mem.to_region_addr(at) else {
            return false;
        };
        let Ok(ptr) = region.get_host_address(start) else {
            return false;
        };
        let take = (region.len() - start.raw_value()).min(left);
        piece(ptr, take);
        left -= take;
        if left > 0 {
            match at.checked_add(take) {
                Some(next) => at = next,
                None => return false,
            }
        }
    }
    true
}

/// Buffers a queue worker keeps from one chain to the next, so that decoding allocates nothing
/// once they have grown to the chains the guest sends (the engine's scatter-gather list is
/// inline unless the chain is long).
#[derive(Default)]
pub struct Decoder {
    readable: Vec<(GuestAddress, u64)>,
    writable: Vec<(GuestAddress, u64)>,
    /// Emptied `Decoded::data_in` lists given back by `recycle`.
    spare_data_in: Vec<Vec<(GuestAddress, u64)>>,
    /// A virtio-queue chain's descriptors, for `decode`.
    descs: Vec<Desc>,
}

/// The readable and writable halves of a chain, checked against guest memory.
struct SplitChain<'a> {
    readable: Ranges<'a>,
    writable: Ranges<'a>,
}

/// The last non-empty descriptor of a chain: where its status byte must be.
#[derive(Clone, Copy)]
struct LastDescriptor {
    addr: GuestAddress,
    len: u32,
    write_only: bool,
    /// Every byte of it is guest memory (checked by the walk).
    in_memory: bool,
}

/// Fills `readable` and `writable` with the chain's descriptors, and notes the last one.
fn split_chain<G: GuestMemoryBackend>(
    descs: &[Desc],
    mem: &G,
    readable: &mut Vec<(GuestAddress, u64)>,
    writable: &mut Vec<(GuestAddress, u64)>,
    last: &mut Option<LastDescriptor>,
) -> Result<(), DecodeError> {
    readable.clear();
    writable.clear();
    let mut error = None;
    for desc in descs {
        if desc.len == 0 {
            continue;
        }
        let in_memory = host_pieces(mem, desc.addr, u64::from(desc.len), |_, _| {});
        *last = Some(LastDescriptor {
            addr: desc.addr,
            len: desc.len,
            write_only: desc.write_only,
            in_memory,
        });
        if !in_memory {
            error.get_or_insert(DecodeError::BadDescriptor {
                addr: desc.addr.raw_value(),
                len: desc.len,
            });
            continue;
        }
        if desc.write_only {
            writable.push((desc.addr, u64::from(desc.len)));
        } else {
            if !writable.is_empty() {
                error.get_or_insert(DecodeError::ReadableAfterWritable);
            }
            readable.push((desc.addr, u64::from(desc.len)));
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Decodes one chain with buffers of its own (the queue worker keeps a [`Decoder`]).
pub fn decode<M, G>(chain: DescriptorChain<M>, info: &DeviceInfo) -> Decoded
where
    M: Deref<Target = G> + Clone,
    G: GuestMemoryBackend,
{
    Decoder::default().decode(chain, info)
}

impl Decoder {
    /// Takes back the `data_in` list of a completed request, to be filled again.
    pub fn recycle(&mut self, mut data_in: Vec<(GuestAddress, u64)>) {
        if data_in.capacity() > 0 {
            data_in.clear();
            self.spare_data_in.push(data_in);
        }
    }

    /// Decodes one chain. GET_ID is answered here (it only writes the serial into the chain).
    pub fn decode<M, G>(&mut self, chain: DescriptorChain<M>, info: &DeviceInfo) -> Decoded
    where
        M: Deref<Target = G> + Clone,
        G: GuestMemoryBackend,
    {
        let head = chain.head_index();
        let mem_owner = chain.clone();
        let mut descs = std::mem::take(&mut self.descs);
        descs.clear();
        descs.extend(chain.map(|d| Desc {
            addr: d.addr(),
            len: d.len(),
            write_only: d.is_write_only(),
        }));
        let decoded = self.decode_descs(head, &descs, mem_owner.memory(), info);
        self.descs = descs;
        decoded
    }

    /// Decodes the chain at `head` whose descriptors are `descs` (in chain order).
    pub fn decode_descs<G: GuestMemoryBackend>(
        &mut self,
        head: u16,
        descs: &[Desc],
        mem: &G,
        info: &DeviceInfo,
    ) -> Decoded {
        // Find the status byte first: without it nothing can be answered.
        let mut last = None;
        let early_error = split_chain(
            descs,
            mem,
            &mut self.readable,
            &mut self.writable,
            &mut last,
        )
        .err();
        let status_addr = last.and_then(|last| status_address(last, mem));
        let Some(status_addr) = status_addr else {
            warn!("descriptor chain {head} has no writable status byte; returning it unanswered");
            return Decoded {
                head,
                status_addr: None,
                action: Action::Discard,
                data_in: Vec::new(),
            };
        };
        let answer = |e: DecodeError| {
            debug!("refusing descriptor chain {head}: {e}");
            Decoded {
                head,
                status_addr: Some(status_addr),
                action: Action::Answer {
                    status: e.status(),
                    used_len: 1,
                },
                data_in: Vec::new(),
            }
        };
        if let Some(e) = early_error {
            return answer(e);
        }
        let split = SplitChain {
            readable: Ranges::new(&self.readable),
            writable: Ranges::new(&self.writable),
        };
        match decode_request(&split, mem, info) {
            Ok(action) => {
                // Everything writable before the status byte; empty for any type but IN (the
                // decoder refuses other types with writable data).
                let mut data_in = Vec::new();
                if let Action::Submit { .. } = action {
                    let (ranges, _status) = split.writable.split_at(split.writable.total() - 1);
                    if ranges.total() > 0 {
                        data_in = self.spare_data_in.pop().unwrap_or_default();
                        data_in.extend(ranges.iter());
                    }
                }
                Decoded {
                    head,
                    status_addr: Some(status_addr),
                    action,
                    data_in,
                }
            }
            Err(e) => answer(e),
        }
    }
}

/// The last writable byte of the chain, if the chain's last descriptor is writable and inside
/// guest memory.
fn status_address<G: GuestMemoryBackend>(last: LastDescriptor, mem: &G) -> Option<GuestAddress> {
    if !last.write_only {
        return None;
    }
    let addr = last.addr.checked_add(u64::from(last.len) - 1)?;
    (last.in_memory || mem.check_range(addr, 1)).then_some(addr)
}

/// Writes a request's status byte through the mapping's host address and marks it in the
/// dirty log (after the write, as vm-memory's own writes do); false when `addr` is not guest
/// memory. vm-memory's `write_obj` takes a generic path (a slice and a bitmap handle built
/// for one byte) that costs more than the rest of a completion.
pub fn write_status<M: GuestMemoryBackend>(mem: &M, addr: GuestAddress, status: u8) -> bool {
    let Some((region, offset)) = mem.to_region_addr(addr) else {
        return false;
    };
    let Ok(ptr) = region.get_host_address(offset) else {
        return false;
    };
    // SAFETY: `get_host_address` checked that `offset` is inside `region`, whose mapping `mem`
    // keeps alive; a one-byte volatile store cannot tear and is how the guest expects it.
    unsafe { ptr.write_volatile(status) };
    region.bitmap().mark_dirty(offset.raw_value() as usize, 1);
    true
}

/// A request's parts once its header is read: the header fields, the readable bytes after the
/// header (OUT data or discard segments) and the writable bytes before the status byte (IN
/// data or the GET_ID answer).
struct Parts<'a> {
    request_type: u32,
    sector: u64,
    payload: Ranges<'a>,
    data_in: Ranges<'a>,
}

impl Parts<'_> {
    /// Refuses a request type that must have no device-writable data.
    fn only_status_writable(&self) -> Result<(), DecodeError> {
        if self.data_in.total() == 0 {
            Ok(())
        } else {
            Err(DecodeError::WrongDirection(self.request_type))
        }
    }

    /// Refuses a request type that must have no driver-readable data after the header.
    fn only_header_readable(&self) -> Result<(), DecodeError> {
        if self.payload.total() == 0 {
            Ok(())
        } else {
            Err(DecodeError::WrongDirection(self.request_type))
        }
    }
}

fn writable_device(info: &DeviceInfo) -> Result<(), DecodeError> {
    if info.read_only {
        Err(DecodeError::ReadOnly)
    } else {
        Ok(())
    }
}

fn decode_request<G: GuestMemoryBackend>(
    split: &SplitChain<'_>,
    mem: &G,
    info: &DeviceInfo,
) -> Result<Action, DecodeError> {
    let parts = read_header(split, mem)?;
    match parts.request_type {
        VIRTIO_BLK_T_IN => decode_read(&parts, mem, info),
        VIRTIO_BLK_T_OUT => decode_write(&parts, mem, info),
        VIRTIO_BLK_T_FLUSH => decode_flush(&parts),
        VIRTIO_BLK_T_GET_ID => answer_get_id(&parts, mem, info),
        VIRTIO_BLK_T_DISCARD => decode_discard_or_write_zeroes(&parts, mem, info, true),
        VIRTIO_BLK_T_WRITE_ZEROES => decode_discard_or_write_zeroes(&parts, mem, info, false),
        other => Err(DecodeError::UnsupportedType(other)),
    }
}

/// Reads the 16-byte header and splits the chain around it and around the status byte.
fn read_header<'a, G: GuestMemoryBackend>(
    split: &SplitChain<'a>,
    mem: &G,
) -> Result<Parts<'a>, DecodeError> {
    let readable_len = split.readable.total();
    if readable_len < REQUEST_HEADER_LEN as u64 {
        return Err(DecodeError::ShortHeader(readable_len));
    }
    let (header_ranges, payload) = split.readable.split_at(REQUEST_HEADER_LEN as u64);
    let mut header = [0u8; REQUEST_HEADER_LEN];
    if !header_ranges.read(mem, &mut header) {
        return Err(DecodeError::ShortHeader(readable_len));
    }
    let (data_in, _status) = split.writable.split_at(split.writable.total() - 1);
    Ok(Parts {
        request_type: u32::from_le_bytes(header[0..4].try_into().unwrap()),
        sector: u64::from_le_bytes(header[8..16].try_into().unwrap()),
        payload,
        data_in,
    })
}

/// IN: the engine reads straight into the chain's writable buffers.
fn decode_read<G: GuestMemoryBackend>(
    parts: &Parts,
    mem: &G,
    info: &DeviceInfo,
) -> Result<Action, DecodeError> {
    parts.only_header_readable()?;
    let len = parts.data_in.total();
    let offset = byte_range(parts.sector, len, info)?;
    let used_len = u32::try_from(len + 1).map_err(|_| DecodeError::Misaligned(len))?;
    let bufs = parts.data_in.data_segs(mem)?;
    Ok(Action::Submit {
        kind: RequestKind::Read { offset, bufs },
        used_len,
    })
}

/// OUT: the engine writes straight from the chain's readable buffers.
fn decode_write<G: GuestMemoryBackend>(
    parts: &Parts,
    mem: &G,
    info: &DeviceInfo,
) -> Result<Action, DecodeError> {
    parts.only_status_writable()?;
    writable_device(info)?;
    let len = parts.payload.total();
    let offset = byte_range(parts.sector, len, info)?;
    let bufs = parts.payload.data_segs(mem)?;
    Ok(Action::Submit {
        kind: RequestKind::Write { offset, bufs },
        used_len: 1,
    })
}

fn decode_flush(parts: &Parts) -> Result<Action, DecodeError> {
    parts.only_status_writable()?;
    parts.only_header_readable()?;
    Ok(Action::Submit {
        kind: RequestKind::Flush,
        used_len: 1,
    })
}

/// GET_ID needs no engine: the serial is written into the chain here.
fn answer_get_id<G: GuestMemoryBackend>(
    parts: &Parts,
    mem: &G,
    info: &DeviceInfo,
) -> Result<Action, DecodeError> {
    parts.only_header_readable()?;
    let n = (parts.data_in.total() as usize).min(info.serial.len());
    if !parts.data_in.write(mem, &info.serial[..n]) {
        return Err(DecodeError::NoStatus);
    }
    Ok(Action::Answer {
        status: STATUS_OK,
        used_len: n as u32 + 1,
    })
}

/// DISCARD and WRITE_ZEROES: one 16-byte segment (the advertised maximum) with its flags.
fn decode_discard_or_write_zeroes<G: GuestMemoryBackend>(
    parts: &Parts,
    mem: &G,
    info: &DeviceInfo,
    discard: bool,
) -> Result<Action, DecodeError> {
    parts.only_status_writable()?;
    writable_device(info)?;
    let (max_seg, max_sectors) = if discard {
        (info.max_discard_seg, info.max_discard_sectors)
    } else {
        (info.max_write_zeroes_seg, info.max_write_zeroes_sectors)
    };
    let bytes = parts.payload.total();
    let count = bytes / DISCARD_SEGMENT_LEN as u64;
    if bytes % DISCARD_SEGMENT_LEN as u64 != 0 || count == 0 || count > u64::from(max_seg) {
        return Err(DecodeError::BadSegmentCount {
            count,
            bytes,
            max: max_seg,
        });
    }
    // One segment per request is advertised, so `count` is 1 here.
    let mut seg = [0u8; DISCARD_SEGMENT_LEN];
    if !parts.payload.read(mem, &mut seg) {
        return Err(DecodeError::ShortHeader(bytes));
    }
    let seg_sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
    let num_sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap());
    let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
    let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
    if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && unmap) {
        return Err(DecodeError::UnsupportedFlags(flags));
    }
    if num_sectors > max_sectors {
        return Err(DecodeError::SegmentTooLong(num_sectors));
    }
    let len = u64::from(num_sectors) * SECTOR_SIZE;
    let offset = byte_range(seg_sector, len, info)?;
    let kind = if discard {
        RequestKind::Discard { offset, len }
    } else {
        RequestKind::WriteZeroes {
            offset,
            len,
            may_unmap: unmap,
        }
    };
    Ok(Action::Submit { kind, used_len: 1 })
}

/// Byte offset of `sector`, after checking that `len` bytes from it are sector-aligned and
/// inside the device.
fn byte_range(sector: u64, len: u64, info: &DeviceInfo) -> Result<u64, DecodeError> {
    if len % SECTOR_SIZE != 0 {
        return Err(DecodeError::Misaligned(len));
    }
    let out_of_range = DecodeError::OutOfRange { sector, len };
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(out_of_range.clone())?;
    let end = offset.checked_add(len).ok_or(out_of_range.clone())?;
    if end > info.capacity {
        return Err(out_of_range);
    }
    Ok(offset)
}
