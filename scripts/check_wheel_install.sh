#!/usr/bin/env bash
# A non-editable install runs `wsi-pipe tile --preset biopsy`: the presets ship inside the wheel.
# The wheel goes into a fresh venv that sees the already-installed dependencies (no downloads
# beyond the build backend), and the command runs from a folder outside the repository.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv --system-site-packages "$work/venv"
"$work/venv/bin/pip" install -q --no-deps "$repo"
cd "$work"
"$work/venv/bin/python" - <<'PY'
import wsi_pipe, sys
assert "site-packages" in wsi_pipe.__file__, wsi_pipe.__file__  # the wheel, not the checkout
from wsi_pipe.synth import blank_painter, write_pyramidal_tiff
write_pyramidal_tiff("slide.tiff", 2048, 2048, 0.5, levels=2, painter=blank_painter)
PY
"$work/venv/bin/wsi-pipe" -q tile slide.tiff --preset biopsy --out run >/dev/null
test -f run/config/tile.yaml && grep -q "seg_mpp: 4.0" run/config/tile.yaml
echo "wheel install: wsi-pipe tile --preset biopsy works outside the repository"
