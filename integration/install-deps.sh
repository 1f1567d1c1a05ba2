#!/usr/bin/env bash
# Installs the host tools the tests use as oracles and peers: cryptsetup (LUKS and
# plain-mode reference), qemu-img / qemu-storage-daemon (LUKS1 images and the
# comparison backend), qemu-system-x86 (end-to-end guest), busybox-static and a
# Debian kernel package (the guest itself), strace and losetup (observers for the
# durability and sandbox tests), libnbd/nbdkit (NBD images) and Ceph (a single-node
# cluster for RBD images, integration/ceph.sh). Idempotent; needs root (apt-get).
set -euo pipefail

need=()
command -v cryptsetup >/dev/null || need+=(cryptsetup-bin)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx insmod || need+=(busybox-static)
command -v pkg-config >/dev/null || need+=(pkg-config)
dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)
command -v cpio >/dev/null || need+=(cpio)
# The end-to-end guest: mke2fs/e2fsck go into the guest, debugfs/e2fsck read the
# decrypted image on the host; the guest kernel's payload is xz-compressed.
command -v debugfs >/dev/null || need+=(e2fsprogs)
command -v xz >/dev/null || need+=(xz-utils)
# integration/compare.sh reads the bench's --json output.
command -v jq >/dev/null || need+=(jq)
# integration/direct.sh measures the disk's own limit with fio.
command -v fio >/dev/null || need+=(fio)
# tests/systemd.rs: systemd-analyze verify/security/syscall-filter, systemd-socket-activate;
# strace: tests/systemd.rs lists the system calls the daemon makes, tests/durability.rs and
# tests/sandbox.rs watch them.
command -v systemd-socket-activate >/dev/null || need+=(systemd)
command -v strace >/dev/null || need+=(strace)
# tests/durability.rs puts an image on a loop device of its own.
command -v losetup >/dev/null || need+=(mount)
# tests/keyring.rs: keyctl session/padd/search for --key-keyring.
command -v keyctl >/dev/null || need+=(keyutils)
# tests/docs.rs: the README's libvirt domain through virt-xml-validate (libvirt0 ships the
# schemas; xmllint does the validating).
command -v virt-xml-validate >/dev/null || need+=(libvirt-clients)
command -v xmllint >/dev/null || need+=(libxml2-utils)
# NBD images (--image nbd://...): libnbd0 is loaded at run time (dlopen); nbdkit is the
# test server (memory, file, error and delay filters), nbdcopy reads an export raw for
# the ciphertext checks, libnbd-dev's libnbd.h is what crates/core/src/store/libnbd.rs is checked
# against (its test the_table_matches_libnbd_h).
[ -e /usr/lib/x86_64-linux-gnu/libnbd.so.0 ] || ldconfig -p | grep -q 'libnbd\.so\.0 ' || need+=(libnbd0)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v nbdcopy >/dev/null || need+=(libnbd-bin)
[ -e /usr/include/libnbd.h ] || need+=(libnbd-dev)
# tests/nbd.rs's X.509 TLS tests make a throwaway CA and certificates with openssl.
command -v openssl >/dev/null || need+=(openssl)
# integration/qmp.py (e2e-migrate.sh drives QEMU's migration through QMP), the fuzz seeds
# and tests/support/hostile_nbd.py (the hostile NBD server of tests/nbd.rs).
command -v python3 >/dev/null || need+=(python3)
# Ceph RBD images (--image rbd:...): librbd1/librados2 are loaded at run time (dlopen);
# integration/ceph.sh starts a single-node test cluster from ceph-mon and ceph-osd
# (ceph-common: the ceph and rbd tools, ceph-authtool, monmaptool); librbd-dev's librbd.h
# and librados.h are what crates/core/src/store/librbd.rs is checked against.
command -v ceph-mon >/dev/null || need+=(ceph-mon)
command -v ceph-osd >/dev/null || need+=(ceph-osd)
command -v rbd >/dev/null || need+=(ceph-common)
[ -e /usr/include/rbd/librbd.h ] || need+=(librbd-dev)
# tests/rbd.rs reads and writes through librbd's own encryption with its Python binding.
/usr/bin/python3 -c 'import rbd' 2>/dev/null || need+=(python3-rbd)

# qemu-system-x86 must come from bookworm-backports: plain bookworm's 7.2 would
# replace the preinstalled qemu-utils 10.0.
backports=/etc/apt/sources.list.d/cryptblk-backports.sources
# QEMU's rbd driver (qemu-block-extra: e2e-qemu.sh's RBD run, integration/rbd.sh) must
# match QEMU's version, so it comes from there too.
if ! command -v qemu-system-x86_64 >/dev/null || ! command -v qemu-storage-daemon >/dev/null ||
  [ ! -e /usr/lib/x86_64-linux-gnu/qemu/block-rbd.so ]; then
  if [ ! -f "$backports" ] && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    uri=${uri:-http://deb.debian.org/debian}
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" >"$backports"
  fi
  qemu=1
fi

# integration/e2e-qemu.sh runs `apt-get download` on the kernel that
# linux-image-amd64 points to: that needs current package lists.
apt-cache show linux-image-amd64 >/dev/null 2>&1 || lists=1

if [ ${#need[@]} -gt 0 ] || [ -n "${qemu:-}" ] || [ -n "${lists:-}" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  [ ${#need[@]} -eq 0 ] || apt-get install -y -qq --no-install-recommends "${need[@]}"
  if [ -n "${qemu:-}" ]; then
    apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils qemu-block-extra
  fi
fi
echo "install-deps: cryptsetup $(cryptsetup --version | awk '{print $2}'), $(qemu-system-x86_64 --version | head -1), ceph $(ceph --version | awk '{print $3}')"
