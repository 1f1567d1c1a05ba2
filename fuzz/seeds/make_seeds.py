#!/usr/bin/env python3
"""Writes seed inputs for the parse and complete targets (see fuzz/src/lib.rs
for the layout): one valid chain of each request type, direct and indirect,
so libFuzzer starts from requests the device accepts."""
import os
import struct
import sys

REGION_A = 0x3000
NEXT, WRITE, INDIRECT = 1, 2, 4


def desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def seed(kind, sector, descs, extra=(), indirect=False, config=(4, 0x42)):
    mem = bytearray(REGION_A)
    table = b"".join(desc(*d) for d in descs)
    if indirect:
        mem[0x2000:0x2000 + len(table)] = table
        mem[0:16] = desc(0x2000, len(table), INDIRECT, 0)
    else:
        mem[0:len(table)] = table
    mem[0x400:0x406] = struct.pack("<HHH", 0, 1, 0)  # avail: flags, idx 1, ring[0] = head 0
    mem[0x1000:0x1010] = struct.pack("<IIQ", kind, 0, sector)
    for addr, data in extra:
        mem[addr:addr + len(data)] = data
    return bytes(config) + bytes(mem)


HDR, STATUS, DATA, RANGE = 0x1000, 0x1010, 0x1100, 0x1200
hdr = (HDR, 16, NEXT, 1)
seeds = {
    "read": seed(0, 2, [hdr, (DATA, 1024, WRITE | NEXT, 2), (STATUS, 1, WRITE, 0)]),
    "write": seed(1, 4, [hdr, (DATA, 512, NEXT, 2), (STATUS, 1, WRITE, 0)]),
    "write_region_b": seed(1, 0, [hdr, (0x10000, 4096, NEXT, 2), (STATUS, 1, WRITE, 0)]),
    "flush": seed(4, 0, [hdr, (STATUS, 1, WRITE, 0)]),
    "get_id": seed(8, 0, [hdr, (DATA, 20, WRITE | NEXT, 2), (STATUS, 1, WRITE, 0)]),
    "write_zeroes": seed(13, 0, [hdr, (RANGE, 16, NEXT, 2), (STATUS, 1, WRITE, 0)],
                         extra=[(RANGE, struct.pack("<QII", 8, 8, 0))]),
    "discard": seed(11, 0, [hdr, (RANGE, 16, NEXT, 2), (STATUS, 1, WRITE, 0)],
                    extra=[(RANGE, struct.pack("<QII", 16, 8, 0))]),
    "read_indirect": seed(0, 0, [hdr, (DATA, 512, WRITE | NEXT, 2), (DATA + 512, 512, WRITE | NEXT, 3),
                                 (STATUS, 1, WRITE, 0)], indirect=True),
}
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(out, "seed-" + name), "wb") as f:
        f.write(data)
