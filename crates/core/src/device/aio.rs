//! Asynchronous execution of one queue's requests through the store
//! (io_uring): many requests per queue at the disk at once, completed in
//! any order, all on the queue's own vring thread.
//!
//! Life of a read: its range is cut into pieces of at most one pool buffer;
//! each piece reads ciphertext into its buffer; when a piece completes, the
//! cipher decrypts from the buffer into the guest's buffers (the cipher is
//! the copy) and the buffer goes back to the pool. A write encrypts each
//! piece from guest memory into a buffer before submitting it. The request
//! is finished when its last piece is. The kernel only ever sees pool
//! buffers: never guest memory, and never plaintext.
//!
//! Bounds: at most `table` requests and the pool's buffers in flight. A
//! request that finds the pool empty stays "stalled" with its remaining
//! pieces and continues as buffers come back; while one is stalled the
//! queue pops nothing new (backpressure on the guest). Nothing allocates per
//! request once each slot's segment vector has grown.
//!
//! Guest memory: each request holds the memory map it was parsed against
//! (an `Arc`), so its regions stay mapped until it completes even if the
//! frontend replaces the memory table or disconnects meanwhile.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;

use super::GuestMemory;
use vm_memory::GuestAddress;

use super::completion::{Finished, Outcome};
use super::stats::Ticket;
use crate::store::{BufId, Buffers, Op, Store, UringStore};
use crate::virtio::{sub_segments, GuestBufs, Request, Segment};
use crate::volume::Volume;

/// Bytes of one pool buffer.
const BUF_BYTES: usize = 128 << 10;
/// Most adjacent buffers one piece takes: pieces of up to 1 MiB, so a large
/// request reaches the disk as large operations.
const MAX_RUN: usize = 8;
/// Buffers per queue: 16 MiB of pool, 128 4K requests at the disk at once.
const BUFS: usize = 128;
/// Most requests one queue keeps in flight.
const MAX_REQUESTS: usize = 256;
/// A read or write that moves fewer bytes than asked (the image shrank
/// under us?) or meets EAGAIN is redone this often before the guest gets
/// an error.
const RETRIES: u8 = 3;
/// Tags of operations without a buffer (FLUSH, DISCARD) carry the request
/// index with this bit; data operations are tagged with their buffer.
const NO_BUFFER: u64 = 1 << 32;

#[derive(Default)]
struct Pending {
    head: u16,
    status_at: GuestAddress,
    request: Option<Request>,
    segments: Vec<Segment>,
    mem: Option<Arc<GuestMemory>>,
    /// Bytes of the request already given to pieces.
    queued: u64,
    /// Operations of this request the kernel has not completed.
    outstanding: u32,
    error: Option<io::Error>,
    ticket: Option<Ticket>,
}

impl Pending {
    /// Bytes the request moves through buffers (0 for FLUSH, DISCARD).
    fn data_len(&self) -> u64 {
        match self.request {
            Some(Request::Read { len, .. })
            | Some(Request::Write { len, .. })
            | Some(Request::WriteZeroes { len, .. }) => len,
            _ => 0,
        }
    }

    fn all_queued(&self) -> bool {
        self.queued >= self.data_len()
    }

    fn fail(&mut self, error: io::Error) {
        self.error.get_or_insert(error);
        // Pieces not yet queued never will be.
        self.queued = self.data_len();
    }
}

/// What a run of buffers in flight (named by its first) belongs to.
#[derive(Clone, Copy, Default)]
struct Piece {
    request: u16,
    /// Buffers in the run.
    bufs: u8,
    /// Byte offset of the piece in its request.
    at: u64,
    len: u32,
    retries: u8,
}

/// Receives each finished request with the guest memory it was parsed
/// against (the status byte goes there).
pub type Done<'a> = dyn FnMut(Finished, &GuestMemory) -> io::Result<()> + 'a;

/// One queue's asynchronous executor.
pub struct AsyncQueue {
    store: Store,
    /// Bytes of the largest piece: a run of MAX_RUN buffers, or less if
    /// the image takes less in one operation (an NBD server's maximum
    /// block size).
    max_piece: u64,
    requests: Vec<Pending>,
    free: Vec<u16>,
    pieces: Vec<Piece>,
    stalled: Option<u16>,
    /// Sub-segments of a piece and their slices, reused.
    piece_segments: Vec<Segment>,
    bufs: GuestBufs,
    /// Requests that finished, waiting to be handed to the completion path.
    finished: Vec<(Finished, Arc<GuestMemory>)>,
    reaped: Vec<(u64, i32)>,
}

impl AsyncQueue {
    /// An executor on `volume`'s image for queue `queue` of `queue_size`
    /// entries: io_uring on a file or block device, the queue's own
    /// connection on an NBD export. None: the export has no connection for
    /// this queue (the caller serves it synchronously).
    pub fn new(volume: &Volume, queue_size: u16, queue: usize) -> io::Result<Option<Self>> {
        let table = usize::from(queue_size).min(MAX_REQUESTS);
        let buffers = Buffers::new(BUFS, BUF_BYTES);
        // Room for every buffer's operation plus one FLUSH or DISCARD per
        // request: the submission queue never needs to wait for the kernel.
        let entries = (BUFS + table).next_power_of_two() as u32;
        let store = match (volume.image_fd(), volume.nbd(), volume.rbd()) {
            (Some(fd), _, _) => Store::Uring(UringStore::new(fd, entries, buffers)?),
            (None, Some(export), _) => match export.store(queue, buffers)? {
                Some(store) => store,
                None => return Ok(None),
            },
            // The daemon's one image handle, or read-only the queue's own
            // (see RbdDisk for why and what it measured).
            (None, None, Some(disk)) => Store::Rbd(disk.store(queue, buffers)?),
            (None, None, None) => return Ok(None),
        };
        let run = (MAX_RUN * BUF_BYTES) as u64;
        Ok(Some(AsyncQueue {
            store,
            max_piece: volume.max_io().map_or(run, |max| max.min(run)),
            requests: (0..table).map(|_| Pending::default()).collect(),
            free: (0..table as u16).rev().collect(),
            pieces: vec![Piece::default(); BUFS],
            stalled: None,
            piece_segments: Vec::new(),
            bufs: GuestBufs::default(),
            finished: Vec::with_capacity(table),
            reaped: Vec::with_capacity(entries as usize * 2),
        }))
    }

    /// Readable when completions are waiting.
    pub fn event_fd(&self) -> RawFd {
        self.store.event_fd()
    }

    /// The completion eventfd woke the vring thread: clear it before taking
    /// completions (one that lands meanwhile sets it again).
    pub fn clear_event(&self) {
        self.store.clear_event();
    }

    /// Whether `request` runs here. GET_ID touches only guest memory, and
    /// a block device's discard is an ioctl: those run inline.
    pub fn takes(volume: &Volume, request: &Request) -> bool {
        match request {
            Request::GetId { .. } => false,
            Request::Discard { .. } => !volume.is_block_device(),
            _ => true,
        }
    }

    /// Whether a new request can start now.
    pub fn has_room(&self) -> bool {
        self.stalled.is_none() && !self.free.is_empty()
    }

    /// Requests accepted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.requests.len() - self.free.len()
    }

    /// Starts `request` (the caller checked `has_room`): queues as many of
    /// its operations as the pool allows. They reach the kernel at the next
    /// `submit`. `(head, ticket)`: its chain and its statistics ticket.
    pub fn start(
        &mut self,
        volume: &Volume,
        (head, ticket): (u16, Ticket),
        status_at: GuestAddress,
        request: Request,
        segments: &[Segment],
        mem: &Arc<GuestMemory>,
    ) {
        let index = self.free.pop().expect("start() without has_room()");
        let p = &mut self.requests[index as usize];
        p.head = head;
        p.status_at = status_at;
        p.request = Some(request);
        p.segments.clear();
        p.segments.extend_from_slice(segments);
        p.mem = Some(mem.clone());
        p.queued = 0;
        p.outstanding = 0;
        p.error = None;
        p.ticket = Some(ticket);
        match request {
            Request::Flush => self.push_unbuffered(index, Op::Sync),
            Request::Discard { pos, len } => {
                let offset = volume.image_offset(pos);
                self.push_unbuffered(index, Op::Discard { offset, len })
            }
            _ => self.queue_pieces(volume, index),
        }
        self.finish_if_done(index);
    }

    /// Queues an operation without a buffer; a ring that refuses it fails
    /// the request (never the queue).
    fn push_unbuffered(&mut self, index: u16, op: Op) {
        let p = &mut self.requests[index as usize];
        match self.store.push(op, NO_BUFFER | u64::from(index)) {
            Ok(()) => p.outstanding += 1,
            Err(e) => p.fail(e),
        }
    }

    /// Gives the request's remaining bytes to pieces while buffers last;
    /// marks it stalled if they run out first.
    fn queue_pieces(&mut self, volume: &Volume, index: u16) {
        while !self.requests[index as usize].all_queued() {
            let p = &self.requests[index as usize];
            let remaining = (p.data_len() - p.queued).min(self.max_piece);
            let want = (remaining.div_ceil(BUF_BYTES as u64) as usize).min(MAX_RUN);
            let Some((buf, bufs)) = self.store.buffers().take_run(want) else {
                self.stalled = Some(index);
                return;
            };
            let len = remaining.min((bufs * BUF_BYTES) as u64) as u32;
            let piece = Piece {
                request: index,
                bufs: bufs as u8,
                at: p.queued,
                len,
                retries: 0,
            };
            self.requests[index as usize].queued += u64::from(len);
            self.pieces[buf as usize] = piece;
            if let Err(e) = self.fill(volume, buf) {
                self.store.buffers().put_run(buf, bufs);
                self.requests[index as usize].fail(e);
                break;
            }
            self.push_piece(volume, buf);
        }
        if self.stalled == Some(index) {
            self.stalled = None;
        }
    }

    /// Writes put their ciphertext into the buffer before submission.
    fn fill(&mut self, volume: &Volume, buf: BufId) -> io::Result<()> {
        let piece = self.pieces[buf as usize];
        let p = &self.requests[piece.request as usize];
        let (Some(request), Some(mem)) = (p.request, p.mem.as_deref()) else {
            return Ok(());
        };
        let dst = self.store.buffers().bytes_mut(buf, piece.len as usize);
        match request {
            Request::Write { pos, .. } => {
                let segs = &mut self.piece_segments;
                segs.clear();
                sub_segments(&p.segments, piece.at, u64::from(piece.len), segs);
                self.bufs
                    .with_readable(mem, segs, |b| volume.encrypt_to(pos + piece.at, b, dst))
                    .map_err(|_| unmapped())
            }
            Request::WriteZeroes { pos, .. } => {
                volume.encrypt_zeroes(pos + piece.at, dst);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Queues a piece's operation; a ring that refuses it returns the
    /// buffers and fails the request (never the queue).
    fn push_piece(&mut self, volume: &Volume, buf: BufId) {
        let piece = self.pieces[buf as usize];
        let offset = |pos: u64| volume.image_offset(pos + piece.at);
        let len = piece.len;
        let op = match self.requests[piece.request as usize].request {
            Some(Request::Read { pos, .. }) => Op::Read {
                buf,
                len,
                offset: offset(pos),
            },
            Some(Request::Write { pos, .. }) | Some(Request::WriteZeroes { pos, .. }) => {
                Op::Write {
                    buf,
                    len,
                    offset: offset(pos),
                }
            }
            other => unreachable!("a buffer for {other:?}"),
        };
        let p = &mut self.requests[piece.request as usize];
        match self.store.push(op, u64::from(buf)) {
            Ok(()) => p.outstanding += 1,
            Err(e) => {
                p.fail(e);
                self.store.buffers().put_run(buf, usize::from(piece.bufs));
            }
        }
    }

    /// Takes what the kernel completed, continues a stalled request,
    /// submits, and hands every finished request to `done`.
    pub fn progress(&mut self, volume: &Volume, done: &mut Done<'_>) -> io::Result<()> {
        loop {
            let mut reaped = std::mem::take(&mut self.reaped);
            self.store.reap(|tag, result| reaped.push((tag, result)))?;
            for &(tag, result) in &reaped {
                self.complete_op(volume, decode(tag), result);
            }
            reaped.clear();
            self.reaped = reaped;
            if let Some(index) = self.stalled {
                self.queue_pieces(volume, index);
                self.finish_if_done(index);
            }
            self.store.submit()?;
            // Submitting may have read replies (an NBD store reads while it
            // waits to send): no event announces those, so take them now.
            if !self.store.ready() {
                break;
            }
        }
        let mut finished = std::mem::take(&mut self.finished);
        let handed = finished.drain(..).try_for_each(|(f, mem)| done(f, &mem));
        self.finished = finished;
        handed
    }

    /// Blocks until every accepted request has finished (GET_VRING_BASE,
    /// disconnect, SIGTERM).
    pub fn drain(&mut self, volume: &Volume, done: &mut Done<'_>) -> io::Result<()> {
        self.progress(volume, done)?;
        while self.in_flight() > 0 {
            self.store.wait()?;
            self.progress(volume, done)?;
        }
        Ok(())
    }

    /// With exactly one request in flight (a guest at queue depth 1), waits
    /// for it here: the answer reaches the guest without another trip
    /// through the completion eventfd and epoll, which at QD1 is most of
    /// what asynchronous I/O costs over a plain pread. A guest that posts
    /// another request meanwhile waits at most this one's latency, as it
    /// would with synchronous I/O.
    pub fn finish_lone_request(&mut self, volume: &Volume, done: &mut Done<'_>) -> io::Result<()> {
        if self.in_flight() != 1 || self.store.in_flight() == 0 {
            return Ok(());
        }
        self.store.wait()?;
        self.progress(volume, done)
    }

    /// Blocks until a new request can start (replaying a predecessor's
    /// requests, which must all be accepted before new ones).
    pub fn wait_for_room(&mut self, volume: &Volume, done: &mut Done<'_>) -> io::Result<()> {
        self.progress(volume, done)?;
        while !self.has_room() {
            self.store.wait()?;
            self.progress(volume, done)?;
        }
        Ok(())
    }

    fn complete_op(&mut self, volume: &Volume, tag: Tag, result: i32) {
        let index = match tag {
            Tag::Unbuffered(index) => {
                let p = &mut self.requests[index as usize];
                p.outstanding -= 1;
                if result < 0 {
                    p.fail(errno(result, p.request));
                }
                index
            }
            Tag::Buffer(buf) => {
                let piece = self.pieces[buf as usize];
                let again = result == -libc::EAGAIN || (result >= 0 && result as u32 != piece.len);
                if again && piece.retries < RETRIES {
                    // Redo the whole piece: reads and writes are idempotent.
                    self.pieces[buf as usize].retries += 1;
                    self.requests[piece.request as usize].outstanding -= 1;
                    self.push_piece(volume, buf);
                    self.finish_if_done(piece.request);
                    return;
                }
                let p = &mut self.requests[piece.request as usize];
                p.outstanding -= 1;
                if result < 0 {
                    p.fail(errno(result, p.request));
                } else if result as u32 != piece.len {
                    p.fail(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{:?}: the image ended early", p.request),
                    ));
                } else if let Err(e) = self.drain_read(volume, buf) {
                    self.requests[piece.request as usize].fail(e);
                }
                self.store.buffers().put_run(buf, usize::from(piece.bufs));
                piece.request
            }
        };
        self.finish_if_done(index);
    }

    /// A read piece arrived: decrypt it from its buffer into guest memory.
    fn drain_read(&mut self, volume: &Volume, buf: BufId) -> io::Result<()> {
        let piece = self.pieces[buf as usize];
        let p = &self.requests[piece.request as usize];
        let (Some(Request::Read { pos, .. }), Some(mem)) = (p.request, p.mem.as_deref()) else {
            return Ok(());
        };
        if p.error.is_some() {
            return Ok(());
        }
        let segs = &mut self.piece_segments;
        segs.clear();
        sub_segments(&p.segments, piece.at, u64::from(piece.len), segs);
        let src = self.store.buffers().bytes_mut(buf, piece.len as usize);
        self.bufs
            .with_writable(mem, segs, |b| volume.decrypt_to(pos + piece.at, src, b))
            .map_err(|_| unmapped())
    }

    fn finish_if_done(&mut self, index: u16) {
        let p = &mut self.requests[index as usize];
        if p.outstanding > 0 || !p.all_queued() || self.stalled == Some(index) {
            return;
        }
        let (Some(request), Some(mem), Some(ticket)) =
            (p.request.take(), p.mem.take(), p.ticket.take())
        else {
            return;
        };
        let outcome = match p.error.take() {
            Some(e) => Outcome::Failed(e),
            None => match request {
                Request::Read { len, .. } => Outcome::Done(len as u32),
                _ => Outcome::Done(0),
            },
        };
        let finished = Finished {
            head: p.head,
            status_at: Some(p.status_at),
            outcome,
            ticket,
        };
        self.finished.push((finished, mem));
        self.free.push(index);
    }
}

enum Tag {
    Buffer(BufId),
    Unbuffered(u16),
}

fn decode(tag: u64) -> Tag {
    if tag & NO_BUFFER != 0 {
        Tag::Unbuffered(tag as u16)
    } else {
        Tag::Buffer(tag as BufId)
    }
}

fn errno(result: i32, request: Option<Request>) -> io::Error {
    let e = io::Error::from_raw_os_error(-result);
    io::Error::new(e.kind(), format!("{request:?}: {e}"))
}

fn unmapped() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "a guest buffer left guest memory",
    )
}
