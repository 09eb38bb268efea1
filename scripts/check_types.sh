#!/usr/bin/env bash
# Type checks, as CI runs them: strict on the torch-free packages, the default rules on the
# other packages (every package of wsi_pipe is checked).
set -euo pipefail
cd "$(dirname "$0")/.."
mypy --strict wsi_pipe/core wsi_pipe/store wsi_pipe/readers wsi_pipe/imageops
mypy --follow-imports=silent wsi_pipe/stages wsi_pipe/cli wsi_pipe/runner wsi_pipe/mil wsi_pipe/report wsi_pipe/data wsi_pipe/interop wsi_pipe/torchutil.py \
  wsi_pipe/encoders wsi_pipe/anomaly wsi_pipe/nn wsi_pipe/synth.py
