#!/usr/bin/env bash
# Renders a report's report.html in headless Chromium and writes it as PNG pages, to check by eye
# what a reader's browser shows (plots, legends, tables, warnings).
#
#   bash reports/screenshots.sh reports/example [OUT_DIR]     (default OUT_DIR: /tmp/<name>-screenshots)
#
# Needs chromium (Debian: apt-get install chromium). WIDTH (default 1200) and HEIGHT (the tallest
# page it renders, default 30000 px) can be set in the environment. Writes OUT_DIR/full.png, the
# whole page cropped to its content, and OUT_DIR/page-01.png ... slices of 1,600 px to read.
set -euo pipefail
cd "$(dirname "$0")/.."
report=${1:?usage: bash reports/screenshots.sh REPORT_DIR [OUT_DIR]}
out=${2:-/tmp/$(basename "$report")-screenshots}
python=${PYTHON:-.venv/bin/python}
[ -f "$report/report.html" ] || { echo "screenshots.sh: $report/report.html not found" >&2; exit 1; }
command -v chromium > /dev/null || { echo "screenshots.sh: chromium not found (apt-get install chromium)" >&2; exit 1; }
mkdir -p "$out"
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# No network, no first-run or background work: the page is self-contained
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --hide-scrollbars --user-data-dir="$profile" --screenshot="$out/full.png" \
  --window-size="${WIDTH:-1200},${HEIGHT:-30000}" "file://$(realpath "$report/report.html")" \
  > "$out/chromium.log" 2>&1 || { cat "$out/chromium.log" >&2; exit 1; }
"$python" - "$out" <<'EOF'
import sys
from pathlib import Path

from PIL import Image, ImageChops

out = Path(sys.argv[1])
page = Image.open(out / "full.png").convert("RGB")
content = ImageChops.difference(page, Image.new("RGB", page.size, "white")).getbbox()
page = page.crop((0, 0, page.width, content[3] + 20 if content else page.height))
page.save(out / "full.png")
for old in out.glob("page-*.png"):
    old.unlink()
for i, top in enumerate(range(0, page.height, 1600)):
    page.crop((0, top, page.width, min(top + 1600, page.height))).save(out / f"page-{i + 1:02d}.png")
print(f"{out}/full.png ({page.width} x {page.height} px) and {i + 1} pages of 1,600 px")
EOF
