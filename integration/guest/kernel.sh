# The guest kernel: Debian's packaged kernel, fetched with `apt-get download`
# (never installed), booted as an uncompressed ELF vmlinux through its PVH entry
# because the bzImage decompressor alone takes > 100 s under TCG.
# Sourced after integration/lib.sh.
# shellcheck shell=bash

# Modules the guest loads (busybox modprobe pulls in their dependencies). The
# guest has no udev and no kmod aliases, so the kernel cannot load on demand
# what ext4 (crc32c) and dm-crypt (xts over ecb(aes); algif_skcipher for
# cryptsetup's key-slot decryption) ask for: load it all up front.
GUEST_MODULES=(virtio_pci virtio_blk crc32c_generic ext4 dm_crypt ecb xts algif_skcipher)

# Sets GUEST_KVER, GUEST_VMLINUX and GUEST_MODROOT (a tree holding
# lib/modules/KVER with only the modules above, their dependencies and a
# matching modules.dep). Cached in $WORK_DIR/kernel; the .deb is kept so that
# a changed module list does not download again.
guest_kernel_prepare() {
  local dir=$WORK_DIR/kernel
  local stamp=$dir/ready
  local want="modules: ${GUEST_MODULES[*]}"
  GUEST_VMLINUX=$dir/vmlinux
  GUEST_MODROOT=$dir/modroot
  if [ -f "$stamp" ] && [ "$(sed -n 2p "$stamp")" = "$want" ]; then
    GUEST_KVER=$(sed -n 1p "$stamp")
    return 0
  fi
  need_tools dpkg-deb busybox xz od
  mkdir -p "$dir"
  rm -f "$stamp"
  local deb
  deb=$(guest_kernel_deb "$dir")
  log "unpacking $(basename "$deb")"
  rm -rf "$dir/root" "$GUEST_MODROOT"
  dpkg-deb -x "$deb" "$dir/root"
  GUEST_KVER=$(basename "$(find "$dir/root/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -1)")
  [ -n "$GUEST_KVER" ] || die "no lib/modules/<version> in $deb"
  extract_vmlinux "$dir/root/boot/vmlinuz-$GUEST_KVER" "$GUEST_VMLINUX"
  busybox depmod -b "$dir/root" "$GUEST_KVER" ||
    die "busybox depmod failed on $dir/root"
  copy_module_closure "$dir/root/lib/modules/$GUEST_KVER" "$GUEST_MODROOT/lib/modules/$GUEST_KVER"
  rm -rf "$dir/root"
  printf '%s\n%s\n' "$GUEST_KVER" "$want" >"$stamp"
}

# Prints the path of the cached kernel .deb, downloading the one that Debian's
# linux-image-amd64 metapackage currently points to if none is cached.
guest_kernel_deb() {
  local dir=$1 deb pkg
  deb=$(find "$dir" -maxdepth 1 -name 'linux-image-*.deb' | head -1)
  if [ -n "$deb" ]; then
    echo "$deb"
    return 0
  fi
  need_tools apt-cache apt-get
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
  [ -n "$pkg" ] ||
    die "apt knows no linux-image-amd64 package (run: sudo bash integration/install-deps.sh, which runs apt-get update)"
  log "downloading $pkg"
  # As root, apt would try (and warn that it fails) to drop to _apt for the download.
  local sandbox=()
  [ "$(id -u)" != 0 ] || sandbox=(-o APT::Sandbox::User=root)
  (cd "$dir" && apt-get download -q "${sandbox[@]}" "$pkg" >&2) ||
    die "apt-get download $pkg failed (stale package lists? run: sudo apt-get update)"
  deb=$(find "$dir" -maxdepth 1 -name 'linux-image-*.deb' | head -1)
  [ -n "$deb" ] || die "apt-get download $pkg left no .deb in $dir"
  echo "$deb"
}

# Unpacks the ELF kernel from a bzImage using the boot-protocol header
# (setup_sects at 0x1f1, payload_offset/payload_length at 0x248/0x24c; the
# payload ends with the 4-byte uncompressed size, which we check).
extract_vmlinux() {
  local bz=$1 out=$2
  [ "$(od -An -c -j $((0x202)) -N4 "$bz" | tr -d ' ')" = HdrS ] ||
    die "$bz is not a bzImage (no HdrS header)"
  local setup_sects payload_off payload_len start magic size
  setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')
  read -r payload_off payload_len < <(od -An -tu4 -j $((0x248)) -N8 "$bz")
  start=$(((setup_sects + 1) * 512 + payload_off))
  magic=$(od -An -tx1 -j "$start" -N6 "$bz" | tr -d ' ')
  local decompress
  case $magic in
    fd377a585a00) decompress=(xz -dc --single-stream) ;;
    1f8b*) decompress=(gzip -dc) ;;
    28b52ffd*) decompress=(zstd -dc) ;;
    *) die "unknown kernel payload compression (magic $magic) in $bz" ;;
  esac
  need_tools "${decompress[0]}"
  # The size check below catches any failure here; a pipe status would only
  # add noise (tail gets SIGPIPE when head is done).
  tail -c +$((start + 1)) "$bz" | head -c "$payload_len" | "${decompress[@]}" >"$out.tmp" 2>/dev/null || true
  size=$(od -An -tu4 -j $((start + payload_len - 4)) -N4 "$bz" | tr -d ' ')
  [ "$(stat -c %s "$out.tmp")" = "$size" ] ||
    die "extracted vmlinux is $(stat -c %s "$out.tmp") bytes, the bzImage says $size"
  [ "$(od -An -c -N4 "$out.tmp" | tr -d ' ')" = '177ELF' ] || die "extracted kernel from $bz is not an ELF file"
  mv "$out.tmp" "$out"
}

# Copies GUEST_MODULES and everything they depend on (modules.dep lists the
# full closure) from SRC to DST and writes a modules.dep restricted to them.
copy_module_closure() {
  local src=$1 dst=$2 name line files=() f
  mkdir -p "$dst"
  for name in "${GUEST_MODULES[@]}"; do
    # Module names treat '-' and '_' alike; file names use either.
    line=$(awk -v want="$name" '{
        f = $1; sub(/:$/, "", f); n = f; sub(/.*\//, "", n); sub(/\.ko$/, "", n)
        gsub(/-/, "_", n); w = want; gsub(/-/, "_", w)
        if (n == w) { print; exit }
      }' "$src/modules.dep")
    [ -n "$line" ] || die "module $name is not in $src/modules.dep (built in? then drop it from GUEST_MODULES)"
    for f in $line; do files+=("${f%:}"); done
  done
  for f in $(printf '%s\n' "${files[@]}" | sort -u); do
    mkdir -p "$dst/$(dirname "$f")"
    cp "$src/$f" "$dst/$f"
  done
  # Keep only the lines of copied modules (their dependencies are copied too).
  printf '%s:\n' "${files[@]}" | sort -u >"$dst/.keep"
  awk 'NR == FNR { keep[$1] = 1; next } keep[$1]' "$dst/.keep" "$src/modules.dep" >"$dst/modules.dep"
  rm -f "$dst/.keep"
  cp "$src/modules.builtin" "$dst/"
}
