"""Padding-free vs padded batches on the real base model: exactness (summed loss, gradients) and step time.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_padding_free.py                  # the demo's train split
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_padding_free.py --batches 4 --rounds 3 --splits data/splits

Both arms are the train stage's own trainer (pipelines.train.build_trainer, LoRA from params.yaml, the CPU LM head)
on the same batches of the train split (length-grouped as the stage draws them), differing only in
train.padding_free: padded (attention mask, rows padded to the batch's longest) or padding-free (one flattened row,
position ids restarting at each row, no attention mask; transformers then masks attention per row). For each
batch it prints the summed loss (nats over the batch's label tokens, through TRL's compute_loss) of both arms, the
largest gradient difference relative to the largest gradient, and the forward + backward seconds of each arm
(arms alternate; medians over rounds). The machine's load average is printed: timings under load are noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "bench" / "out" / "padding_free"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--splits", default=None, help="a splits folder (default: paths.splits of --params)")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer, set_seed

    from pipelines.config import load_params
    from pipelines.io import read_jsonl
    from pipelines.train import build_trainer, encode_split, load_model, to_dataset
    from pipelines.train_env import TrainEnv

    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    env = TrainEnv.resolve(device="cpu", num_threads=args.threads)
    base = params.path("base_model")
    tokenizer = AutoTokenizer.from_pretrained(base)
    splits = Path(args.splits) if args.splits else params.path("splits")
    split = encode_split(tokenizer, list(read_jsonl(splits / "train.jsonl")), params.format.max_length, "train")
    dataset = to_dataset(split, is_eval=False)
    arms = {}
    for padding_free in (False, True):
        cfg = params.train.model_copy(update={"padding_free": padding_free})
        trainer = build_trainer(load_model(base, cfg, env), tokenizer, dataset, None, cfg, env, OUT)
        set_seed(cfg.seed)  # the sampler draws from torch's global generator, as in trainer.train()
        loader = iter(trainer.get_train_dataloader())
        arms[padding_free] = trainer, [next(loader) for _ in range(args.batches)]
    print(f"threads {args.threads}, batch {params.train.batch_size}, {args.batches} batches, {args.rounds} rounds, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for b in range(args.batches):
        sums, grads = {}, {}
        for r in range(args.rounds):
            for padding_free in ((False, True) if r % 2 == 0 else (True, False)):
                trainer, batches = arms[padding_free]
                batch = dict(batches[b])
                n = int((batch["labels"][:, 1:] != -100).sum())
                trainer.model.train()
                trainer.model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=n) * n  # summed over labels
                loss.backward()
                seconds[padding_free].append(time.perf_counter() - start)
                sums[padding_free] = loss.item()
                grads[padding_free] = {k: p.grad.clone() for k, p in trainer.model.named_parameters()
                                       if p.grad is not None}
        scale = max(g.abs().max().item() for g in grads[False].values())
        diff = max((grads[False][k] - grads[True][k]).abs().max().item() for k in grads[False])
        rows, width = arms[False][1][b]["input_ids"].shape
        print(f"batch {b}: {rows} rows x {width} padded; summed loss padded {sums[False]:.3f}, padding-free "
              f"{sums[True]:.3f}; max |grad diff| {diff:.2e} ({diff / scale:.1e} of the largest gradient)")
    padded, flat = statistics.median(seconds[False]), statistics.median(seconds[True])
    print(f"forward + backward per batch (median): padded {padded:.2f} s, padding-free {flat:.2f} s "
          f"(padding-free / padded = {flat / padded:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
