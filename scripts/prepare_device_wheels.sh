#!/usr/bin/env bash
# Prepare, on a CPU machine with registry access, what scripts/device_check.sh needs on a GPU
# machine that reaches no registry: wheels of the packages that machine lacks, for every CPython
# it might run (3.10-3.13, manylinux x86_64), and a synthetic JPEG slide for the extract bench.
#
#   bash scripts/prepare_device_wheels.sh            # -> .device_wheels/ (git-ignored, carried)
#   PYTHONS="3.12" bash scripts/prepare_device_wheels.sh
#   WITH_IMAGECODECS=1 bash scripts/prepare_device_wheels.sh   # + imagecodecs (about 26 MB)
#
# What the GPU machine lacks (issue #12): openslide-python, openslide-bin, tiffslide, zarr,
# pydantic, pydicom, imagecodecs. Their dependencies are resolved per Python version by pip (so
# versions agree, e.g. pydantic / pydantic-core), then only an allowlist is kept: packages that
# machine already has (numpy, packaging, typing-extensions, ...) are dropped. imagecodecs is
# only needed to *write* JPEG TIFFs (OpenSlide decodes them with its own libjpeg), so by default
# the slide is written here instead and imagecodecs is left out; zarr 3 needs Python >= 3.11,
# so for 3.10 zarr / numcodecs are left out (the zarr store backend is then unavailable there).
# The total is checked against MAX_MB (the working tree that travels is capped at 64 MiB).
set -euo pipefail

cd "$(dirname "$0")/.."
DEST=${DEST:-.device_wheels}
PYTHONS=${PYTHONS:-"3.10 3.11 3.12 3.13"}
MAX_MB=${MAX_MB:-40}
WITH_IMAGECODECS=${WITH_IMAGECODECS:-0}
SLIDE_SIDE=${SLIDE_SIDE:-5120}  # 20 x 20 tiles of 256 px (about 9 MB of JPEG)

TOP=(openslide-python openslide-bin tiffslide zarr pydantic pydicom)
KEEP=(openslide_python openslide_bin tiffslide tifffile zarr numcodecs donfig google_crc32c msgspec pydantic
      pydantic_core annotated_types typing_inspection pydicom fsspec einops)
if [[ "$WITH_IMAGECODECS" == 1 ]]; then
  TOP+=(imagecodecs)
  KEEP+=(imagecodecs)
fi

mkdir -p "$DEST"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for py in $PYTHONS; do
  top=("${TOP[@]}" einops)
  if [[ "$py" == "3.10" ]]; then
    top=(openslide-python openslide-bin pydantic pydicom einops)  # no zarr 3 / tiffslide 3+
  fi
  echo "== CPython $py: ${top[*]}"
  python3 -m pip download --quiet --only-binary=:all: --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --python-version "$py" \
    --dest "$tmp/$py" "${top[@]}"
  for whl in "$tmp/$py"/*.whl; do
    name=$(basename "$whl" | cut -d- -f1 | tr '[:upper:]' '[:lower:]')
    for keep in "${KEEP[@]}"; do
      if [[ "$name" == "$keep" ]]; then
        cp -n "$whl" "$DEST/"
      fi
    done
  done
done

# a synthetic JPEG pyramidal slide, written here (needs imagecodecs on this machine)
slide="$DEST/synth_slide.tif"
if [[ ! -s "$slide" ]]; then
  python3 - "$slide" "$SLIDE_SIDE" <<'PY'
import sys
from pathlib import Path

sys.path.insert(0, "scripts")
from bench_extract import write_synthetic_slide  # noqa: E402

side = int(sys.argv[2])
write_synthetic_slide(Path(sys.argv[1]), side, side, 0.5)
PY
fi

echo "== $DEST"
ls -l "$DEST" | awk 'NR > 1 {printf "%10d  %s\n", $5, $9}'
total_kb=$(du -sk "$DEST" | cut -f1)
echo "total: $((total_kb / 1024)) MiB (limit MAX_MB=$MAX_MB)"
if (( total_kb > MAX_MB * 1024 )); then
  echo "ERROR: $DEST is larger than $MAX_MB MiB; the working tree that travels is capped at 64 MiB" >&2
  exit 1
fi
