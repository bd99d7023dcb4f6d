#!/usr/bin/env bash
# Refreshes the dashboard's chart library, uPlot, vendored in zdproxy/admin/ui/vendor/:
# dist/uPlot.iife.min.js, dist/uPlot.min.css and LICENSE of the pinned version, taken
# from its npm tarball with npm itself (`npm pack`). The tarball's sha512 must match
# both the registry's metadata (dist.integrity) and the pin below: a tarball the
# registry serves differently from the day it was pinned is refused.
#
#   tools/refresh-uplot.sh                       # the pinned version, again
#   tools/refresh-uplot.sh 1.6.33 sha512-...     # move the pin (then edit VERSION and
#                                                # INTEGRITY below to the same values)
#
# Needs npm and python3. Writes only the three vendored files.
set -euo pipefail

VERSION="${1:-1.6.32}"
INTEGRITY="${2:-sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw==}"
VENDOR="$(cd "$(dirname "$0")/.." && pwd)/zdproxy/admin/ui/vendor"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

published="$(npm view "uplot@$VERSION" dist.integrity)"
if [ "$published" != "$INTEGRITY" ]; then
	echo "uplot@$VERSION: the registry's integrity is $published, the pin $INTEGRITY" >&2
	exit 1
fi
tarball="$(cd "$work" && npm pack --silent "uplot@$VERSION")"
actual="$(python3 -c 'import base64, hashlib, sys
digest = hashlib.sha512(open(sys.argv[1], "rb").read()).digest()
print("sha512-" + base64.b64encode(digest).decode())' "$work/$tarball")"
if [ "$actual" != "$INTEGRITY" ]; then
	echo "uplot@$VERSION: the tarball's sha512 is $actual, the pin $INTEGRITY" >&2
	exit 1
fi
tar -xzf "$work/$tarball" -C "$work" package/dist/uPlot.iife.min.js \
	package/dist/uPlot.min.css package/LICENSE
install -m 0644 "$work/package/dist/uPlot.iife.min.js" "$work/package/dist/uPlot.min.css" \
	"$VENDOR/"
install -m 0644 "$work/package/LICENSE" "$VENDOR/LICENSE"
echo "uplot@$VERSION ($INTEGRITY) -> $VENDOR"
