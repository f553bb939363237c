#!/usr/bin/env bash
# Lays out an installed tidepool the way C and C++ programs consume a library:
#   PREFIX/include/tidepool/tidepool.h
#   PREFIX/lib/libtidepool.so.1        (the library, named by its soname)
#   PREFIX/lib/libtidepool.so          (-> libtidepool.so.1, for -ltidepool)
#   PREFIX/lib/pkgconfig/tidepool.pc   (cc prog.c $(pkg-config --cflags --libs tidepool), where
#                                      prog.c includes <tidepool/tidepool.h>)
# tools/install builds the library and calls this; the install test and the GPU bundle call it
# with the library Bazel built.
#
#   tools/install_layout.sh LIBRARY HEADER PC_TEMPLATE PREFIX
set -euo pipefail
if [ $# -ne 4 ]; then
  echo "usage: $0 LIBRARY HEADER PC_TEMPLATE PREFIX" >&2
  exit 2
fi
library="$1" header="$2" template="$3" prefix="$4"
mkdir -p "$prefix/include/tidepool" "$prefix/lib/pkgconfig"
prefix="$(cd "$prefix" && pwd)"
install -m 644 "$header" "$prefix/include/tidepool/tidepool.h"
install -m 755 "$library" "$prefix/lib/libtidepool.so.1"
ln -sfn libtidepool.so.1 "$prefix/lib/libtidepool.so"
# The package's version is the header's API version.
version="$(sed -n 's/^#define TIDEPOOL_API_VERSION \([0-9]*\)$/\1/p' "$header")"
if [ -z "$version" ]; then
  echo "install_layout: no TIDEPOOL_API_VERSION in $header" >&2
  exit 1
fi
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" "$template" \
  >"$prefix/lib/pkgconfig/tidepool.pc"
