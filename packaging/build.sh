#!/usr/bin/env bash
# Builds what depro ships, under dist/:
#   depro-<version>-x86_64-unknown-linux-musl   fully static, stripped, with TLS
#   depro_<version>_amd64.deb                   from that binary (cargo-deb)
#   depro-<version>.x86_64.rpm                  from that binary (cargo-generate-rpm)
# On a fresh Debian/Ubuntu machine it installs what it needs first.
#
# The static build follows the recipe that works on Debian bookworm, where
# rustup's toolchains have no musl std: Debian's rustc-web/cargo-web with
# rust-web-src build std for musl (-Zbuild-std), musl-gcc links it non-PIE
# (-C relocation-model=static, so no ELF interpreter), and std's unwinder
# comes from LLVM's libunwind.a plus a one-function shim for the glibc-only
# __fprintf_chk it references.
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-musl
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
die() { echo "packaging/build.sh: $*" >&2; exit 1; }
step() { echo "==> $*" >&2; }

# ---- tools
debs=(rustc-web cargo-web rust-web-src musl-tools libunwind-16-dev gcc binutils rpm file)
missing=()
for p in "${debs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${missing[@]}" >&2 \
    || { apt-get update -qq >&2 && apt-get install -y -qq "${missing[@]}" >&2; } \
    || die "could not install ${missing[*]} with apt-get; they are Debian bookworm packages (rustc-web, cargo-web and rust-web-src carry a Rust with std's sources; musl-tools gives musl-gcc; libunwind-16-dev gives libunwind.a)"
fi
for tool in cargo-deb:cargo-deb cargo-generate-rpm:cargo-generate-rpm; do
  command -v "${tool%%:*}" >/dev/null 2>&1 && continue
  step "installing ${tool#*:} (cargo install --locked)"
  cargo install --locked --quiet "${tool#*:}" || die "cargo install ${tool#*:} failed"
done

debian_rustc=/usr/bin/rustc
debian_cargo=/usr/bin/cargo
[ -x "$debian_rustc" ] && [ -x "$debian_cargo" ] || die "Debian's rustc/cargo (rustc-web, cargo-web) are not at /usr/bin"
libunwind=/usr/lib/llvm-16/lib/libunwind.a
[ -f "$libunwind" ] || die "$libunwind is missing (package libunwind-16-dev)"

# ---- the unwinder, completed for musl
shim=target/musl-shim
mkdir -p "$shim"
cat >"$shim/fprintf_chk.c" <<'C'
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
musl-gcc -O2 -c "$shim/fprintf_chk.c" -o "$shim/fprintf_chk.o"
cp "$libunwind" "$shim/libunwind.a"
ar rs "$shim/libunwind.a" "$shim/fprintf_chk.o" 2>/dev/null

# ---- the static binary
step "building depro $version for $target (Debian's $("$debian_rustc" --version))"
export RUSTC_BOOTSTRAP=1 RUSTC=$debian_rustc
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_LINKER=musl-gcc
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="-C relocation-model=static -C target-feature=+crt-static -C link-self-contained=no -L native=$PWD/$shim"
"$debian_cargo" build --release --locked --quiet \
  -Zbuild-std=std,panic_abort --target "$target" \
  || die "the musl build failed (see above)"
binary=target/$target/release/depro
strip "$binary"
if file "$binary" | grep -q "dynamically linked"; then
  die "$binary is dynamically linked: $(file -b "$binary")"
fi

mkdir -p dist
static=dist/depro-$version-$target
cp "$binary" "$static.tmp" && mv -f "$static.tmp" "$static"
size=$(stat -c %s "$static")
[ "$size" -le $((2500 * 1024)) ] || die "$static is $size bytes, over the 2.5 MB budget"
step "$static: $(file -b "$static" | cut -d, -f1-4), $size bytes"

# ---- packages
step "packaging"
cargo deb --no-build --no-strip --target "$target" --output "dist/depro_${version}_amd64.deb" >/dev/null \
  || die "cargo deb failed"
cargo generate-rpm --target "$target" --output "dist/depro-$version.x86_64.rpm" \
  || die "cargo generate-rpm failed"
ls -l dist >&2
