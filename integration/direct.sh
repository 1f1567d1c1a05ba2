#!/usr/bin/env bash
# cryptblk with O_DIRECT (how production VM disks run) against the disk's own
# limit and qemu-storage-daemon, in one run: fio io_uring on the same payload
# bytes (the limit), QSD's luks export (aio=io_uring, cache.direct=on) and its
# plaintext raw export (what the vhost-user hop alone gives, without a cipher),
# cryptblk --direct inline and workers, and --cipher none (plaintext). 4K
# random read/write at QD32 and QD1, 1M sequential read/write at QD4, two
# queues (two fio jobs). The image is written in full before measuring
# (unwritten extents would read as zeros without touching the disk).
# Knobs as integration/compare.sh (SIZE, RUNTIME, ROUNDS, WORK_PARENT, KEEP).
set -euo pipefail
export DIRECT=1 QD1=1
export TARGETS=${TARGETS:-"fio qsd-luks qsd-raw cryptblk-xts cryptblk-workers cryptblk-none"}
export SIZE=${SIZE:-2G}
exec bash "$(dirname "$0")/compare.sh"
