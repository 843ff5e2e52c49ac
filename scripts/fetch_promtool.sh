#!/usr/bin/env bash
# Print the path of a promtool binary, fetching it first when needed, without root:
# `apt-get download` the Debian `prometheus` package into a cache directory and extract only
# promtool with `dpkg-deb -x` (nothing is installed system-wide).
#
#   scripts/fetch_promtool.sh            # -> ~/.cache/cxr/promtool/usr/bin/promtool (prints the path)
#   PROMTOOL=/usr/bin/promtool scripts/fetch_promtool.sh   # use an existing binary
#   CXR_TOOLS_CACHE=/somewhere scripts/fetch_promtool.sh   # cache elsewhere
#
# Exit status 3 means "cannot fetch here" (no apt-get/dpkg-deb, or the download failed):
# tests skip on 3 with the reason printed on stderr, and fail on anything else.
set -euo pipefail

if [[ -n "${PROMTOOL:-}" ]]; then
  [[ -x "$PROMTOOL" ]] || { echo "PROMTOOL=$PROMTOOL is not executable" >&2; exit 1; }
  echo "$PROMTOOL"; exit 0
fi
if command -v promtool >/dev/null 2>&1; then
  command -v promtool; exit 0
fi

cache="${CXR_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cxr}/promtool"
bin="$cache/usr/bin/promtool"
if [[ -x "$bin" ]]; then
  echo "$bin"; exit 0
fi

for tool in apt-get dpkg-deb; do
  command -v "$tool" >/dev/null 2>&1 || { echo "fetch_promtool: $tool not found (not a Debian/Ubuntu host)" >&2; exit 3; }
done

mkdir -p "$cache"
work="$(mktemp -d "$cache/download.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# apt-get download needs no root; it writes the .deb into the current directory.
if ! (cd "$work" && apt-get download -qq prometheus >/dev/null 2>"$work/apt.err"); then
  echo "fetch_promtool: apt-get download prometheus failed: $(tail -n 3 "$work/apt.err")" >&2
  exit 3
fi
deb="$(ls "$work"/prometheus_*.deb)"
dpkg-deb -x "$deb" "$work/x"
mkdir -p "$cache/usr/bin"
mv "$work/x/usr/bin/promtool" "$bin.tmp" && mv "$bin.tmp" "$bin"
"$bin" --version >/dev/null
echo "$bin"
