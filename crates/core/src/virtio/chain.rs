//! Walking a descriptor chain from its head index.
//!
//! virtio-queue builds chains only while popping the avail ring. A daemon
//! restarted under a guest finds the heads of the requests its predecessor
//! never answered in the inflight region (device/inflight.rs) instead, long
//! after they left the avail ring. This walker yields the same descriptors
//! virtio-queue's `DescriptorChain` would, under the same rules: at most
//! table-size descriptors, one level of indirection, at most 4 GiB in all.
//! It stops (returns None) where virtio-queue stops, so `parse` rejects the
//! same broken chains either way.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

const DESC_SIZE: u64 = std::mem::size_of::<Descriptor>() as u64;

/// The descriptors of the chain at `head` in the table at `desc_table` of a
/// queue of `queue_size` entries.
pub fn chain_at<M: GuestMemoryBackend>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> ChainAt<'_, M> {
    ChainAt {
        mem,
        table: desc_table,
        table_len: queue_size,
        next: head,
        ttl: queue_size,
        indirect: false,
        bytes: 0,
    }
}

pub struct ChainAt<'a, M> {
    mem: &'a M,
    table: GuestAddress,
    table_len: u16,
    next: u16,
    /// Descriptors still allowed in the current table (ends loops).
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

impl<M: GuestMemoryBackend> ChainAt<'_, M> {
    /// Continues in the indirect table `desc` points to, if that is allowed.
    fn enter_indirect(&mut self, desc: &Descriptor) -> Option<()> {
        if self.indirect || !desc.len().is_multiple_of(DESC_SIZE as u32) {
            return None;
        }
        self.table_len = u16::try_from(desc.len() / DESC_SIZE as u32).ok()?;
        self.table = desc.addr();
        self.next = 0;
        self.ttl = self.table_len;
        self.indirect = true;
        Some(())
    }
}

impl<M: GuestMemoryBackend> Iterator for ChainAt<'_, M> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.table_len {
                return None;
            }
            let addr = self.table.checked_add(u64::from(self.next) * DESC_SIZE)?;
            let desc: Descriptor = self.mem.read_obj(addr).ok()?;
            if desc.refers_to_indirect_table() {
                self.enter_indirect(&desc)?;
                continue;
            }
            self.bytes = self.bytes.checked_add(desc.len())?;
            if desc.has_next() {
                self.next = desc.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(desc);
        }
    }
}

#[cfg(test)]
mod tests {
    //! virtio-queue's own chains are the oracle: every chain shape, valid or
    //! hostile, must come out of `chain_at` exactly as `pop_descriptor_chain`
    //! yields it.
    use super::*;
    use proptest::prelude::*;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::GuestMemoryMmap;

    const QSIZE: u16 = 16;
    const INDIRECT_TABLE: u64 = 0x8000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// A raw descriptor: (addr, len, flags, next).
    type Raw = (u64, u32, u16, u16);

    fn desc((addr, len, flags, next): Raw) -> Descriptor {
        Descriptor::new(addr, len, flags, next)
    }

    fn fields(d: &Descriptor) -> Raw {
        (d.addr().0, d.len(), d.flags(), d.next())
    }

    /// Puts `table` in the queue's descriptor table (and `indirect` at
    /// INDIRECT_TABLE), publishes `head`, and returns what virtio-queue and
    /// chain_at each yield for it.
    fn both_walks(table: &[Raw], indirect: &[Raw], head: u16) -> (Vec<Raw>, Vec<Raw>) {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QSIZE);
        for (i, raw) in table.iter().enumerate() {
            mem.write_obj(
                desc(*raw),
                vq.desc_table_addr().unchecked_add(i as u64 * DESC_SIZE),
            )
            .unwrap();
        }
        for (i, raw) in indirect.iter().enumerate() {
            mem.write_obj(
                desc(*raw),
                GuestAddress(INDIRECT_TABLE + i as u64 * DESC_SIZE),
            )
            .unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(u16::to_le(head));
        vq.avail().idx().store(u16::to_le(1));
        let mut queue: virtio_queue::Queue = vq.create_queue().unwrap();
        let ours = chain_at(&mem, GuestAddress(queue.desc_table()), queue.size(), head)
            .map(|d| fields(&d))
            .collect();
        let theirs = queue
            .pop_descriptor_chain(&mem)
            .map(|c| c.map(|d| fields(&d)).collect())
            .unwrap_or_default();
        (ours, theirs)
    }

    const N: u16 = VRING_DESC_F_NEXT as u16;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const I: u16 = VRING_DESC_F_INDIRECT as u16;

    #[test]
    fn a_plain_chain_matches_virtio_queue() {
        let table = [
            (0x1000, 16, N, 3),
            (0, 0, 0, 0),
            (0, 0, 0, 0),
            (0x2000, 4096, N | W, 5),
            (0, 0, 0, 0),
            (0x3000, 1, W, 0),
        ];
        let (ours, theirs) = both_walks(&table, &[], 0);
        assert_eq!(ours.len(), 3);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn an_indirect_chain_matches_virtio_queue() {
        let table = [(INDIRECT_TABLE, 3 * DESC_SIZE as u32, I, 0)];
        let indirect = [(0x1000, 16, N, 1), (0x2000, 512, N, 2), (0x3000, 1, W, 0)];
        let (ours, theirs) = both_walks(&table, &indirect, 0);
        assert_eq!(ours.len(), 3);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn loops_nesting_and_bad_tables_stop_where_virtio_queue_stops() {
        let looping = [(0x1000, 16, N, 1), (0x2000, 16, N, 0)];
        let nested = [(INDIRECT_TABLE, 2 * DESC_SIZE as u32, I, 0)];
        let nested_inner = [(0x1000, 16, N, 1), (INDIRECT_TABLE, 32, I, 0)];
        let ragged = [(INDIRECT_TABLE, 20, I, 0)];
        let out_of_memory = [(0x1000, 16, N, 1), (0xffff_0000_0000, 16, 0, 0)];
        for (table, indirect) in [
            (&looping[..], &[][..]),
            (&nested[..], &nested_inner[..]),
            (&ragged[..], &[][..]),
        ] {
            let (ours, theirs) = both_walks(table, indirect, 0);
            assert_eq!(ours, theirs, "table {table:?}");
        }
        let (ours, theirs) = both_walks(&out_of_memory, &[], 0);
        assert_eq!(ours, theirs);
        let (ours, _) = both_walks(&looping, &[], 0);
        assert_eq!(
            ours.len(),
            QSIZE as usize,
            "a loop ends after one table's worth"
        );
    }

    #[test]
    fn a_head_past_the_table_yields_nothing() {
        let mem = memory();
        assert_eq!(chain_at(&mem, GuestAddress(0), QSIZE, QSIZE).count(), 0);
    }

    proptest! {
        #[test]
        fn any_table_walks_like_virtio_queue(
            table in proptest::collection::vec(
                (0u64..0x2_0000, 0u32..0x2000, 0u16..8, 0u16..QSIZE + 2), 1..QSIZE as usize),
            head in 0u16..QSIZE,
        ) {
            // Indirect descriptors point at the (empty or garbage) indirect table area.
            let table: Vec<Raw> = table
                .into_iter()
                .map(|(a, l, f, n)| if f & I != 0 { (INDIRECT_TABLE, l, f, n) } else { (a, l, f, n) })
                .collect();
            let indirect = [(0x1000, 16, N, 1), (0x2000, 16, W, 0)];
            let (ours, theirs) = both_walks(&table, &indirect, head);
            prop_assert_eq!(ours, theirs);
        }
    }
}
