//! Request parsing against virtio-queue's mock split queue: good chains, and
//! every malformed shape gets the right status before any I/O happens.

use super::*;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const MEM_END: u64 = 0x100_0000;

fn limits() -> Limits {
    Limits {
        capacity: 1 << 20,
        block_size: 512,
        max_data_bytes: 1 << 20,
        max_segments: 8,
        readonly: false,
        discard: false,
        max_discard_sectors: 1 << 16,
        max_write_zeroes_sectors: 1 << 16,
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_END as usize)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
    mem.write_obj(kind.to_le(), GuestAddress(HDR)).unwrap();
    mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    mem.write_obj(sector.to_le(), GuestAddress(HDR + 8))
        .unwrap();
}

fn parse_chain(
    mem: &GuestMemoryMmap,
    descs: &[RawDescriptor],
    limits: &Limits,
) -> (Parsed, Vec<Segment>) {
    let q = MockSplitQueue::new(mem, 16);
    let chain = q.build_desc_chain(descs).unwrap();
    let mut segs = Vec::new();
    let head = chain.head_index();
    let p = parse(mem, head, chain, limits, &mut segs);
    (p, segs)
}

fn status_of(p: &Parsed) -> Option<u8> {
    match &p.request {
        Ok(_) => Some(0),
        Err(e) => Some(e.status()),
    }
}

fn rw(kind: u32, sector: u64, data: &[(u64, u32, u16)]) -> (Parsed, Vec<Segment>) {
    rw_with(kind, sector, data, &limits())
}

fn rw_with(kind: u32, sector: u64, data: &[(u64, u32, u16)], l: &Limits) -> (Parsed, Vec<Segment>) {
    let m = mem();
    header(&m, kind, sector);
    let mut d = vec![desc(HDR, 16, 0)];
    d.extend(data.iter().map(|&(a, l, f)| desc(a, l, f)));
    d.push(desc(STATUS, 1, F_WRITE));
    parse_chain(&m, &d, l)
}

#[test]
fn good_read_and_write_chains() {
    let (p, segs) = rw(
        VIRTIO_BLK_T_IN,
        8,
        &[(DATA, 4096, F_WRITE), (DATA + 8192, 512, F_WRITE)],
    );
    assert_eq!(
        p.request,
        Ok(Request::Read {
            pos: 4096,
            len: 4608
        })
    );
    assert_eq!(p.status, Some(GuestAddress(STATUS)));
    assert_eq!(segs.len(), 2);
    let (p, _) = rw(VIRTIO_BLK_T_OUT, 0, &[(DATA, 1024, 0)]);
    assert_eq!(p.request, Ok(Request::Write { pos: 0, len: 1024 }));
    let (p, segs) = rw(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(p.request, Ok(Request::Flush));
    assert!(segs.is_empty());
    let (p, _) = rw(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 64, F_WRITE)]);
    assert_eq!(p.request, Ok(Request::GetId { len: 20 }));
    let (p, _) = rw(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 1, F_WRITE)]);
    assert_eq!(p.request, Ok(Request::GetId { len: 1 }));
}

#[test]
fn last_sector_is_in_range_but_crossing_the_end_is_not() {
    let (p, _) = rw(VIRTIO_BLK_T_IN, 2047, &[(DATA, 512, F_WRITE)]);
    assert_eq!(
        p.request,
        Ok(Request::Read {
            pos: (1 << 20) - 512,
            len: 512
        })
    );
    let (p, _) = rw(VIRTIO_BLK_T_IN, 2047, &[(DATA, 1024, F_WRITE)]);
    assert!(matches!(p.request, Err(RequestError::OutOfRange { .. })));
    assert_eq!(status_of(&p), Some(VIRTIO_BLK_S_IOERR as u8));
    let (p, _) = rw(VIRTIO_BLK_T_OUT, 4096, &[(DATA, 512, 0)]);
    assert!(matches!(p.request, Err(RequestError::OutOfRange { .. })));
    // sector * 512 overflows u64
    let (p, _) = rw(VIRTIO_BLK_T_IN, u64::MAX / 256, &[(DATA, 512, F_WRITE)]);
    assert!(matches!(p.request, Err(RequestError::OutOfRange { .. })));
}

#[test]
fn short_or_writable_header_is_refused() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    for hdr in [desc(HDR, 8, 0), desc(HDR, 16, F_WRITE), desc(HDR, 17, 0)] {
        let (p, _) = parse_chain(
            &m,
            &[hdr, desc(DATA, 512, F_WRITE), desc(STATUS, 1, F_WRITE)],
            &limits(),
        );
        assert_eq!(p.request, Err(RequestError::BadHeader));
        assert_eq!(p.status, Some(GuestAddress(STATUS)));
    }
    // header outside guest memory
    let (p, _) = parse_chain(
        &m,
        &[desc(MEM_END - 8, 16, 0), desc(STATUS, 1, F_WRITE)],
        &limits(),
    );
    assert!(matches!(p.request, Err(RequestError::OutsideMemory { .. })));
}

#[test]
fn read_only_or_empty_status_descriptor_gets_no_status() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    for status in [
        desc(STATUS, 1, 0),
        desc(STATUS, 0, F_WRITE),
        desc(MEM_END, 1, F_WRITE),
    ] {
        let (p, _) = parse_chain(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 512, F_WRITE), status],
            &limits(),
        );
        assert_eq!(p.status, None);
        assert!(p.request.is_err());
    }
    let (p, _) = parse_chain(&m, &[desc(HDR, 16, 0)], &limits());
    assert_eq!(p.status, None);
}

#[test]
fn status_byte_is_the_last_byte_of_the_status_descriptor() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    let (p, _) = parse_chain(&m, &[desc(HDR, 16, 0), desc(STATUS, 4, F_WRITE)], &limits());
    assert_eq!(p.status, Some(GuestAddress(STATUS + 3)));
}

#[test]
fn wrong_data_direction_is_refused() {
    let (p, _) = rw(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, 0)]);
    assert_eq!(p.request, Err(RequestError::WrongDirection));
    let (p, _) = rw(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, F_WRITE)]);
    assert_eq!(p.request, Err(RequestError::WrongDirection));
    let (p, _) = rw(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, F_WRITE), (DATA, 512, 0)]);
    assert_eq!(p.request, Err(RequestError::WrongDirection));
}

#[test]
fn unaligned_lengths_and_sectors_are_refused() {
    let (p, _) = rw(VIRTIO_BLK_T_IN, 0, &[(DATA, 511, F_WRITE)]);
    assert!(matches!(p.request, Err(RequestError::Unaligned { .. })));
    let mut l = limits();
    l.block_size = 4096;
    let (p, _) = rw_with(VIRTIO_BLK_T_OUT, 1, &[(DATA, 4096, 0)], &l);
    assert!(matches!(p.request, Err(RequestError::Unaligned { .. })));
    let (p, _) = rw_with(VIRTIO_BLK_T_OUT, 8, &[(DATA, 2048, 0), (DATA, 2048, 0)], &l);
    assert_eq!(
        p.request,
        Ok(Request::Write {
            pos: 4096,
            len: 4096
        })
    );
}

#[test]
fn oversized_and_out_of_memory_data_is_refused() {
    let (p, _) = rw(VIRTIO_BLK_T_IN, 0, &[(DATA, 0x1000_0000, F_WRITE)]);
    assert!(matches!(p.request, Err(RequestError::OutsideMemory { .. })));
    // A chain longer than 2^32 bytes stops the iterator early: refused too.
    let (p, _) = rw(VIRTIO_BLK_T_IN, 0, &[(DATA, u32::MAX, F_WRITE)]);
    assert!(matches!(p.request, Err(RequestError::BadChain(_))));
    let (p, _) = rw(VIRTIO_BLK_T_IN, 0, &[(MEM_END - 512, 1024, F_WRITE)]);
    assert!(matches!(p.request, Err(RequestError::OutsideMemory { .. })));
    let mut l = limits();
    l.max_data_bytes = 4096;
    let (p, _) = rw_with(VIRTIO_BLK_T_IN, 0, &[(DATA, 8192, F_WRITE)], &l);
    assert_eq!(p.request, Err(RequestError::TooLarge(8192)));
    l.max_segments = 2;
    let three = [(DATA, 512, F_WRITE); 3];
    let (p, segs) = rw_with(VIRTIO_BLK_T_IN, 0, &three, &l);
    assert_eq!(p.request, Err(RequestError::TooManySegments(2)));
    assert!(segs.len() <= 2);
}

#[test]
fn unknown_types_get_unsupp_and_discard_needs_allow_discards() {
    let (p, _) = rw(99, 0, &[]);
    assert_eq!(p.request, Err(RequestError::Unsupported(99)));
    assert_eq!(status_of(&p), Some(VIRTIO_BLK_S_UNSUPP as u8));
    let (p, _) = rw(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, 0)]);
    assert_eq!(status_of(&p), Some(VIRTIO_BLK_S_UNSUPP as u8));
}

fn range(mem: &GuestMemoryMmap, sector: u64, n: u32, flags: u32) {
    mem.write_obj(sector.to_le(), GuestAddress(DATA)).unwrap();
    mem.write_obj(n.to_le(), GuestAddress(DATA + 8)).unwrap();
    mem.write_obj(flags.to_le(), GuestAddress(DATA + 12))
        .unwrap();
}

fn range_request(kind: u32, sector: u64, n: u32, flags: u32, l: &Limits) -> Parsed {
    let m = mem();
    header(&m, kind, 0);
    range(&m, sector, n, flags);
    parse_chain(
        &m,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 16, 0),
            desc(STATUS, 1, F_WRITE),
        ],
        l,
    )
    .0
}

#[test]
fn write_zeroes_and_discard_ranges_are_checked() {
    let mut l = limits();
    let p = range_request(VIRTIO_BLK_T_WRITE_ZEROES, 4, 8, 1, &l);
    assert_eq!(
        p.request,
        Ok(Request::WriteZeroes {
            pos: 2048,
            len: 4096
        })
    );
    let p = range_request(VIRTIO_BLK_T_WRITE_ZEROES, 2047, 2, 0, &l);
    assert!(matches!(p.request, Err(RequestError::OutOfRange { .. })));
    let p = range_request(VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 4, &l);
    assert_eq!(p.request, Err(RequestError::UnsupportedFlags(4)));
    l.discard = true;
    let p = range_request(VIRTIO_BLK_T_DISCARD, 0, 8, 0, &l);
    assert_eq!(p.request, Ok(Request::Discard { pos: 0, len: 4096 }));
    let p = range_request(VIRTIO_BLK_T_DISCARD, 0, 8, 1, &l);
    assert_eq!(
        status_of(&p),
        Some(VIRTIO_BLK_S_UNSUPP as u8),
        "unmap flag is reserved for discard"
    );
    let p = range_request(VIRTIO_BLK_T_DISCARD, 0, 1 << 17, 0, &l);
    assert!(matches!(p.request, Err(RequestError::TooLarge(_))));
    l.readonly = true;
    let p = range_request(VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 0, &l);
    assert_eq!(p.request, Err(RequestError::ReadOnly));
}

#[test]
fn writes_to_a_read_only_disk_fail() {
    let mut l = limits();
    l.readonly = true;
    let (p, _) = rw_with(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, 0)], &l);
    assert_eq!(p.request, Err(RequestError::ReadOnly));
    let (p, _) = rw_with(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, F_WRITE)], &l);
    assert!(p.request.is_ok());
}

#[test]
fn a_chain_that_loops_is_refused() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let q = MockSplitQueue::new(&m, 16);
    // 0 -> 1 -> 0 -> ... : every descriptor has NEXT set.
    let d = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, F_NEXT, 1)),
        RawDescriptor::from(SplitDescriptor::new(DATA, 512, F_NEXT | F_WRITE, 0)),
    ];
    let chain = q.build_multiple_desc_chains(&d).unwrap();
    let mut segs = Vec::new();
    let p = parse(&m, chain.head_index(), chain, &limits(), &mut segs);
    assert!(p.request.is_err());
    assert!(matches!(p.request, Err(RequestError::BadChain(_))) || p.status.is_none());
}

#[test]
fn an_indirect_chain_parses_like_a_direct_one() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 2);
    let table = 0x40_0000u64;
    let entries = [
        SplitDescriptor::new(HDR, 16, F_NEXT, 1),
        SplitDescriptor::new(DATA, 1024, F_NEXT | F_WRITE, 2),
        SplitDescriptor::new(STATUS, 1, F_WRITE, 0),
    ];
    for (i, e) in entries.iter().enumerate() {
        m.write_obj(RawDescriptor::from(*e), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let q = MockSplitQueue::new(&m, 16);
    let chain = q
        .build_multiple_desc_chains(&[RawDescriptor::from(SplitDescriptor::new(table, 48, 4, 0))])
        .unwrap();
    let mut segs = Vec::new();
    let p = parse(&m, chain.head_index(), chain, &limits(), &mut segs);
    assert_eq!(
        p.request,
        Ok(Request::Read {
            pos: 1024,
            len: 1024
        })
    );
}
