# The guest's initramfs: busybox-static as the userland, e2fsprogs' mke2fs and
# e2fsck (busybox has no fsck and its mke2fs makes only ext2), cryptsetup and
# util-linux's blkdiscard (busybox's cannot zero) copied from the host with their shared libraries, the guest modules, the init script,
# /e2e/lib.sh (guest/lib.sh: helpers for the guest tests) and /e2e, which the
# caller fills with the test (/e2e/test.sh, which init runs) and its data.
# Kept uncompressed: gunzip alone costs ~3 s under TCG.
# Sourced after integration/lib.sh and guest/kernel.sh.
# shellcheck shell=bash

GUEST_HOST_TOOLS=(/usr/sbin/mke2fs /usr/sbin/e2fsck /usr/sbin/cryptsetup /usr/sbin/blkdiscard)

# guest_initramfs_stage DIR: lays out everything except the /e2e payload.
guest_initramfs_stage() {
  local root=$1 applet bb tool
  need_tools busybox ldd cpio
  rm -rf "$root"
  mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,mnt,run/cryptsetup,e2e}
  bb=$(command -v busybox)
  copy_with_libs "$bb" "$root" /bin/busybox
  for applet in $("$bb" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
  done
  for tool in "${GUEST_HOST_TOOLS[@]}"; do
    [ -x "$tool" ] || die "$tool not found (run: sudo bash integration/install-deps.sh)"
    copy_with_libs "$tool" "$root" "/sbin/$(basename "$tool")"
  done
  [ ! -f /etc/mke2fs.conf ] || cp /etc/mke2fs.conf "$root/etc/"
  ln -s /proc/mounts "$root/etc/mtab"
  cp -a "$GUEST_MODROOT/lib" "$root/"
  printf '%s\n' "${GUEST_MODULES[@]}" >"$root/e2e/modules"
  install -m 755 "$INTEGRATION_DIR/guest/init" "$root/init"
  install -m 644 "$INTEGRATION_DIR/guest/lib.sh" "$root/e2e/lib.sh"
}

# guest_conf FILE NAME...: FILE (the guest's /e2e/conf) sets each shell
# variable NAME to its value here.
guest_conf() {
  local file=$1 name
  shift
  for name in "$@"; do
    printf '%s=%s\n' "$name" "${!name}"
  done >"$file"
}

# copy_with_libs BINARY ROOT DEST: copies BINARY to ROOT/DEST and the shared
# libraries it needs (if any) to the same paths under ROOT.
copy_with_libs() {
  local bin=$1 root=$2 dest=$3 lib
  mkdir -p "$root/$(dirname "$dest")"
  cp -L "$bin" "$root/$dest"
  # ldd fails on static binaries: then there is nothing more to copy.
  for lib in $(ldd "$bin" 2>/dev/null | grep -o '/[^ ]*' || true); do
    [ -e "$root/$lib" ] && continue
    mkdir -p "$root/$(dirname "$lib")"
    cp -L "$lib" "$root/$lib"
  done
}

# guest_initramfs_pack DIR OUT: an uncompressed newc archive, owned by root.
guest_initramfs_pack() {
  local root=$1 out=$2
  (cd "$root" && find . -mindepth 1 -print0 | sort -z |
    cpio --null --quiet -o -H newc -R 0:0) >"$out" ||
    die "cpio failed to pack $root"
}
