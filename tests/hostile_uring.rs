//! The hostile guest and VMM cases (tests/hostile_cases) on the io_uring
//! paths, where requests go through a ring and a buffer pool per queue and
//! complete out of order: `--io pread` (page cache) and `--direct`
//! (O_DIRECT). See tests/hostile.rs for the other modes.

mod support;
#[macro_use]
mod hostile_cases;

in_modes! {
    descriptors_outside_guest_memory: [pread, direct];
    huge_lengths: [pread, direct];
    chain_loops_and_chains_longer_than_the_queue: [pread, direct];
    hostile_indirect_tables: [pread, direct];
    short_or_writable_headers: [pread, direct];
    wrong_data_direction: [pread, direct];
    unusable_status_descriptor: [pread, direct];
    sectors_past_the_end: [pread, direct];
    unaligned_lengths_and_offsets: [pread, direct];
    unknown_request_types: [pread, direct];
    get_id_into_one_byte: [pread, direct];
    valid_writes_obey_the_mode: [pread, direct];
    bad_vring_sizes: [pread, direct];
    queue_index_out_of_range: [pread, direct];
    memory_table_with_no_regions: [pread, direct];
    // The queue loop differs here (completions, a full pool): the broken
    // ring and the stale ring addresses again, and connections cut short
    // with rings and pools set up (10 cycles, 2 of each kind).
    avail_index_far_ahead_of_the_ring: [pread];
    unmapped_vring_addresses: [pread];
    rapid_connect_disconnect: [pread];
}
