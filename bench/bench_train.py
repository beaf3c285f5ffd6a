"""B1, B2, B3: training throughput of the train stage against the classic recipe, padding efficiency, and the
model FLOP/s of a training step against the machine's fp32 matmul peak, measured side by side in one run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_train.py                     # 4 batches of 8, 3 rounds
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_train.py --batches 8 --rounds 5

Data: the 999 conversations of ../shared/datasets/alpaca_en_demo.json. B2 is measured over one whole epoch of
the train stage's data loader on all of them (collation only). The training sample of B1/B3 is --batches of
those epoch batches, picked at random (seeded): the rows the train stage would really batch together. Both
arms train the same base model (data/base_model: SmolLM2-135M-Instruct, from `python -m pipelines
fetch-model`) with the same LoRA config (params.yaml `train.lora`), learning rate and batch size on exactly
these rows, one pass:

    ours     the train stage's own pieces: pipelines.train.encode_example (chat template, loss on the assistant
             turn only, trailing template tokens dropped), build_trainer (TRL SFTTrainer, length-grouped
             batches padded to their longest row, TRL's fused LM head that projects only the label positions)
    classic  the recipe of most fine-tuning tutorials: the chat-rendered conversation (the same token ids,
             from pipelines.chat.tokenize_conversation) padded to max_length=512, labels = input_ids (pads
             -100), a plain transformers Trainer on peft's get_peft_model, default collator

Per arm and round: seconds inside optimizer steps (forward, backward, update; the data loader is outside),
real (non-pad) tokens and computed token slots of the batches. The arms alternate (ours first in odd rounds,
classic first in even rounds); each round also measures the fp32 matmul peak (torch.mm, the best of a
square 2048 and two model-shaped products) with the same thread count. Figures are medians over rounds:

    B1  ours real tokens/s / classic real tokens/s                                     target >= 3x
    B2  ours real tokens / computed token slots over a whole epoch                     target >= 0.95
    B3  ours model FLOP/s (4 * N * real tokens / step seconds, N = base parameters) / matmul peak
                                                                                       target >= 0.5
B3 counts 4N per token for LoRA (forward 2N, backward to the activations 2N; the frozen weights get no
gradient). It is "model FLOPs", as in MFU: the LM head (28M of the 135M parameters) is counted at every
position although the fused head computes it only at the label positions, so B3 credits that saving.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "bench" / "out" / "train"
ALPACA = REPO.parent / "shared" / "datasets" / "alpaca_en_demo.json"
CLASSIC_MAX_LENGTH = 512


def alpaca_conversations() -> list[list[dict[str, str]]]:
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))
    return [[{"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")},
             {"role": "assistant", "content": r["output"]}] for r in rows]


def epoch_batches(conversations: list[list[dict[str, str]]], params: Any, env: Any) -> tuple[list[list[int]], float]:
    """The train stage's batches over one epoch (as conversation indices) and their padding efficiency."""
    import torch
    from transformers import AutoTokenizer, set_seed

    from pipelines.train import EncodedSplit, build_trainer, encode_example, load_model, to_dataset

    base = params.path("base_model")
    tokenizer = AutoTokenizer.from_pretrained(base)
    examples = [encode_example(tokenizer, {"messages": c}, params.format.max_length)[0] for c in conversations]
    index = {tuple(e["input_ids"]): i for i, e in enumerate(examples)}
    trainer = build_trainer(load_model(base, params.train, env), tokenizer, to_dataset(EncodedSplit(examples),
                            is_eval=False), None, params.train, env, OUT / "epoch")
    set_seed(params.train.seed)  # the sampler draws from torch's global generator, as in trainer.train()
    batches = []
    for batch in trainer.get_train_dataloader():
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        batches.append([index[tuple(torch.masked_select(row, m).tolist())] for row, m in zip(ids, mask, strict=True)])
    real, slots, _ = trainer.data_collator.counts["train"]
    return batches, real / slots


def matmul_peak(threads: int, repeats: int = 5) -> float:
    """fp32 GFLOP/s of torch.mm: the best shape's median, same threads as training."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (1600, 576, 1536), (1600, 1536, 576)):  # square; MLP up / down
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        best = max(best, 2 * m * k * n / statistics.median(times) / 1e9)
    return best


def run_ours(conversations: list[list[dict[str, str]]], params: Any, env: Any, steps: int) -> dict[str, float]:
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer

    from pipelines.checkpoints import step_timer
    from pipelines.train import EncodedSplit, build_trainer, encode_example, load_model, to_dataset

    base = params.path("base_model")
    tokenizer = AutoTokenizer.from_pretrained(base)
    split = EncodedSplit([encode_example(tokenizer, {"messages": c}, params.format.max_length)[0]
                          for c in conversations])
    cfg = params.train.model_copy(update={"max_steps": steps, "logging_steps": 10_000, "save_steps": 10_000,
                                          "eval_steps": 10_000, "report_to": "none"})
    model = load_model(base, cfg, env)
    timer = step_timer()
    trainer = build_trainer(model, tokenizer, to_dataset(split, is_eval=False), None, cfg, env, OUT / "ours",
                            callbacks=[timer])
    # The rows come in the epoch's own batches, in order: the length-grouped sampler would re-draw batches from
    # 32 rows with a megabatch of one batch (transformers sizes it by the dataset), not as the stage batches them.
    trainer._get_train_sampler = lambda dataset=None: SequentialSampler(dataset)
    trainer.args.disable_tqdm = True
    trainer.train()
    real, slots, _ = trainer.data_collator.counts["train"]
    # base parameters (a tied embedding / LM head counted once), without the adapter's
    total = sum(p.numel() for name, p in trainer.model.named_parameters() if "lora_" not in name)
    return {"seconds": timer.seconds, "real": real, "slots": slots, "params": total}


def run_classic(conversations: list[list[dict[str, str]]], params: Any, env: Any, steps: int) -> dict[str, float]:
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

    from pipelines.chat import tokenize_conversation
    from pipelines.checkpoints import step_timer
    from pipelines.methods import peft_config

    base = params.path("base_model")
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The tokens both arms see come from pipelines.chat; only the padding (to max_length) is the recipe's.
    rows = [tokenize_conversation(tokenizer, c).input_ids[:CLASSIC_MAX_LENGTH] for c in conversations]
    input_ids = [ids + [tokenizer.pad_token_id] * (CLASSIC_MAX_LENGTH - len(ids)) for ids in rows]
    attention = [[1] * len(ids) + [0] * (CLASSIC_MAX_LENGTH - len(ids)) for ids in rows]
    labels = [[t if m else -100 for t, m in zip(ids, mask, strict=True)]
              for ids, mask in zip(input_ids, attention, strict=True)]
    dataset = Dataset.from_dict({"input_ids": input_ids, "attention_mask": attention, "labels": labels})
    counts = [0, 0]

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = default_data_collator(features)
        counts[0] += int(batch["attention_mask"].sum())
        counts[1] += batch["input_ids"].numel()
        return batch

    cfg = params.train
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True),
                           peft_config(cfg, base))
    args = TrainingArguments(
        output_dir=str(OUT / "classic"), per_device_train_batch_size=cfg.batch_size, max_steps=steps,
        learning_rate=cfg.learning_rate, seed=cfg.seed, use_cpu=True, report_to=[], save_strategy="no",
        logging_steps=10_000, disable_tqdm=True, dataloader_pin_memory=False,
    )
    timer = step_timer()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[timer])
    trainer.train()
    return {"seconds": timer.seconds, "real": counts[0], "slots": counts[1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=4, help="epoch batches each arm trains on (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; figures are medians (default 3)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from pipelines.config import load_params
    from pipelines.train_env import TrainEnv

    torch.set_num_threads(args.threads)
    params = load_params(REPO / "params.yaml")
    if not (params.path("base_model") / "config.json").is_file():
        print("no base model at data/base_model: run `.venv/bin/python -m pipelines fetch-model` first")
        return 2
    if not ALPACA.is_file():
        print(f"missing {ALPACA} (the shared datasets folder beside the repository)")
        return 2
    env = TrainEnv.resolve(device="cpu", num_threads=args.threads)
    print(f"threads {args.threads}, batch {params.train.batch_size}, {args.batches} batches per arm, "
          f"{args.rounds} rounds; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    conversations = alpaca_conversations()
    batches, efficiency = epoch_batches(conversations, params, env)
    picked = random.Random(args.seed).sample(batches, args.batches)
    conversations = [conversations[i] for batch in picked for i in batch]
    steps = len(picked)
    print(f"  epoch: {len(batches)} batches, padding efficiency {efficiency:.4f}; training on {len(conversations)} "
          f"rows of {steps} of them", flush=True)

    results: dict[str, list[dict[str, float]]] = {"ours": [], "classic": []}
    peaks: list[float] = []
    for r in range(args.rounds):
        peaks.append(matmul_peak(args.threads))
        order = ("ours", "classic") if r % 2 == 0 else ("classic", "ours")
        for arm in order:
            fn = run_ours if arm == "ours" else run_classic
            res = fn(conversations, params, env, steps)
            res["tok_s"] = res["real"] / res["seconds"]
            results[arm].append(res)
            print(f"  round {r + 1} {arm:8s} {res['seconds']:7.1f} s in steps, {res['real']:6d} real tokens / "
                  f"{res['slots']:6d} slots, {res['tok_s']:6.1f} real tok/s (load {os.getloadavg()[0]:.2f})",
                  flush=True)
        print(f"  round {r + 1} fp32 matmul peak {peaks[-1]:.1f} GFLOP/s", flush=True)

    ratio = statistics.median(o["tok_s"] / c["tok_s"] for o, c in zip(results["ours"], results["classic"],
                                                                       strict=True))
    ours_tok, classic_tok = (statistics.median(x["tok_s"] for x in results[a]) for a in ("ours", "classic"))
    sample_eff = statistics.median(x["real"] / x["slots"] for x in results["ours"])
    classic_eff = statistics.median(x["real"] / x["slots"] for x in results["classic"])
    n_params = results["ours"][0]["params"]
    mfu = statistics.median(4 * n_params * o["tok_s"] / 1e9 / p for o, p in zip(results["ours"], peaks, strict=True))
    achieved = 4 * n_params * ours_tok / 1e9
    load = os.getloadavg()[0]
    print(f"B1 train real tokens/s ours/classic: {ratio:.2f}x (median of {args.rounds}; {ours_tok:.1f} vs "
          f"{classic_tok:.1f} tok/s) (target >= 3x)")
    print(f"B2 padding efficiency ours: {efficiency:.4f} real/slots over an epoch of {len(batches)} batches "
          f"(the trained sample {sample_eff:.4f}; classic {classic_eff:.4f}) (target >= 0.95)")
    print(f"B3 model FLOP/s / fp32 matmul peak: {mfu:.2f} ({achieved:.1f} of {statistics.median(peaks):.1f} "
          f"GFLOP/s, N = {n_params / 1e6:.1f}M, 4N per token) (target >= 0.5)")
    print(f"load average at end {load:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
