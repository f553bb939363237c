#!/usr/bin/env bash
# The replay plot in a browser: `tidepool replay --plot` on a bundled trace, rendered by headless
# Chromium (Debian's `chromium`, which tools/setup installs) to a PNG screenshot, which must not
# be blank: check_png.py counts the pixels that are not the background and the colours used.
# Arguments: the tidepool binary, a trace, check_png.py.
set -euo pipefail
tool="$1" trace="$2" checker="$3"
work="${TEST_TMPDIR:-$(mktemp -d)}"
browser="$(command -v chromium || command -v chromium-browser || true)"
if [ -z "$browser" ]; then
  echo "plot_render_test: no chromium (tools/setup installs Debian's package)" >&2
  exit 1
fi
"$tool" replay "$trace" --device=sim --plot="$work/plot.svg" >/dev/null
# As root (CI), Chromium needs --no-sandbox; --headless=new draws as the browser does.
HOME="$work" "$browser" --headless=new --no-sandbox --disable-gpu --hide-scrollbars \
  --window-size=960,540 --screenshot="$work/plot.png" "file://$work/plot.svg" \
  >"$work/chromium.log" 2>&1 || { cat "$work/chromium.log"; exit 1; }
python3 "$checker" "$work/plot.png"
