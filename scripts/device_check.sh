#!/usr/bin/env bash
# One prepared check of the Mamba path on a GPU machine that reaches no package registry.
#
#   bash scripts/prepare_device_wheels.sh      # first, on a CPU machine with registry access
#   OUT=/some/dir bash scripts/device_check.sh                # on the GPU machine (default: ./device_out)
#   OUT=/tmp/dc bash scripts/device_check.sh --dry-run        # same steps on CPU at tiny sizes
#
# Steps (each with its own timeout, all inside BUDGET_S seconds, default 480 = 8 minutes):
#   env        GPU, Python, torch / CUDA / triton versions; does mamba-ssm import?
#   install    the wheels of .device_wheels/ that match this Python (pip --no-index --no-deps),
#              then the project with --no-deps (PYTHONPATH fallback if that fails)
#   imports    every wsi_pipe module the benches need, missing ones recorded
#   gpu_tests  pytest -m gpu (the 7+ CUDA tests: mamba-ssm kernel, causal-conv1d, bf16, ...)
#   scan       scan backends on CUDA (torch / triton / mamba-ssm when present): parity of the
#              output and every gradient against the torch backend, fwd and fwd+bwd times,
#              the encoders' grouped-B shape, fp32 and bf16 -> scan_backends.json
#   encoder    bench_encoder.py --device cuda --dtype bf16 (ssmamba_s / medmamba_t / resnet50,
#              scan backends auto / triton / torch)                  -> bench_encoder.json
#   extract    bench_extract.py --device cuda on the synthetic slide  -> bench_extract.json
#   mil        bench_mil.py --device cuda (mamba, abmil; 1k-100k tiles) -> bench_mil.json
#   mamba_build  optional (MAMBA_BUILD=1 and sdists in .device_wheels): build mamba-ssm and
#              causal-conv1d for sm_90 only, time-boxed by what is left of the budget
# Always written, even when a step fails or times out: $OUT/device_check.json (one record per
# step: rc, seconds, status; env facts; the scan results) and $OUT/device_check.log (all output).
# Exit status 0 when every step that ran passed, 1 otherwise.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
OUT=${OUT:-$ROOT/device_out}
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
JSON="$OUT/device_check.json"
WHEELS=${WHEELS:-$ROOT/.device_wheels}
BUDGET_S=${BUDGET_S:-480}
PY=${PYTHON:-python3}
START=$(date +%s)
WORK=$(mktemp -d)
STEPS="$WORK/steps.jsonl"
: >"$STEPS"
: >"$LOG"
if [[ $DRY == 1 ]]; then DEVICE=cpu; else DEVICE=cuda; fi
export PYTHONUNBUFFERED=1

finish() {
  local rc=$?
  "$PY" - "$STEPS" "$JSON" "$WORK" "$DRY" "$START" <<'PY' || echo "could not write $JSON" >>"$LOG"
import json, os, sys, time
steps_path, out_path, work, dry, start = sys.argv[1:6]
steps = [json.loads(line) for line in open(steps_path) if line.strip()]
doc = {"dry_run": dry == "1", "started_unix": int(start), "wall_s": round(time.time() - int(start), 1),
       "steps": steps, "ok": all(s["status"] in ("ok", "skipped") for s in steps)}
for name in ("env", "imports", "scan_backends"):
    p = os.path.join(work, name + ".json")
    if os.path.exists(p):
        try:
            doc[name] = json.load(open(p))
        except ValueError as e:
            doc[name] = {"error": f"unreadable: {e}"}
json.dump(doc, open(out_path, "w"), indent=2)
PY
  rm -rf "$WORK"
  echo "device_check: wrote $JSON and $LOG (exit $rc)"
  exit "$rc"
}
trap finish EXIT

FAILED=0
# run_step NAME TIMEOUT_S CMD...: run with a timeout clipped to the budget left, log, record
run_step() {
  local name=$1 limit=$2
  shift 2
  local now left t0 rc status
  now=$(date +%s)
  left=$((BUDGET_S - (now - START)))
  if ((left < 15)); then
    echo "=== [$name] skipped: budget of ${BUDGET_S}s used up" | tee -a "$LOG"
    printf '{"step": "%s", "status": "skipped", "rc": null, "seconds": 0, "reason": "budget"}\n' \
      "$name" >>"$STEPS"
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "=== [$name] $(date -u +%H:%M:%S) timeout ${limit}s: $*" | tee -a "$LOG"
  t0=$(date +%s.%N)
  set +e
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  set -e
  if ((rc == 0)); then status=ok; elif ((rc == 124 || rc == 137)); then status=timeout; else status=failed; fi
  [[ $status == ok ]] || FAILED=1
  printf '{"step": "%s", "status": "%s", "rc": %d, "seconds": %.1f, "timeout_s": %d}\n' \
    "$name" "$status" "$rc" "$(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN { print a - b }')" "$limit" >>"$STEPS"
  echo "=== [$name] $status (rc $rc)" | tee -a "$LOG"
  return 0
}

# ------------------------------------------------------------------------------------- env
run_step env 60 "$PY" - "$WORK/env.json" <<'PY'
import json, platform, shutil, subprocess, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
if shutil.which("nvidia-smi"):
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                         "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
import torch
info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name()
    info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
for mod in ("triton", "mamba_ssm", "causal_conv1d", "numba", "timm", "h5py", "cv2", "skimage"):
    try:
        m = __import__(mod)
        info[mod] = getattr(m, "__version__", "present")
    except Exception as e:
        info[mod] = f"not importable: {type(e).__name__}: {str(e)[:200]}"
try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    info["mamba_ssm_selective_scan_fn"] = True
except Exception as e:
    info["mamba_ssm_selective_scan_fn"] = f"{type(e).__name__}: {str(e)[:200]}"
print(json.dumps(info, indent=2))
json.dump(info, open(sys.argv[1], "w"), indent=2)
PY

# --------------------------------------------------------------------------------- install
install_wheels() {
  local pkgs=(openslide-python openslide-bin tifffile fsspec donfig google-crc32c msgspec numcodecs zarr
    tiffslide annotated-types typing-inspection pydantic-core pydantic pydicom einops imagecodecs)
  local pipflags=(--no-index --find-links "$WHEELS" --no-deps)
  [[ $DRY == 1 ]] && pipflags+=(--dry-run)
  if [[ ! -d "$WHEELS" ]]; then
    echo "no $WHEELS: run scripts/prepare_device_wheels.sh on a machine with registry access"
    return 1
  fi
  local missing=()
  for p in "${pkgs[@]}"; do
    # one at a time: a package with no wheel for this Python must not stop the others
    if ! "$PY" -m pip install -q "${pipflags[@]}" "$p"; then missing+=("$p"); fi
  done
  echo "no matching wheel (or install failed) for: ${missing[*]:-none}"
  if [[ $DRY == 1 ]]; then
    "$PY" -m pip install -q --dry-run --no-deps --no-build-isolation --no-index -e . || true
  else
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . ||
      echo "project install failed; PYTHONPATH=$ROOT is used instead"
  fi
}
run_step install 120 bash -c "$(declare -f install_wheels); WHEELS='$WHEELS' DRY=$DRY PY='$PY' install_wheels"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

run_step imports 60 "$PY" - "$WORK/imports.json" <<'PY'
import importlib, json, sys
mods = ["wsi_pipe", "wsi_pipe.core.config", "wsi_pipe.readers", "wsi_pipe.store", "wsi_pipe.stages.extract",
        "wsi_pipe.encoders", "wsi_pipe.mil", "wsi_pipe.nn", "openslide", "tiffslide", "zarr", "pydantic",
        "pydicom", "imagecodecs", "wsi_pipe.nn.scan_triton"]
res = {}
for m in mods:
    try:
        importlib.import_module(m)
        res[m] = "ok"
    except Exception as e:
        res[m] = f"{type(e).__name__}: {str(e)[:200]}"
print(json.dumps(res, indent=2))
json.dump(res, open(sys.argv[1], "w"), indent=2)
needed = [m for m in mods if m.startswith("wsi_pipe") and not m.endswith("scan_triton")]
sys.exit(0 if all(res[m] == "ok" for m in needed) else 1)
PY

# ------------------------------------------------------------------------------- gpu tests
run_step gpu_tests 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" -rs tests

# ------------------------------------------------------------------------------ scan check
run_step scan $((DRY ? 180 : 90)) "$PY" - "$WORK/scan_backends.json" "$DEVICE" <<'PY'
import json, statistics, sys, time
import torch
from wsi_pipe.nn.selective_scan import (cuda_scan_available, numba_scan_available, selective_scan,
                                        triton_scan_available)
out_path, device = sys.argv[1], torch.device(sys.argv[2])
dry = device.type == "cpu"
backends = ["torch"]
if device.type == "cuda":
    backends += ["triton"] if triton_scan_available() else []
    backends += ["cuda"] if cuda_scan_available() else []
else:
    backends += ["numba"] if numba_scan_available() else []
# (b, d, n, l, groups): a Mamba-MIL-like 1-D scan and the encoders' grouped (K=4) stage-1 scan
shapes = [(2, 64, 16, 100, None), (2, 32, 8, 49, 4)] if dry else \
         [(1, 512, 16, 20_000, None), (64, 384, 8, 3136, 4)]
def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()
def inputs(b, d, n, l, g, dtype):
    gen = torch.Generator().manual_seed(0)
    sbc = (b, n, l) if g is None else (b, g, n, l)
    t = {"u": torch.randn(b, d, l, generator=gen), "delta": torch.randn(b, d, l, generator=gen) * 0.5,
         "A": -torch.rand(d, n, generator=gen) * 4 - 0.1, "B": torch.randn(*sbc, generator=gen),
         "C": torch.randn(*sbc, generator=gen), "D": torch.randn(d, generator=gen),
         "z": torch.randn(b, d, l, generator=gen), "delta_bias": torch.randn(d, generator=gen) * 0.5}
    return {k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v).to(device).requires_grad_()
            for k, v in t.items()}
def rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))
def timed(fn, reps=3):
    ts = []
    for _ in range(reps + 1):
        sync(); t0 = time.perf_counter(); fn(); sync(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts[1:])
results = []
for shape in shapes:
    for dtype in (torch.float32, torch.bfloat16):
        t = inputs(*shape, dtype)
        ref = selective_scan(**t, delta_softplus=True, backend="torch")
        gy = torch.randn_like(ref)
        g_ref = torch.autograd.grad(ref, list(t.values()), gy)
        for be in backends:
            row = {"shape_b_d_n_l_groups": list(shape), "dtype": str(dtype), "backend": be}
            try:
                train = be != "numba"
                with torch.set_grad_enabled(train):
                    y = selective_scan(**t, delta_softplus=True, backend=be)
                row["out_rel_err_vs_torch"] = rel(y, ref)
                if train:
                    g = torch.autograd.grad(y, list(t.values()), gy)
                    row["grad_rel_err_vs_torch"] = {k: rel(a, b) for k, a, b in zip(t, g, g_ref)}
                with torch.no_grad():
                    row["fwd_s"] = timed(lambda: selective_scan(**t, delta_softplus=True, backend=be))
                if train:
                    def fb():
                        yy = selective_scan(**t, delta_softplus=True, backend=be)
                        torch.autograd.grad(yy, list(t.values()), gy)
                    row["fwd_bwd_s"] = timed(fb)
                tol = 1e-4 if dtype == torch.float32 else 2e-2
                errs = [row["out_rel_err_vs_torch"], *row.get("grad_rel_err_vs_torch", {}).values()]
                row["ok"] = max(errs) <= (tol if be != "torch" else 0)
            except Exception as e:  # record and go on: one broken backend must not hide the others
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                row["ok"] = False
            print(json.dumps(row), flush=True)
            results.append(row)
json.dump({"device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
           "backends": backends, "results": results}, open(out_path, "w"), indent=2)
sys.exit(0 if all(r["ok"] for r in results) else 1)
PY

# --------------------------------------------------------------------------------- benches
if [[ $DRY == 1 ]]; then
  run_step encoder 120 "$PY" scripts/bench_encoder.py --device cpu --models resnet_tiny ssmamba_tiny \
    --scan-backends auto torch --batch-size 2 --px 64 --iters 2 --skip-scan --json "$OUT/bench_encoder.json"
else
  run_step encoder 150 "$PY" scripts/bench_encoder.py --device cuda --dtype bf16 \
    --models resnet50 ssmamba_s medmamba_t --scan-backends auto triton torch --batch-size 256 \
    --iters 5 --no-profile --scan-length 4096 --json "$OUT/bench_encoder.json"
fi

SLIDE="$WHEELS/synth_slide.tif"
slide_args=()
[[ -s "$SLIDE" ]] && slide_args=(--slide "$SLIDE")
if [[ $DRY == 1 ]]; then
  run_step extract 120 "$PY" scripts/bench_extract.py --device cpu --encoder small-cnn --tiles 64 \
    --workers 1 --batch-size 16 --repeat 1 --slides 1 "${slide_args[@]}" --json "$OUT/bench_extract.json"
else
  run_step extract 120 "$PY" scripts/bench_extract.py --device cuda --encoder ssmamba_s --precision bf16 \
    --workers 12 --batch-size 256 --tiles 400 --repeat 3 --slides 2 "${slide_args[@]}" \
    --json "$OUT/bench_extract.json"
fi

if [[ $DRY == 1 ]]; then
  run_step mil 180 "$PY" scripts/bench_mil.py --device cpu --methods mamba --sizes 500 --reps 1 \
    --infer-backends auto torch --json "$OUT/bench_mil.json"
else
  run_step mil 90 "$PY" scripts/bench_mil.py --device cuda --methods mamba abmil \
    --sizes 1000 10000 100000 --reps 2 --json "$OUT/bench_mil.json"
fi

# ------------------------------------------------------------------ optional mamba-ssm build
if [[ "${MAMBA_BUILD:-0}" == 1 && $DRY == 0 ]]; then
  build_mamba() {
    shopt -s nullglob
    local sdists=("$WHEELS"/causal_conv1d-*.tar.gz "$WHEELS"/mamba_ssm-*.tar.gz)
    if ((${#sdists[@]} == 0)); then
      echo "no mamba-ssm / causal-conv1d sdists in $WHEELS"
      return 1
    fi
    local t0=$SECONDS
    MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
      "$PY" -m pip install --no-index --no-deps --no-build-isolation -v "${sdists[@]}"
    echo "mamba-ssm build took $((SECONDS - t0)) s"
    "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests/test_scan.py
  }
  run_step mamba_build 600 bash -c "$(declare -f build_mamba); WHEELS='$WHEELS' PY='$PY' build_mamba"
fi

exit $FAILED
