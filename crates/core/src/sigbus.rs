//! A SIGBUS in a mapping the daemon registered becomes an error of whoever
//! owns that mapping instead of a crash of the process.
//!
//! Where pread/pwrite return an error, an access to a shared file mapping
//! raises SIGBUS: a page the disk cannot read (EIO), a write into a hole of a
//! sparse image when the filesystem is full or over quota, an access past the
//! end after another process truncated the file. By default that kills the
//! daemon and every VM disk it serves. Two kinds of mapping are registered:
//! the image's payload (`volume/mapping.rs`) and the guest memory a VMM
//! shares (`device/guest_faults.rs`), which a VMM can truncate when the
//! daemon could not seal it.
//!
//! The handler looks up the faulting address in a table of registered
//! mappings. If it is in one, it counts the fault in that mapping's slot and
//! maps an anonymous page over the faulting page, so the interrupted copy
//! resumes and finishes (on garbage). The owner reads the count after every
//! copy: the volume redoes the request with pread/pwrite, which report the
//! real error to the guest, and stays on pread/pwrite from then on (its
//! mapping now has anonymous holes); the device fails the request and ends
//! the VMM's connection.
//! The count is raised before the page is replaced, so a copy on another
//! thread that read the replacement page also sees the new count (the mmap
//! call that swaps the page shoots down every CPU's TLB first).
//!
//! A SIGBUS anywhere else goes to the handler that was there before (Rust's
//! stack-overflow handler) or gets the default action, as without us.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Mappings alive at once (one per open volume, one per guest memory
/// region; tests open several volumes). At most 64: a set of slots is a
/// 64-bit mask ([`faults_in`]).
const SLOTS: usize = 64;
const _: () = assert!(SLOTS <= 64);

struct Entry {
    used: AtomicBool,
    start: AtomicUsize,
    end: AtomicUsize,
    /// Bytes the handler replaces around a faulting address (the mapping's
    /// page size); 0: the system page size.
    granule: AtomicUsize,
    faults: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Entry = Entry {
    used: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    granule: AtomicUsize::new(0),
    faults: AtomicU64::new(0),
};

static TABLE: [Entry; SLOTS] = [FREE; SLOTS];
static PAGE: AtomicUsize = AtomicUsize::new(4096);

struct Previous(libc::sigaction);
// SAFETY: a sigaction is plain data (a handler address, flags, a mask); it
// is written once before it is shared and only read afterwards.
unsafe impl Sync for Previous {}
// SAFETY: as for Sync.
unsafe impl Send for Previous {}

static PREVIOUS: OnceLock<Previous> = OnceLock::new();
static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();

/// A registered mapping: its faults are counted until it is dropped.
pub struct Slot(usize);

impl Slot {
    /// Registers `[start, start + len)`, installing the handler on first use.
    pub fn register(start: usize, len: usize) -> io::Result<Slot> {
        Self::register_pages(start, len, 0)
    }

    /// Registers `[start, start + len)`, a mapping of `page`-byte pages (a
    /// hugetlbfs file's huge pages, which only whole can be replaced; 0:
    /// the system page size). `start` is aligned to `page`, as mmap makes it.
    pub fn register_pages(start: usize, len: usize, page: usize) -> io::Result<Slot> {
        install()?;
        for (i, e) in TABLE.iter().enumerate() {
            if e.used
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                e.faults.store(0, Ordering::SeqCst);
                e.granule.store(page, Ordering::SeqCst);
                e.end.store(start + len, Ordering::SeqCst);
                e.start.store(start, Ordering::SeqCst);
                return Ok(Slot(i));
            }
        }
        Err(io::Error::other(format!(
            "all {SLOTS} slots for mappings that may fault are taken"
        )))
    }

    /// SIGBUS faults seen in this mapping so far.
    pub fn faults(&self) -> u64 {
        TABLE[self.0].faults.load(Ordering::SeqCst)
    }

    /// This slot's bit in a set of slots (see [`faults_in`]).
    pub fn bit(&self) -> u64 {
        1 << self.0
    }

    /// What the handler does on a fault, for tests of the code that reads
    /// the count.
    #[cfg(test)]
    pub fn count_fault(&self) {
        TABLE[self.0].faults.fetch_add(1, Ordering::SeqCst);
    }
}

/// The faults of every slot in `set` (a mask of [`Slot::bit`]s): only
/// loads, for a check on the data path. A bit whose slot was just given
/// back may read the next owner's count; the caller keeps the faults of
/// the slots it gives back before clearing their bits.
pub fn faults_in(set: u64) -> u64 {
    let mut sum = 0;
    let mut rest = set;
    while rest != 0 {
        let i = rest.trailing_zeros() as usize;
        rest &= rest - 1;
        sum += TABLE[i].faults.load(Ordering::SeqCst);
    }
    sum
}

impl Drop for Slot {
    fn drop(&mut self) {
        let e = &TABLE[self.0];
        e.start.store(0, Ordering::SeqCst);
        e.end.store(0, Ordering::SeqCst);
        e.used.store(false, Ordering::Release);
    }
}

fn install() -> io::Result<()> {
    let result = INSTALLED.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE.store(page as usize, Ordering::SeqCst);
        }
        // SAFETY: zeroed is a valid sigaction (empty mask, no flags); the
        // handler has the SA_SIGINFO signature; `old` receives the previous
        // disposition, kept for chaining.
        unsafe {
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_sigbus as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut new.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &new, &mut old) != 0 {
                return Err(io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
            let _ = PREVIOUS.set(Previous(old));
        }
        Ok(())
    });
    result.map_err(io::Error::from_raw_os_error)
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo with SA_SIGINFO; si_addr is
    // meaningful for kernel-raised (si_code > 0) SIGBUS.
    let addr = unsafe {
        if (*info).si_code > 0 {
            (*info).si_addr() as usize
        } else {
            0
        }
    };
    if addr != 0 && absorb(addr) {
        return;
    }
    // SAFETY: forwarding the same arguments the kernel gave us.
    unsafe { chain(sig, info, ctx) }
}

/// Counts the fault and puts an anonymous page over `addr` if it lies in a
/// registered mapping. Only atomics and one syscall: async-signal-safe.
fn absorb(addr: usize) -> bool {
    for e in &TABLE {
        let start = e.start.load(Ordering::SeqCst);
        if start == 0 || addr < start || addr >= e.end.load(Ordering::SeqCst) {
            continue;
        }
        e.faults.fetch_add(1, Ordering::SeqCst);
        let page_size = match e.granule.load(Ordering::SeqCst) {
            0 => PAGE.load(Ordering::SeqCst),
            g => g,
        };
        // A granule larger than the system page (huge pages) may start
        // before the mapping if the mapping is not aligned to it: stay inside.
        let page = (addr & !(page_size - 1)).max(start);
        let page_size = page_size.min(e.end.load(Ordering::SeqCst) - page);
        // SAFETY: the page lies inside a live mapping this process owns
        // (registered until just before munmap; the owners of guest memory
        // keep it mapped while registered); replacing it with private
        // anonymous memory leaves every other mapping alone.
        let p = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        return p != libc::MAP_FAILED;
    }
    false
}

/// Hands a SIGBUS that is not ours to the previous handler, or restores the
/// default action so that the faulting access, retried, kills the process.
///
/// # Safety
/// The arguments are those the kernel passed to [`on_sigbus`].
unsafe fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    if let Some(Previous(prev)) = PREVIOUS.get() {
        let h = prev.sa_sigaction;
        if h != libc::SIG_DFL && h != libc::SIG_IGN {
            // SAFETY: `h` was installed as a handler of the flavour its
            // SA_SIGINFO flag says.
            unsafe {
                if prev.sa_flags & libc::SA_SIGINFO != 0 {
                    let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                        std::mem::transmute(h);
                    f(sig, info, ctx);
                } else {
                    let f: extern "C" fn(libc::c_int) = std::mem::transmute(h);
                    f(sig);
                }
            }
            return;
        }
    }
    // SAFETY: resetting a signal to its default disposition.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
    }
}
