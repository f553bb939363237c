#!/usr/bin/env bash
# Builds everything tidepool runs on a GPU host and puts it in one folder to copy there: the GPU
# tests (every cc_test under //tests/gpu), the `tidepool` command (//tools:tidepool) and the
# benchmarks (cc_binary targets under //bench), with traces/ and run_gpu_tests.sh. The GPU host
# has no Bazel, so the binaries must stand alone; this script checks that they need no shared
# library beyond the C and C++ runtimes (libcuda is opened at run time).
#
#   tools/gather_gpu_tests.sh OUTDIR          e.g. tools/gather_gpu_tests.sh gpu_bundle
#
# Layout of OUTDIR: run_gpu_tests.sh, tests/<test>, <program> (tidepool, benchmarks), traces/,
# symmetric_ranks_test with run_symmetric_ranks.sh (two or more GPUs: tests/gpu_multi),
# installed/ (libtidepool.so.1 and libtidepool_preload.so as tools/install lays them out, and a
# C program built against it, which tests/installed_program runs with an empty environment),
# python/ (the tidepool package, for the PyTorch, CuPy and Numba scripts in tests/), wheel/ (the
# wheel, which tests/wheel_install installs into a fresh venv there).
# On the GPU host: copy OUTDIR over, then `OUTDIR/run_gpu_tests.sh`. The tools and bench targets
# are taken when they exist and skipped (with a note) when their package or target does not.
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
outdir="$(cd "$1" && pwd)"
cd "$(dirname "$0")/.."

query_err="$(mktemp)"
trap 'rm -f "$query_err"' EXIT

# Prints the labels that a query expression names. A package folder without a BUILD file, or a
# target that does not exist, gives nothing; any other query failure stops the script.
labels() {
  local expression="$1" package="$2"
  if [ ! -f "$package/BUILD.bazel" ] && [ ! -f "$package/BUILD" ]; then
    echo "gather_gpu_tests: no package $package, skipped" >&2
    return 0
  fi
  if ! bazel query --noshow_progress --output=label "$expression" 2>"$query_err"; then
    if grep -q "no such target" "$query_err"; then
      echo "gather_gpu_tests: $expression names no target, skipped" >&2
      return 0
    fi
    cat "$query_err" >&2
    exit 1
  fi
}

# Command substitutions, not process substitutions: a failing query then stops the script.
test_labels="$(labels 'kind("cc_test rule", //tests/gpu/...)' tests/gpu)"
program_labels="$(
  labels 'kind("cc_binary rule", //tools:tidepool)' tools
  labels 'kind("cc_binary rule", //bench/...)' bench
)"
tests=()
for label in $test_labels; do tests+=("$label"); done
programs=()
for label in $program_labels; do programs+=("$label"); done
if [ ${#tests[@]} -eq 0 ]; then
  echo "gather_gpu_tests: no cc_test under //tests/gpu" >&2
  exit 1
fi

library_label=//integrations/c_api:libtidepool.so.1
preload_label=//integrations/preload:libtidepool_preload.so
wheel_label=//integrations/python/wheel:wheel
multi_gpu_label=//tests/gpu_multi:symmetric_ranks_test
bazel build "${tests[@]}" "${programs[@]}" "$library_label" "$preload_label" "$wheel_label" \
  "$multi_gpu_label"
bin_dir="$(bazel info bazel-bin)"

# The shared libraries a binary may need on the GPU host: the C and C++ runtimes only.
allowed_needed='^(libc\.so\.6|libm\.so\.6|libstdc\+\+\.so\.6|libgcc_s\.so\.1|libdl\.so\.2|libpthread\.so\.0|librt\.so\.1|ld-linux-x86-64\.so\.2)$'

# Copies the binary of `label` to `destination`, refusing one that would not run alone.
copy_binary() {
  local label="$1" destination="$2"
  local path="${label#//}"
  local source="$bin_dir/${path%%:*}/${path#*:}"
  if [ ! -f "$source" ]; then
    echo "gather_gpu_tests: $label built, but $source is missing" >&2
    exit 1
  fi
  if command -v readelf >/dev/null 2>&1; then
    local needed
    needed="$(readelf -d "$source" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | grep -Ev "$allowed_needed" || true)"
    if [ -n "$needed" ]; then
      echo "gather_gpu_tests: $label needs ${needed//$'\n'/ } and would not run on the GPU host" \
           "(link it statically: linkstatic = True)" >&2
      exit 1
    fi
  fi
  if [ -e "$destination" ]; then
    rm -f "$destination"
  fi
  install -m 755 "$source" "$destination"
}

# A fresh tests/ folder, so a test removed from the tree does not linger in the bundle.
rm -rf "$outdir/tests"
mkdir -p "$outdir/tests"
for label in "${tests[@]}"; do
  name="${label#*:}"
  if [ -e "$outdir/tests/$name" ]; then
    echo "gather_gpu_tests: two GPU tests are named $name; rename one" >&2
    exit 1
  fi
  copy_binary "$label" "$outdir/tests/$name"
done
for label in "${programs[@]}"; do
  copy_binary "$label" "$outdir/${label#*:}"
done
# The multi-GPU test (symmetric pools across ranks) and its launcher, outside tests/: it needs a
# host with two or more GPUs, so the one-GPU runner leaves it out.
copy_binary "$multi_gpu_label" "$outdir/symmetric_ranks_test"
install -m 755 tests/gpu_multi/run_symmetric_ranks.sh "$outdir/run_symmetric_ranks.sh"
# The installed library, and a C program built against it the way a user outside Bazel builds
# one (pkg-config), that finds the library beside it ($ORIGIN): run_gpu_tests.sh runs it with an
# empty environment, so it proves the library needs nothing on the GPU host but the driver.
rm -rf "$outdir/installed"
tools/install_layout.sh "$bin_dir/integrations/c_api/libtidepool.so.1" \
  integrations/c_api/tidepool.h integrations/c_api/tidepool.pc.in "$outdir/installed"
# The interposer beside the library it needs (its RUNPATH is $ORIGIN).
install -m 755 "$bin_dir/integrations/preload/libtidepool_preload.so" "$outdir/installed/lib/"
mkdir -p "$outdir/installed/bin"
# shellcheck disable=SC2046  # pkg-config's flags are words
cc -std=c99 -O2 -Wall -Werror tests/c_api/installed_program.c \
  $(PKG_CONFIG_PATH="$outdir/installed/lib/pkgconfig" pkg-config --cflags --libs tidepool) \
  -Wl,-rpath,'$ORIGIN/../lib' -o "$outdir/installed/bin/installed_program"
for shipped in "$outdir/installed/lib/libtidepool.so.1" \
    "$outdir/installed/bin/installed_program"; do
  needed="$(readelf -d "$shipped" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' |
            grep -Ev "$allowed_needed" | grep -vx 'libtidepool\.so\.1' || true)"
  if [ -n "$needed" ]; then
    echo "gather_gpu_tests: $shipped needs ${needed//$'\n'/ } and would not run on the GPU host" >&2
    exit 1
  fi
done

# As a test of the bundle: the program with an empty environment (no LD_LIBRARY_PATH, nothing).
cat >"$outdir/tests/installed_program" <<'WRAPPER'
#!/bin/sh
# The installed libtidepool.so.1 and a C program built against it, with nothing but the driver.
exec env -i "$(dirname "$0")/../installed/bin/installed_program"
WRAPPER
chmod 755 "$outdir/tests/installed_program"

# The Python package (tidepool.torch, ...) and the PyTorch tests, which run with the installed
# library (run_gpu_tests.sh points TIDEPOOL_LIBRARY and PYTHONPATH there).
rm -rf "$outdir/python"
mkdir -p "$outdir/python"
cp -r integrations/python/tidepool "$outdir/python/tidepool"
find "$outdir/python" -name __pycache__ -prune -exec rm -rf {} +
# The interposer's test: a CUDA program (built there with nvcc; a .txt, so that the runner does
# not take it for a test) and the script that builds and runs it.
install -m 644 tests/gpu_preload/preload_program.cu "$outdir/tests/preload_program.cu.txt"
install -m 644 tests/gpu_preload/preload_bench.cu "$outdir/tests/preload_bench.cu.txt"
install -m 755 tests/gpu_preload/preload_programs.sh "$outdir/tests/preload_programs"
for script in tests/gpu_torch/*.py tests/gpu_python/*.py; do
  [ -e "$script" ] || continue
  # A module the scripts share (_name.py) goes beside them, not run as a test.
  case "$(basename "$script")" in
    _*) install -m 644 "$script" "$outdir/tests/$(basename "$script")"; continue ;;
  esac
  name="$(basename "$script" .py)"
  if [ -e "$outdir/tests/$name" ]; then
    echo "gather_gpu_tests: two GPU tests are named $name; rename one" >&2
    exit 1
  fi
  install -m 755 "$script" "$outdir/tests/$name"
done

# The wheel, and its test there (installed into a fresh venv, then `tidepool run`).
rm -rf "$outdir/wheel"
mkdir -p "$outdir/wheel"
cp "$bin_dir"/integrations/python/wheel/wheel/tidepool-*.whl "$outdir/wheel/"
install -m 755 tests/gpu_wheel/wheel_install.sh "$outdir/tests/wheel_install"

rm -rf "$outdir/traces"
cp -r traces "$outdir/traces"
install -m 755 tools/run_gpu_tests.sh "$outdir/run_gpu_tests.sh"

echo "gather_gpu_tests: ${#tests[@]} tests, ${#programs[@]} programs and the installed library" \
  "in $outdir"
echo "on the GPU host: $outdir/run_gpu_tests.sh   (or copy the folder there and run it inside)"
