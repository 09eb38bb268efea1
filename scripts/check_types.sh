#!/usr/bin/env bash
# Type checks, as CI runs them: strict on the torch-free packages, the default rules on the
# packages that are clean so far. Not yet checked (torch-typing debts, listed in docs/ARCHITECTURE.md):
# stages/, encoders/, anomaly/, nn/scan_cpu.py, synth.py.
set -euo pipefail
cd "$(dirname "$0")/.."
mypy --strict wsi_pipe/core wsi_pipe/store wsi_pipe/readers wsi_pipe/imageops
mypy --follow-imports=silent wsi_pipe/cli wsi_pipe/runner wsi_pipe/mil wsi_pipe/report wsi_pipe/data wsi_pipe/torchutil.py
