#!/usr/bin/env bash
# Builds what depro ships, under dist/, for three architectures:
#   depro-<version>-x86_64-unknown-linux-musl        fully static, stripped, with TLS
#   depro-<version>-aarch64-unknown-linux-musl       the same for 64-bit ARM
#   depro-<version>-armv7-unknown-linux-musleabihf   the same for 32-bit ARM (hard-float)
#   depro_<version>_amd64.deb, _arm64.deb, _armhf.deb   from those binaries (cargo-deb)
#   depro-<version>.x86_64.rpm, .aarch64.rpm            (cargo-generate-rpm)
# On a fresh Debian bookworm machine it installs what it needs first.
# DEPRO_TARGETS="x86_64-unknown-linux-musl" (say) builds only those targets.
#
# The static build follows the recipe that works on Debian bookworm, where
# rustup's toolchains have no musl std (and cannot download one): Debian's
# rustc-web/cargo-web with rust-web-src build std for musl (-Zbuild-std), a
# musl-linking gcc links it non-PIE (-C relocation-model=static, so no ELF
# interpreter), and std's unwinder comes from a libunwind.a made here:
# - x86_64: musl-gcc (musl-tools); LLVM's libunwind.a plus a one-function
#   shim for the glibc-only __fprintf_chk it references.
# - aarch64, armv7: Debian's cross gcc with the musl-gcc.specs that the
#   multiarch musl-dev:arm64/armhf package ships; the cross gcc's
#   libgcc_eh.a plus a shim for glibc's _dl_find_object ("not found": depro
#   is built with panic=abort and never unwinds).
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
die() { echo "packaging/build.sh: $*" >&2; exit 1; }
step() { echo "==> $*" >&2; }
read -r -a targets <<<"${DEPRO_TARGETS:-x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf}"
# Each binary's budget, stripped: Cargo.toml's [package.metadata.depro]
# max-binary-bytes, which packaging/size.sh checks and tests/packaging.rs reads.
max_size=$(sed -n 's/^max-binary-bytes = \([0-9][0-9]*\).*/\1/p' Cargo.toml)
[ -n "$max_size" ] || die "Cargo.toml has no max-binary-bytes = N under [package.metadata.depro]"

# Per target: cross gcc prefix, Debian architecture (.deb), rpm architecture
# ("-" for none), multiarch musl directory, the qemu-user that runs it here.
target_facts() {
  case "$1" in
    x86_64-unknown-linux-musl) echo "- amd64 x86_64 x86_64-linux-musl -" ;;
    aarch64-unknown-linux-musl) echo "aarch64-linux-gnu arm64 aarch64 aarch64-linux-musl qemu-aarch64-static" ;;
    armv7-unknown-linux-musleabihf) echo "arm-linux-gnueabihf armhf - arm-linux-musleabihf qemu-arm-static" ;;
    *) die "unknown target $1 (x86_64-unknown-linux-musl, aarch64-unknown-linux-musl, armv7-unknown-linux-musleabihf)" ;;
  esac
}

# ---- tools
debs=(rustc-web cargo-web rust-web-src musl-tools libunwind-16-dev gcc binutils rpm file)
foreign=()
for target in "${targets[@]}"; do
  read -r cross debarch _ _ _ <<<"$(target_facts "$target")"
  [ "$cross" = - ] && continue
  debs+=("gcc-$cross" "musl-dev:$debarch" qemu-user-static)
  foreign+=("$debarch")
done
missing=()
for p in "${debs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  added=0
  for arch in "${foreign[@]}"; do
    if ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
      dpkg --add-architecture "$arch" && added=1
    fi
  done
  # A mirror in the middle of a sync can fail one index: what the
  # install needs usually came through, so the install decides.
  if [ "$added" = 1 ]; then apt-get update -qq >&2 || true; fi
  installed=0
  for attempt in 1 2 3; do
    if apt-get install -y -qq "${missing[@]}" >&2; then installed=1; break; fi
    # Stale indexes: read them again. A second failure may be a mirror in
    # the middle of a sync (an index that does not match its Release file
    # for a minute or so): wait, then read them once more.
    case "$attempt" in
      1) apt-get update -qq >&2 || true ;;
      2) sleep 20; apt-get update -qq >&2 || true ;;
    esac
  done
  [ "$installed" = 1 ] \
    || die "could not install ${missing[*]} with apt-get; they are Debian bookworm packages (rustc-web, cargo-web and rust-web-src carry a Rust with std's sources; musl-tools gives musl-gcc; libunwind-16-dev gives libunwind.a; gcc-aarch64-linux-gnu and gcc-arm-linux-gnueabihf are the cross compilers; musl-dev:arm64 and musl-dev:armhf need 'dpkg --add-architecture arm64 armhf'; qemu-user-static runs the ARM builds)"
fi
for tool in cargo-deb:cargo-deb cargo-generate-rpm:cargo-generate-rpm; do
  command -v "${tool%%:*}" >/dev/null 2>&1 && continue
  step "installing ${tool#*:} (cargo install --locked)"
  cargo install --locked --quiet "${tool#*:}" || die "cargo install ${tool#*:} failed"
done

debian_rustc=/usr/bin/rustc
debian_cargo=/usr/bin/cargo
[ -x "$debian_rustc" ] && [ -x "$debian_cargo" ] || die "Debian's rustc/cargo (rustc-web, cargo-web) are not at /usr/bin"
export RUSTC_BOOTSTRAP=1 RUSTC=$debian_rustc

# ---- the linker and the unwinder of one target, under target/musl-shim/<target>
prepare_target() {
  local target=$1 cross=$2 musl_dir=$3 shim=target/musl-shim/$1
  mkdir -p "$shim"
  if [ "$cross" = - ]; then
    local libunwind=/usr/lib/llvm-16/lib/libunwind.a
    [ -f "$libunwind" ] || die "$libunwind is missing (package libunwind-16-dev)"
    cat >"$shim/shim.c" <<'C'
#include <stdarg.h>
#include <stdio.h>
/* glibc's fortified fprintf, referenced by LLVM's libunwind.a; musl has none. */
int __fprintf_chk(FILE *stream, int flag, const char *format, ...) {
    (void)flag;
    va_list args;
    va_start(args, format);
    int written = vfprintf(stream, format, args);
    va_end(args);
    return written;
}
C
    musl-gcc -O2 -c "$shim/shim.c" -o "$shim/shim.o"
    cp "$libunwind" "$shim/libunwind.a"
    echo musl-gcc >"$shim/linker-name"
  else
    local specs=/usr/lib/$musl_dir/musl-gcc.specs
    [ -f "$specs" ] || die "$specs is missing (package musl-dev for $target's architecture)"
    command -v "$cross-gcc" >/dev/null || die "$cross-gcc is missing (package gcc-$cross)"
    cat >"$shim/cc" <<SH
#!/bin/sh
# $cross-gcc linking against musl: the specs of Debian's musl-dev for it.
exec $cross-gcc -specs $specs "\$@"
SH
    chmod +x "$shim/cc"
    cat >"$shim/shim.c" <<'C'
/* glibc's _dl_find_object, referenced by the cross gcc's libgcc_eh.a (built
   for glibc); musl has none. "Not found" leaves the unwinder without frame
   info, which depro never needs: it is built with panic=abort. */
struct dl_find_object;
int _dl_find_object(void *address, struct dl_find_object *result) {
    (void)address;
    (void)result;
    return -1;
}
C
    "$shim/cc" -O2 -c "$shim/shim.c" -o "$shim/shim.o"
    local libgcc_eh
    libgcc_eh=$("$cross-gcc" -print-file-name=libgcc_eh.a)
    [ -f "$libgcc_eh" ] || die "$cross-gcc has no libgcc_eh.a"
    cp "$libgcc_eh" "$shim/libunwind.a"
    echo "$PWD/$shim/cc" >"$shim/linker-name"
  fi
  local ar=ar
  [ "$cross" = - ] || ar=$cross-ar
  "$ar" rs "$shim/libunwind.a" "$shim/shim.o" 2>/dev/null
}

# ---- one static binary
build_target() {
  local target=$1 cross=$2 musl_dir=$3 qemu=$4
  prepare_target "$target" "$cross" "$musl_dir"
  local shim=target/musl-shim/$target upper linker ar=ar
  upper=$(echo "$target" | tr 'a-z-' 'A-Z_')
  linker=$(cat "$shim/linker-name")
  [ "$cross" = - ] || ar=$cross-ar
  step "building depro $version for $target ($toolchain)"
  # Size (docs/benchmarks.md, "Binary size", has the measures): std without
  # its backtrace symbolizer and with its optimize_for_size algorithms
  # (-Zbuild-std-features), and no unwind tables (panic=abort never
  # unwinds). The symbols stay until after the build, for packaging/bloat.sh.
  env "CARGO_TARGET_${upper}_LINKER=$linker" \
    "CARGO_TARGET_${upper}_RUSTFLAGS=-C relocation-model=static -C target-feature=+crt-static -C link-self-contained=no -C force-unwind-tables=no -L native=$PWD/$shim" \
    "CC_${target//-/_}=$linker" "AR_${target//-/_}=$ar" \
    CARGO_PROFILE_RELEASE_STRIP=false \
    "$debian_cargo" build --release --locked --quiet \
    -Zbuild-std=std,panic_abort -Zbuild-std-features=optimize_for_size --target "$target" \
    || die "the $target build failed (see above)"
  local binary=target/$target/release/depro strip=strip
  [ "$cross" = - ] || strip=$cross-strip
  # (A build cargo found up to date left the stripped binary of the last
  # one, and its .symbols, in place.)
  if file "$binary" | grep -q "not stripped"; then
    cp "$binary" "$binary.symbols"
    "$strip" "$binary"
  fi
  if file "$binary" | grep -q "dynamically linked"; then
    die "$binary is dynamically linked: $(file -b "$binary")"
  fi
  mkdir -p dist
  local static=dist/depro-$version-$target size
  cp "$binary" "$static.tmp" && mv -f "$static.tmp" "$static"
  size=$(stat -c %s "$static")
  packaging/size.sh --check "$static" "$binary.symbols" || exit 1
  sizes+=("$target $size")
  # It runs (an ARM build under qemu-user).
  local runner=() runs
  [ "$qemu" = - ] || runner=("$qemu")
  runs=$("${runner[@]}" "$static" --version 2>&1) \
    || die "$static does not run (${runner[*]:-natively}): $runs"
  step "$static: $(file -b "$static" | cut -d, -f1-4), $size bytes; --version: $runs"
}

toolchain="Debian's $("$debian_rustc" --version | cut -d' ' -f1-2) (rustc-web $(dpkg-query -W -f '${Version}' rustc-web 2>/dev/null || echo '?'))"
sizes=()

for target in "${targets[@]}"; do
  read -r cross _ _ musl_dir qemu <<<"$(target_facts "$target")"
  build_target "$target" "$cross" "$musl_dir" "$qemu"
done

# ---- packages
step "packaging"
for target in "${targets[@]}"; do
  read -r _ debarch rpmarch _ _ <<<"$(target_facts "$target")"
  cargo deb --no-build --no-strip --target "$target" --output "dist/depro_${version}_${debarch}.deb" >/dev/null \
    || die "cargo deb failed for $target"
  if [ "$rpmarch" != - ]; then
    cargo generate-rpm --target "$target" --arch "$rpmarch" --output "dist/depro-$version.$rpmarch.rpm" \
      || die "cargo generate-rpm failed for $target"
  fi
done
ls -l dist >&2
step "built by $toolchain; each static binary's size, stripped, against the budget of $max_size bytes:"
for entry in "${sizes[@]}"; do
  read -r target size <<<"$entry"
  printf '    %-32s %8d bytes  %3d%% of the budget, %d KB left\n' \
    "$target" "$size" $((size * 100 / max_size)) $(((max_size - size) / 1024)) >&2
done
