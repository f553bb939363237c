#!/usr/bin/env bash
# The installed layout, used as a C programmer outside Bazel uses it: tools/install_layout.sh
# lays out libtidepool.so.1, its header and tidepool.pc under a prefix; a C program is compiled
# with `cc prog.c $(pkg-config --cflags --libs tidepool)` and run on simulated devices with an
# otherwise empty environment. Also checks what the program needs: libtidepool.so.1 and the C
# runtime.
#
#   installed_test.sh LIBRARY HEADER PC_TEMPLATE INSTALL_LAYOUT PROGRAM_SOURCE
set -euo pipefail
library="$1" header="$2" template="$3" install_layout="$4" source="$5"
prefix="${TEST_TMPDIR:-$(mktemp -d)}/prefix"
"$install_layout" "$library" "$header" "$template" "$prefix"
for path in include/tidepool/tidepool.h lib/libtidepool.so.1 lib/libtidepool.so \
    lib/pkgconfig/tidepool.pc; do
  [ -e "$prefix/$path" ] || { echo "installed_test: no $prefix/$path" >&2; exit 1; }
done
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
flags="$(pkg-config --cflags --libs tidepool)"
echo "installed_test: pkg-config --cflags --libs tidepool: $flags"
program="${TEST_TMPDIR:-/tmp}/installed_program"
# shellcheck disable=SC2086  # the flags are words
cc -std=c99 -Wall -Wextra -Werror "$source" $flags -Wl,-rpath,"$prefix/lib" -o "$program"
needed="$(readelf -d "$program" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
echo "installed_test: the program needs $needed"
case " $needed " in
  *" libtidepool.so.1 "*) ;;
  *) echo "installed_test: the program does not need libtidepool.so.1" >&2; exit 1 ;;
esac
env -i "$program" simulated
