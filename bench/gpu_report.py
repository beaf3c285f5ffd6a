"""The figures of bench/gpu_check.sh: training throughput, MFU, peak GPU memory and the demo's metrics per run.

    .venv/bin/python bench/gpu_report.py /tmp/gpu_check/bf16.yaml /tmp/gpu_check/qlora.yaml

MFU = model FLOP/s / the GPU's dense bf16 peak, with model FLOPs = 4 N per real token for LoRA-style methods (forward
2N, backward through the frozen base for the input gradients 2N; adapter weight gradients are negligible) and 6 N
for full fine-tuning (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", C = 6N per token), N = the base
model's parameters. Peaks (dense, no sparsity) from NVIDIA's data sheets; set GPU_PEAK_TFLOPS to override.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

# Dense bf16 tensor-core peaks in TFLOP/s (NVIDIA data sheets: H100/H200 SXM 989.5, A100 312, L4 121, A10 125).
PEAKS = {"H200": 989.5, "H100": 989.5, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def gpu_peak() -> tuple[str, float | None]:
    import torch

    name = torch.cuda.get_device_name(0)
    if os.environ.get("GPU_PEAK_TFLOPS"):
        return name, float(os.environ["GPU_PEAK_TFLOPS"])
    return name, next((peak for key, peak in PEAKS.items() if key in name), None)


def report(params_file: Path, peak: float | None) -> None:
    params = yaml.safe_load(params_file.read_text())
    paths = params["paths"]
    adapter, metrics_file = Path(paths["adapter"]), Path(paths["metrics"])
    times = params_file.with_suffix(".times")
    print(f"\n## {params_file.stem}: train.method = {params['train']['method']}")
    if times.is_file():
        print("stage wall times (s): " + ", ".join(
            f"{name} {seconds}" + ("" if rc == "0" else f" (FAILED {rc})")
            for name, seconds, rc in (line.split() for line in times.read_text().splitlines())))
    if not (adapter / "train_metrics.json").is_file():
        print("no train_metrics.json: training failed (see the stage log)")
        return
    m = json.loads((adapter / "train_metrics.json").read_text())
    record = adapter / ".run.json"  # timings and memory are in the run record, not in the adapter's files
    if record.is_file():
        m.update(json.loads(record.read_text()).get("metrics", {}))
    n = m.get("total_params") or 0
    flops_per_token = (6 if m.get("method") == "full" else 4) * n
    tok_s = m.get("tokens_per_s") or 0.0
    mfu = flops_per_token * tok_s / (peak * 1e12) if peak else None
    print(f"device {m.get('device')}, precision {m.get('precision')}, steps {m.get('steps')}, "
          f"step time {m.get('step_time_s')} s")
    print(f"real training tokens/s {tok_s:,.0f} (padding efficiency {m.get('padding_efficiency')}); "
          f"MFU {mfu:.4f}" if mfu is not None else "MFU n/a (unknown GPU peak: set GPU_PEAK_TFLOPS)")
    print(f"peak GPU memory {m.get('peak_gpu_mb')} MiB allocated; peak RSS {m.get('peak_rss_mb')} MiB; "
          f"trainable {m.get('trainable_params'):,} of {n:,} parameters")
    if metrics_file.is_file():
        s = json.loads(metrics_file.read_text())
        primary = s.get("primary_metric", "exact_match")
        ci = s.get("ci", {}).get("delta", {}).get(primary, {})
        print(f"{primary}: base {s['base'].get(primary):.3f} -> fine-tuned {s['fine_tuned'].get(primary):.3f} "
              f"(delta CI [{ci.get('low', float('nan')):+.3f}, {ci.get('high', float('nan')):+.3f}]); "
              f"loss {s['base']['loss']:.4f} -> {s['fine_tuned']['loss']:.4f}; forgetting {s.get('forgetting'):+.4f}; "
              f"gate {'passed' if s['gate']['passed'] else 'failed'}; evaluation device "
              f"{s.get('evaluated_on', 'not recorded')}")


def main(argv: list[str]) -> int:
    name, peak = gpu_peak()
    print(f"GPU {name}: dense bf16 peak {peak} TFLOP/s")
    for file in argv:
        report(Path(file), peak)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
