//! `cryptblk::virtio::chain_at`, the walker a restarted daemon uses for the
//! heads its predecessor left in flight, with virtio-queue's own chains as
//! the oracle: for every chain the fuzzed queue pops, both must yield the
//! same descriptors and stop at the same place. Walks from every other head
//! index, valid or not, must end without panicking.
#![no_main]

use cryptblk::virtio::chain_at;
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::GuestAddress;

/// (addr, len, flags, next)
fn fields(d: &Descriptor) -> (u64, u32, u16, u16) {
    (d.addr().0, d.len(), d.flags(), d.next())
}

fuzz_target!(|data: &[u8]| {
    let Some(mut guest) = cryptblk_fuzz::Guest::new(data) else {
        return;
    };
    let size = guest.queue.size();
    let table = GuestAddress(cryptblk_fuzz::DESC);
    for _ in 0..size {
        let Some(chain) = guest.queue.pop_descriptor_chain(&guest.mem) else {
            break;
        };
        let head = chain.head_index();
        let theirs: Vec<_> = chain.map(|d| fields(&d)).collect();
        let ours: Vec<_> = chain_at(&guest.mem, table, size, head)
            .map(|d| fields(&d))
            .collect();
        assert_eq!(
            ours, theirs,
            "the chain at head {head} differs from virtio-queue's"
        );
    }
    for head in 0..=size {
        chain_at(&guest.mem, table, size, head).for_each(drop);
    }
});
