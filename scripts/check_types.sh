#!/usr/bin/env bash
# Type checks, as CI runs them: strict on the torch-free packages, the default rules elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
mypy --strict wsi_pipe/core wsi_pipe/store wsi_pipe/readers wsi_pipe/imageops
mypy wsi_pipe
