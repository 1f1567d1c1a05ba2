//! Parsing one descriptor chain into a [`Request`].
//!
//! The guest is untrusted: lengths, sectors, directions and the chain's
//! shape are all checked before any I/O, and every failure maps to a virtio
//! status. virtio-queue's descriptor iterator silently ends (no error) on
//! loops and over-long chains, once it has followed queue-size descriptors or
//! met a bad index, so a chain whose last descriptor still says NEXT is
//! rejected here.

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, Le32, Le64};

/// What the device allows, derived from the volume and the config space.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Payload bytes the guest can address.
    pub capacity: u64,
    /// The logical block size: lengths and offsets must be multiples.
    pub block_size: u32,
    /// Largest data transfer of one request, in bytes.
    pub max_data_bytes: u64,
    /// Most data descriptors in one request (config space `seg_max`).
    pub max_segments: usize,
    pub readonly: bool,
    pub discard: bool,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
}

/// A data descriptor that lies inside one guest memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// The segments covering bytes [start, start+len) of the concatenation of `segments`.
pub fn sub_segments(segments: &[Segment], start: u64, len: u64, out: &mut Vec<Segment>) {
    let (mut skip, mut want) = (start, len);
    for s in segments {
        if want == 0 {
            break;
        }
        let slen = u64::from(s.len);
        if skip >= slen {
            skip -= slen;
            continue;
        }
        let take = (slen - skip).min(want);
        out.push(Segment {
            addr: GuestAddress(s.addr.0 + skip),
            len: take as u32,
        });
        want -= take;
        skip = 0;
    }
}

/// A validated request. Positions and lengths are in bytes of payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Read { pos: u64, len: u64 },
    Write { pos: u64, len: u64 },
    Flush,
    GetId { len: u32 },
    Discard { pos: u64, len: u64 },
    WriteZeroes { pos: u64, len: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("malformed descriptor chain: {0}")]
    BadChain(&'static str),
    #[error("request header is missing, write-only or not exactly 16 bytes")]
    BadHeader,
    #[error("data descriptor has the wrong direction for this request type")]
    WrongDirection,
    #[error("descriptor {addr:#x}+{len} is not inside one guest memory region")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("more than {0} data descriptors")]
    TooManySegments(usize),
    #[error("{len} bytes at byte {pos} reach beyond the disk's end")]
    OutOfRange { pos: u64, len: u64 },
    #[error("offset {pos} or length {len} is not a multiple of the block size")]
    Unaligned { pos: u64, len: u64 },
    #[error("request of {0} bytes exceeds the device's limit")]
    TooLarge(u64),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("discard/write-zeroes payload is not exactly one 16-byte segment")]
    BadRangePayload,
    #[error("unsupported discard/write-zeroes flags {0:#x}")]
    UnsupportedFlags(u32),
}

impl RequestError {
    /// The virtio status byte the guest receives.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::UnsupportedFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// The outcome of parsing: the chain's head (to return it to the used ring),
/// where the status byte goes (None if the status descriptor itself is bad:
/// then no status can be reported), and the request or why it was refused.
#[derive(Debug)]
pub struct Parsed {
    pub head: u16,
    pub status: Option<GuestAddress>,
    pub request: Result<Request, RequestError>,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Header {
    kind: Le32,
    _ioprio: Le32,
    sector: Le64,
}
// SAFETY: plain old data, every bit pattern is valid.
unsafe impl ByteValued for Header {}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RangeSegment {
    sector: Le64,
    num_sectors: Le32,
    flags: Le32,
}
// SAFETY: plain old data, every bit pattern is valid.
unsafe impl ByteValued for RangeSegment {}

/// Parses the chain whose descriptors `descs` yields. Data descriptors are
/// left in `segments` (cleared first; its capacity is reused, so parsing
/// does not allocate once the vector has grown to the queue size).
pub fn parse<M: GuestMemoryBackend>(
    mem: &M,
    head: u16,
    descs: impl Iterator<Item = Descriptor>,
    limits: &Limits,
    segments: &mut Vec<Segment>,
) -> Parsed {
    segments.clear();
    let mut header = None;
    let mut last_has_next = false;
    let mut too_many = false;
    let mut data_dirs = (0usize, 0usize); // (device-readable, device-writable)
    let mut status_desc = None;
    for d in descs {
        last_has_next = d.has_next();
        if header.is_none() {
            header = Some(d);
            continue;
        }
        // The previous candidate for "status" turns out to be data.
        if let Some(prev) = status_desc.replace(d) {
            push_segment(prev, segments, &mut data_dirs, &mut too_many, limits);
        }
    }
    let status = status_desc.and_then(|d| status_address(mem, &d));
    let request = if last_has_next {
        Err(RequestError::BadChain(
            "it loops or is longer than the queue",
        ))
    } else if status.is_none() {
        Err(RequestError::BadChain("no usable status descriptor"))
    } else if too_many {
        Err(RequestError::TooManySegments(limits.max_segments))
    } else {
        header
            .ok_or(RequestError::BadHeader)
            .and_then(|h| read_header(mem, &h))
            .and_then(|h| classify(mem, h, segments, data_dirs, limits))
    };
    Parsed {
        head,
        status,
        request,
    }
}

fn push_segment(
    d: Descriptor,
    segments: &mut Vec<Segment>,
    dirs: &mut (usize, usize),
    too_many: &mut bool,
    limits: &Limits,
) {
    if d.is_write_only() {
        dirs.1 += 1;
    } else {
        dirs.0 += 1;
    }
    if segments.len() >= limits.max_segments {
        *too_many = true;
        return;
    }
    segments.push(Segment {
        addr: d.addr(),
        len: d.len(),
    });
}

/// The status byte is the last byte of a device-writable descriptor.
fn status_address<M: GuestMemoryBackend>(mem: &M, d: &Descriptor) -> Option<GuestAddress> {
    if !d.is_write_only() || d.len() == 0 {
        return None;
    }
    let addr = d.addr().checked_add(u64::from(d.len()) - 1)?;
    mem.get_slice(addr, 1).ok().map(|_| addr)
}

fn read_header<M: GuestMemoryBackend>(mem: &M, d: &Descriptor) -> Result<Header, RequestError> {
    if d.is_write_only() || d.len() as usize != std::mem::size_of::<Header>() {
        return Err(RequestError::BadHeader);
    }
    mem.read_obj(d.addr())
        .map_err(|_| RequestError::OutsideMemory {
            addr: d.addr().0,
            len: d.len(),
        })
}

fn classify<M: GuestMemoryBackend>(
    mem: &M,
    header: Header,
    segments: &[Segment],
    (readable, writable): (usize, usize),
    limits: &Limits,
) -> Result<Request, RequestError> {
    let kind = header.kind.to_native();
    let sector = header.sector.to_native();
    let want_writable = |ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(RequestError::WrongDirection)
        }
    };
    match kind {
        VIRTIO_BLK_T_IN => {
            want_writable(readable == 0)?;
            let (pos, len) = data_range(mem, sector, segments, limits)?;
            Ok(Request::Read { pos, len })
        }
        VIRTIO_BLK_T_OUT => {
            want_writable(writable == 0)?;
            let (pos, len) = data_range(mem, sector, segments, limits)?;
            if limits.readonly {
                return Err(RequestError::ReadOnly);
            }
            Ok(Request::Write { pos, len })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Request::Flush),
        VIRTIO_BLK_T_GET_ID => {
            want_writable(readable == 0)?;
            let len = checked_total(mem, segments)?;
            Ok(Request::GetId {
                len: len.min(u64::from(VIRTIO_BLK_ID_BYTES)) as u32,
            })
        }
        VIRTIO_BLK_T_DISCARD if limits.discard => {
            let (pos, len) = range_payload(
                mem,
                segments,
                writable,
                limits.max_discard_sectors,
                0,
                limits,
            )?;
            Ok(Request::Discard { pos, len })
        }
        VIRTIO_BLK_T_WRITE_ZEROES => {
            let (pos, len) = range_payload(
                mem,
                segments,
                writable,
                limits.max_write_zeroes_sectors,
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
                limits,
            )?;
            Ok(Request::WriteZeroes { pos, len })
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

/// Sum of the data descriptors' lengths, each checked to lie in one region.
fn checked_total<M: GuestMemoryBackend>(
    mem: &M,
    segments: &[Segment],
) -> Result<u64, RequestError> {
    let mut total = 0u64;
    for s in segments {
        if mem.get_slice(s.addr, s.len as usize).is_err() {
            return Err(RequestError::OutsideMemory {
                addr: s.addr.0,
                len: s.len,
            });
        }
        total += u64::from(s.len);
    }
    Ok(total)
}

/// Checks a read/write's sector and length against the disk.
fn data_range<M: GuestMemoryBackend>(
    mem: &M,
    sector: u64,
    segments: &[Segment],
    limits: &Limits,
) -> Result<(u64, u64), RequestError> {
    let len = checked_total(mem, segments)?;
    if len > limits.max_data_bytes {
        return Err(RequestError::TooLarge(len));
    }
    let pos = sector
        .checked_mul(512)
        .ok_or(RequestError::OutOfRange { pos: u64::MAX, len })?;
    check_extent(pos, len, limits)?;
    Ok((pos, len))
}

fn check_extent(pos: u64, len: u64, limits: &Limits) -> Result<(), RequestError> {
    let block = u64::from(limits.block_size);
    if !pos.is_multiple_of(block) || !len.is_multiple_of(block) {
        return Err(RequestError::Unaligned { pos, len });
    }
    match pos.checked_add(len) {
        Some(end) if end <= limits.capacity => Ok(()),
        _ => Err(RequestError::OutOfRange { pos, len }),
    }
}

/// DISCARD / WRITE_ZEROES carry one 16-byte range (max_*_seg is 1).
fn range_payload<M: GuestMemoryBackend>(
    mem: &M,
    segments: &[Segment],
    writable: usize,
    max_sectors: u32,
    allowed_flags: u32,
    limits: &Limits,
) -> Result<(u64, u64), RequestError> {
    if writable != 0 {
        return Err(RequestError::WrongDirection);
    }
    let [seg] = segments else {
        return Err(RequestError::BadRangePayload);
    };
    if seg.len as usize != std::mem::size_of::<RangeSegment>() {
        return Err(RequestError::BadRangePayload);
    }
    let range: RangeSegment = mem
        .read_obj(seg.addr)
        .map_err(|_| RequestError::OutsideMemory {
            addr: seg.addr.0,
            len: seg.len,
        })?;
    let flags = range.flags.to_native();
    if flags & !allowed_flags != 0 {
        return Err(RequestError::UnsupportedFlags(flags));
    }
    let sectors = range.num_sectors.to_native();
    if sectors > max_sectors {
        return Err(RequestError::TooLarge(u64::from(sectors) * 512));
    }
    let pos = range
        .sector
        .to_native()
        .checked_mul(512)
        .ok_or(RequestError::OutOfRange {
            pos: u64::MAX,
            len: 0,
        })?;
    let len = u64::from(sectors) * 512;
    check_extent(pos, len, limits)?;
    if limits.readonly {
        return Err(RequestError::ReadOnly);
    }
    Ok((pos, len))
}

#[cfg(test)]
mod tests;
