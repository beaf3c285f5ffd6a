"""B6: evaluation generation, batched vs one prompt at a time (pipelines.evaluate.generate_ids).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_generate.py                  # 48 prompts, 3 repeats
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_generate.py --prompts 16 --repeats 1   # a quick look

Model: the real base model at paths.base_model (SmolLM2-135M-Instruct, made by
`.venv/bin/python -m pipelines fetch-model`), fp32 on CPU, loaded the way the evaluate stage loads it.
When it is missing, a tiny random 2-layer Llama (the test suite's) is built under bench/out/ and used
instead, with a warning: its figures say little about the real model.

Prompts: the first `--prompts` rows of the test split (paths.splits/test.jsonl), as token ids exactly as
the evaluate stage builds them (pipelines.evaluate.build_examples -> pipelines.chat.tokenize_prompt: the
chat template up to the last trained assistant turn); the probe set stands in when the split is missing.

Both arms call the same function, generate_ids (greedy, left padding, cut at the first stop token) with
evaluate.max_new_tokens: "batched" with `--batch-size` (default evaluate.batch_size from params.yaml),
"sequential" with batch_size=1. The prompts are grouped into the stage's own length-sorted batches
(pipelines.evaluate._length_batches); for each batch, one arm generates its prompts (batched: that one
batch; sequential: its prompts one at a time), then the other arm the same prompts, so the arms alternate
every few seconds and load from other work hits both alike (who goes first alternates between repeats).
`--repeats` passes after one unmeasured warm-up batch; each figure is the median (the ratio: the median of
the per-repeat ratios). Tokens/s counts the
generated tokens each prompt keeps (pads, the stop token and anything after it are not counted), so the
padding the batched arm computes counts against it. One more pass with max_new_tokens=1 (skip it with
`--no-breakdown`) splits each arm's time into the prompt pass (compute-bound: as many FLOPs batched or
not) and the decoding steps (memory-bound at batch 1: every step reads all the weights), which is where
batching pays. Outputs are compared token for token and as decoded text; the share of prompts whose two
outputs are identical is printed, with the first difference if any (left padding in fp32 can change the
last bits of a logit and so, rarely, a greedy choice).

About 7 minutes on an idle 2-core machine (the sequential arm is ~80% of it); much longer under load:
with more runnable threads than cores, OpenMP's 2 threads wait on each other at every operation.

The thread count is fixed (`--threads`, default $OMP_NUM_THREADS or 2: torch.set_num_threads and
OMP_NUM_THREADS); the load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "generate"
sys.path.insert(0, str(ROOT))

from common import arg_parser, loadavg  # noqa: E402  (bench/ is the script's folder, first on sys.path)


def _parse() -> argparse.Namespace:
    ap = arg_parser(__doc__)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"),
                    help="params file (default: the repo's params.yaml)")
    ap.add_argument("--model", default=None, help="model folder (default: paths.base_model of the params file)")
    ap.add_argument("--prompts", type=int, default=48, help="test-split prompts to generate for (default 48)")
    ap.add_argument("--batch-size", type=int, default=None, help="batched arm batch size (default evaluate.batch_size)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default evaluate.max_new_tokens")
    ap.add_argument("--repeats", type=int, default=3, help="alternating repeats of each arm (default 3)")
    ap.add_argument("--no-breakdown", action="store_true",
                    help="skip the extra max_new_tokens=1 run per arm that splits prompt pass from decoding")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 2),
                    help="torch threads (default $OMP_NUM_THREADS or 2)")
    return ap.parse_args()


def _tiny_model() -> Path:
    """The test suite's tiny random Llama, built once under bench/out/generate/."""
    folder = OUT / "tiny_model"
    if not (folder / "config.json").exists():
        from tests.conftest import build_tiny_model

        build_tiny_model(folder)
    return folder


def main() -> None:
    args = _parse()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # the stage's progress bars would garble the output
    print(f"load average at start: {loadavg()}  cpus: {os.cpu_count()}  threads: {args.threads}")

    import torch
    from transformers import AutoTokenizer

    from pipelines.config import load_params
    from pipelines.evaluate import _length_batches, _load_causal_lm, build_examples, generate_ids, load_probe
    from pipelines.io import read_jsonl

    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    batch_size = args.batch_size or params.evaluate.batch_size
    max_new = args.max_new_tokens or params.evaluate.max_new_tokens

    model_dir = Path(args.model) if args.model else params.path("base_model")
    if not any(model_dir.glob("*.safetensors")):
        print(f"WARNING: no model at '{model_dir}' (make it with `.venv/bin/python -m pipelines fetch-model`); "
              "falling back to a tiny random 2-layer Llama: these figures do NOT describe the real model")
        model_dir = _tiny_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = _load_causal_lm(model_dir, trust_remote_code=False)

    test_path = params.path("splits") / "test.jsonl"
    if test_path.is_file():
        rows, source = list(read_jsonl(test_path)), str(test_path.relative_to(params.root))
    else:
        print(f"WARNING: no test split at '{test_path}' (run `.venv/bin/python -m pipelines split`); "
              "using the shipped probe set instead")
        rows, source = load_probe(), "the probe set"
    prompts = [e.prompt_ids for e in build_examples(rows[: args.prompts], tokenizer)]
    lengths = [len(p) for p in prompts]
    print(f"model: {model_dir}  prompts: {len(prompts)} from {source} (prompt tokens: min {min(lengths)}, "
          f"median {statistics.median(lengths):.0f}, max {max(lengths)})  batch size: {batch_size}  "
          f"max_new_tokens: {max_new}")

    generate_ids(model, tokenizer, prompts[:batch_size], batch_size=batch_size, max_new_tokens=4)  # warm-up

    arms = {"batched": batch_size, "sequential": 1}
    # The stage's own batches (length-sorted over all prompts). Each arm generates one batch's prompts
    # (batched: exactly that batch; sequential: its prompts one at a time), then the other arm does the same
    # prompts: the arms alternate every few seconds, so load from other work hits both alike.
    batches = _length_batches(lengths, batch_size)

    def timed_pass(max_tokens: int, order: list[str]) -> tuple[dict[str, float], dict[str, list[list[int]]]]:
        spent = {arm: 0.0 for arm in arms}
        out: dict[str, list[list[int]]] = {arm: [[] for _ in prompts] for arm in arms}
        for batch in batches:
            for arm in order:
                started = time.perf_counter()
                ids = generate_ids(model, tokenizer, [prompts[i] for i in batch], batch_size=arms[arm],
                                   max_new_tokens=max_tokens, desc=arm)
                spent[arm] += time.perf_counter() - started
                for i, row in zip(batch, ids, strict=True):
                    out[arm][i] = row
        return spent, out

    seconds: dict[str, list[float]] = {a: [] for a in arms}
    outputs: dict[str, list[list[int]]] = {}
    for r in range(args.repeats):
        order = list(arms) if r % 2 == 0 else list(arms)[::-1]  # who goes first alternates too
        spent, out = timed_pass(max_new, order)
        for arm in arms:
            seconds[arm].append(spent[arm])
            if arm in outputs and outputs[arm] != out[arm]:
                print(f"note: {arm} outputs changed between repeats (not deterministic)")
            outputs[arm] = out[arm]

    tokens = {arm: sum(len(row) for row in outputs[arm]) for arm in arms}
    rate = {arm: tokens[arm] / statistics.median(seconds[arm]) for arm in arms}
    for arm in arms:
        print(f"{arm}: {tokens[arm]} generated tokens; seconds per run: "
              f"{' '.join(f'{s:.1f}' for s in seconds[arm])}; {rate[arm]:.1f} tok/s (median)")
    per_repeat = [s / b for b, s in zip(seconds["batched"], seconds["sequential"], strict=True)]
    print(f"ratio per repeat: {' '.join(f'{x:.2f}x' for x in per_repeat)}")
    if not args.no_breakdown:  # where the time goes: the prompt pass vs the token-by-token decoding
        first, _ = timed_pass(1, list(arms))
        decode = {arm: sum(max(len(row) - 1, 0) for row in outputs[arm])
                  / max(statistics.median(seconds[arm]) - first[arm], 1e-9) for arm in arms}
        print(f"breakdown (one pass with max_new_tokens=1 = the prompt pass + 1 token): prompt pass "
              f"{first['batched']:.1f} s batched vs {first['sequential']:.1f} s sequential, i.e. "
              f"{100 * first['batched'] / statistics.median(seconds['batched']):.0f}% vs "
              f"{100 * first['sequential'] / statistics.median(seconds['sequential']):.0f}% of a run "
              f"({sum(lengths)} prompt tokens vs {tokens['batched']} generated); decoding alone "
              f"{decode['batched']:.0f} vs {decode['sequential']:.0f} tok/s = "
              f"{decode['batched'] / decode['sequential']:.1f}x")

    batched, sequential = outputs["batched"], outputs["sequential"]
    same_ids = [a == b for a, b in zip(batched, sequential, strict=True)]
    texts = {arm: [tokenizer.decode(r, skip_special_tokens=True).strip() for r in outputs[arm]] for arm in arms}
    same_text = [a == b for a, b in zip(texts["batched"], texts["sequential"], strict=True)]
    n = len(prompts)
    differing = [i for i, same in enumerate(same_ids) if not same]
    if differing:
        i = differing[0]
        row_b, row_s = batched[i], sequential[i]
        k = next((j for j, (x, y) in enumerate(zip(row_b, row_s, strict=False)) if x != y), min(len(row_b), len(row_s)))
        print(f"{len(differing)} of {n} prompts differ token for token ({n - sum(same_text)} as text); first: "
              f"prompt #{i} ({lengths[i]} tokens), from generated token {k} on:\n"
              f"  batched:    {texts['batched'][i]!r}\n  sequential: {texts['sequential'][i]!r}")
    ratio = statistics.median(per_repeat)  # paired: each repeat's two arms ran interleaved
    share = 100.0 * sum(same_ids) / n
    print(f"B6 batched/sequential generation tokens/s: {ratio:.2f}x (median of {args.repeats}; "
          f"{rate['batched']:.0f} vs {rate['sequential']:.0f} tok/s, batch {batch_size}, {args.threads} threads) "
          f"identical outputs {share:.1f}% ({sum(same_ids)}/{n} token for token, "
          f"{100.0 * sum(same_text) / n:.1f}% as text) (target >= 5x, >= 99%)")
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
