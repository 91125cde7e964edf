#!/usr/bin/env bash
# The size of a depro binary: where its bytes go, and whether it fits.
#
#   packaging/size.sh BINARY [N]
#       the ELF sections that ship, the N (default 12) crates with the most
#       bytes of code and data, and the N largest symbols. BINARY must still
#       have its symbol table: packaging/build.sh keeps one of each build as
#       target/<target>/release/depro.symbols. Symbols of the C parts (musl,
#       ring's assembly, libunwind) count as "C (ring+musl)".
#   packaging/size.sh --check [--manifest FILE] SHIPPED SYMBOLS
#       fails (exit 1, one line) when SHIPPED, the stripped binary, is over
#       the budget, Cargo.toml's max-binary-bytes (or FILE's), naming the
#       toolchain that built it (read from the binary) and its largest crates.
set -euo pipefail
die() { echo "packaging/size.sh: $*" >&2; exit 1; }

symbols_of() {
  local binary=$1 nm_tool=nm
  case "$(file -b "$binary")" in
    *aarch64*) nm_tool=aarch64-linux-gnu-nm ;;
    *ARM,*) nm_tool=arm-linux-gnueabihf-nm ;;
  esac
  command -v "$nm_tool" >/dev/null || nm_tool=nm
  "$nm_tool" --size-sort --print-size --radix=d --demangle "$binary" 2>/dev/null || true
}

# The crate of a demangled symbol: the first path segment, looking through
# "<", "&", "impl " and "dyn " (so `<depro::tree::Tree>::parse` is depro's and
# `<&mut serde_json::de::Deserializer<..> as ..>::..` serde_json's).
by_crate() {
  awk '$3 !~ /^[bB]$/ {
    size = $2 + 0
    name = $0; sub(/^[^ ]+ [^ ]+ [^ ]+ /, "", name)
    while (name ~ /^(<|&|mut |impl |dyn |\()/) sub(/^(<|&|mut |impl |dyn |\()/, "", name)
    if (match(name, /^[A-Za-z_][A-Za-z0-9_]*::/)) crate = substr(name, 1, RLENGTH - 2)
    else crate = "C (ring+musl)"
    total[crate] += size
  }
  END { for (c in total) printf "%d %s\n", total[c], c }' | sort -rn
}

if [ "${1:-}" = --check ]; then
  shift
  manifest=$(dirname "$0")/../Cargo.toml
  if [ "${1:-}" = --manifest ]; then manifest=${2:?--manifest FILE}; shift 2; fi
  shipped=${1:?usage: packaging/size.sh --check [--manifest FILE] SHIPPED SYMBOLS}
  symbols=${2:?usage: packaging/size.sh --check [--manifest FILE] SHIPPED SYMBOLS}
  budget=$(sed -n 's/^max-binary-bytes = \([0-9][0-9]*\).*/\1/p' "$manifest")
  [ -n "$budget" ] || die "$manifest has no max-binary-bytes = N (under [package.metadata.depro])"
  size=$(stat -c %s "$shipped") || die "$shipped: no such file"
  [ "$size" -le "$budget" ] && exit 0
  toolchain=$(readelf -p .comment "$shipped" 2>/dev/null | sed -n 's/.*\(rustc version [^)]*)\).*/\1/p' | head -n1)
  largest=$(symbols_of "$symbols" | by_crate | head -n 8 \
    | awk '{ printf "%s%s %d KB", (NR > 1 ? ", " : ""), substr($0, index($0, " ") + 1), ($1 + 512) / 1024 }')
  die "$shipped is $size bytes, over the budget of $budget ($manifest, max-binary-bytes), built by ${toolchain:-an unknown rustc}; the largest contributors: ${largest:-unknown ($symbols has no symbols)}; packaging/size.sh $symbols says more, docs/benchmarks.md (Binary size) what was trimmed before"
fi

binary=${1:?usage: packaging/size.sh BINARY [N] | --check [--manifest FILE] SHIPPED SYMBOLS}
top=${2:-12}
[ -f "$binary" ] || die "$binary: no such file"
symbols=$(symbols_of "$binary")
[ -n "$symbols" ] || die "$binary has no symbol table (stripped?)"

echo "== sections that ship (bytes)"
size -A "$binary" | awk '$1 ~ /^\./ && $1 !~ /^\.(debug|comment|symtab|strtab)/ && $2 > 4096 { printf "%10d %s\n", $2, $1 }' | sort -rn
echo "== crates, by bytes of code and data (symbols only; the rest is unnamed data and padding)"
echo "$symbols" | by_crate | head -n "$top" | awk '{ printf "%10d %s\n", $1, substr($0, index($0, " ") + 1) }'
echo "== largest symbols"
echo "$symbols" | awk '$3 !~ /^[bB]$/' | sort -k2,2nr | head -n "$top" \
  | awk '{ size = $2 + 0; name = $0; sub(/^[^ ]+ [^ ]+ [^ ]+ /, "", name); printf "%10d %s\n", size, substr(name, 1, 110) }'
