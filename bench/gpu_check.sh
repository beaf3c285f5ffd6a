#!/usr/bin/env bash
# The GPU path, end to end, on a CUDA machine (not a test: it prints figures).
#
#   bash bench/gpu_check.sh                 # set up (make setup) unless .venv exists, then run both checks
#   SKIP_SETUP=1 PY=/path/to/python bash bench/gpu_check.sh   # an environment that is already installed
#
# 1. the bundled demo end to end (every stage of pipelines/stages.py, in order) with the trainer environment on
#    auto: CUDA, bf16 where the GPU supports it; evaluation runs on the same device and precision;
# 2. the same train + evaluate with train.method = qlora (4-bit NF4 base, bitsandbytes);
# then prints, per run: real (non-pad) training tokens/s, MFU against the GPU's dense bf16 peak (model FLOPs,
# 4N per token for LoRA: forward 2N + input-gradient backward 2N; the frozen base gets no weight gradients),
# peak GPU memory, the stage wall times and the demo's metrics. Target: under 8 minutes on one H200.
# Everything goes to a scratch project under ${OUT:-/tmp/gpu_check}; the repository's data/ is not touched.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-/tmp/gpu_check}
PY=${PY:-$REPO/.venv/bin/python}
export TOKENIZERS_PARALLELISM=false PYTHONPATH=$REPO HF_HUB_OFFLINE=1
started=$(date +%s)

if [ "${SKIP_SETUP:-0}" != 1 ] && [ ! -x "$REPO/.venv/bin/python" ]; then make setup; fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA GPU here ($("$PY" -c 'import torch; print(torch.__version__)')); run it on a CUDA machine" >&2
  exit 2
fi
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, bf16 {torch.cuda.is_bf16_supported()}')"

rm -rf "$OUT" && mkdir -p "$OUT"
# A scratch project: the repository's params with every path under $OUT (the raw demo data is read in place).
"$PY" - "$REPO/params.yaml" "$OUT" <<'PY'
import sys, yaml
from pathlib import Path
src, out = Path(sys.argv[1]), Path(sys.argv[2])
params = yaml.safe_load(src.read_text())
for key, value in params["paths"].items():
    params["paths"][key] = str(src.parent / value) if key == "raw_dir" else str(out / "bf16" / value)
(out / "bf16.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
qlora = yaml.safe_load(yaml.safe_dump(params))
qlora["train"]["method"] = "qlora"
for key in ("adapter", "checkpoints", "evaluation", "metrics", "promoted"):
    qlora["paths"][key] = str(out / "qlora" / Path(params["paths"][key]).relative_to(out / "bf16"))
(out / "qlora.yaml").write_text(yaml.safe_dump(qlora, sort_keys=False))
PY
stages=$("$PY" -c "from pipelines.stages import STAGES; print(' '.join(s.name for s in STAGES))")

run_stage() {  # run_stage PARAMS STAGE -> appends "STAGE SECONDS RC" to $OUT/<run>.times
  local t0 rc=0; t0=$(date +%s.%N)
  "$PY" -m pipelines "$2" --params "$1" > "$OUT/$(basename "$1" .yaml)-$2.log" 2>&1 || rc=$?
  printf '%s %.1f %s\n' "$2" "$(echo "$(date +%s.%N) - $t0" | bc)" "$rc" >> "$OUT/$(basename "$1" .yaml).times"
  [ "$rc" = 0 ] || { echo "stage $2 failed (exit $rc), last lines of $OUT/$(basename "$1" .yaml)-$2.log:"; tail -5 "$OUT/$(basename "$1" .yaml)-$2.log"; }
  return 0
}
echo "== run 1: the demo end to end, bf16 (stages: $stages)"
for stage in $stages; do run_stage "$OUT/bf16.yaml" "$stage"; done
echo "== run 2: qlora (train + evaluate on the same splits)"
for stage in train evaluate; do run_stage "$OUT/qlora.yaml" "$stage"; done

"$PY" bench/gpu_report.py "$OUT/bf16.yaml" "$OUT/qlora.yaml"
echo "gpu_check: $(( $(date +%s) - started )) s in all (target < 480 s on one H200)"
