//! A hostile guest or VMM against the real daemon (the cases are in
//! tests/hostile_cases): every case in the default mode (inline crypto,
//! the page-cache mapping), with the worker pool splitting every request of
//! 4 KiB or more, with `--allow-discards`, and read-only (`--readonly`,
//! with `--allow-discards` that it must override). The io_uring paths
//! (`--io pread`, `--direct`) are in tests/hostile_uring.rs: each of their
//! connections sets up and wipes buffer pools, which costs a debug build
//! about half a second, so they get a test binary of their own.

mod support;
#[macro_use]
mod hostile_cases;

in_modes! {
    descriptors_outside_guest_memory: [default, workers, discards, readonly];
    huge_lengths: [default, workers, discards, readonly];
    chain_loops_and_chains_longer_than_the_queue: [default, workers, discards, readonly];
    hostile_indirect_tables: [default, workers, discards, readonly];
    short_or_writable_headers: [default, workers, discards, readonly];
    wrong_data_direction: [default, workers, discards, readonly];
    unusable_status_descriptor: [default, workers, discards, readonly];
    sectors_past_the_end: [default, workers, discards, readonly];
    unaligned_lengths_and_offsets: [default, workers, discards, readonly];
    unknown_request_types: [default, workers, discards, readonly];
    get_id_into_one_byte: [default, workers, discards, readonly];
    valid_writes_obey_the_mode: [default, workers, discards, readonly];
    discard_ranges_are_checked: [discards, readonly];
    bad_vring_sizes: [default, workers, discards, readonly];
    queue_index_out_of_range: [default, workers, discards, readonly];
    memory_table_with_no_regions: [default, workers, discards, readonly];
    // These wait for things that must not happen (about 12, 5 and 9 s):
    // the vring thread's loop is the same in these modes.
    avail_index_far_ahead_of_the_ring: [default];
    unmapped_vring_addresses: [default];
    rapid_connect_disconnect: [default];
}
