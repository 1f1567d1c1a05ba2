//! Arbitrary guest memory holding a split virtqueue: every chain is parsed
//! and whatever `parse` accepts is checked against the device's limits.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(mut guest) = cryptblk_fuzz::Guest::new(data) else {
        return;
    };
    let limits = guest.limits();
    guest.run(&limits, |_, _, _| 0);
});
