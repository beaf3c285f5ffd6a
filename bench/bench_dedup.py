"""Near-duplicate detection: pipelines.dedup vs a plain datasketch MinHash + MinHashLSH baseline.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_dedup.py                 # 20k docs, 5 runs each
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_dedup.py --docs 5000 --runs 3
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_dedup.py --scale 1000000  # peak memory, ours only

Data: `--docs` documents from a seeded generator (Zipf-distributed words from a 20k-word vocabulary,
20-200 words each, like short chat examples); 10% of them are near duplicates of a random original
made by 1-8 word edits (substitute, insert, delete), so their similarity spreads around the threshold.
Ground truth: the pairs inside one family (an original and its copies) whose exact Jaccard of word
3-shingles, computed here independently with Python sets of word tuples, is >= the threshold. Random
originals share no 3-shingle in practice; any cross-family pair a method reports counts against it.

Both methods run in this process, single-threaded (OMP_NUM_THREADS=1), alternating ours / baseline
`--runs` times; the figure is the median. docs/s per core = documents / CPU seconds of this process
(time.process_time), so other load on the machine does not inflate it; wall-clock docs/s and the load
average are printed too. The baseline builds word 3-shingles, MinHash.bulk (SHA-1 per shingle, the
datasketch default), MinHashLSH with the same threshold, then queries every document; "plain" counts
every LSH candidate as a duplicate, "+est" keeps candidates whose MinHash estimate is >= threshold. It
runs twice: with datasketch's own (bands, rows) for the threshold, and with ours (lsh_params), so the
speed ratio of the second compares implementations at equal LSH recall.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from datasketch import MinHash, MinHashLSH  # noqa: E402

from pipelines.dedup import conversation_text, exact_key, lsh_params, near_duplicate_pairs  # noqa: E402

Pair = tuple[int, int]


def make_corpus(n_docs: int, dup_share: float = 0.1, seed: int = 0) -> tuple[list[str], list[int]]:
    """Texts and the family (index of the original) of each text."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(20_000)]
    weights = [1.0 / (r + 1) for r in range(len(vocab))]  # Zipf: a few very common words, like real text
    n_dups = int(n_docs * dup_share)
    texts = [" ".join(rng.choices(vocab, weights, k=rng.randint(20, 200))) for _ in range(n_docs - n_dups)]
    family = list(range(len(texts)))
    for _ in range(n_dups):
        src = rng.randrange(len(family))
        root = family[src]
        words = texts[src].split()
        for _ in range(rng.randint(1, 8)):
            op, pos = rng.random(), rng.randrange(len(words))
            if op < 0.5:
                words[pos] = rng.choice(vocab)
            elif op < 0.75:
                words.insert(pos, rng.choice(vocab))
            elif len(words) > 5:
                del words[pos]
        texts.append(" ".join(words))
        family.append(root)
    order = list(range(len(texts)))
    rng.shuffle(order)  # copies are not all at the end
    return [texts[i] for i in order], [family[i] for i in order]  # family: a label per text


def ground_truth(texts: list[str], family: list[int], threshold: float) -> set[Pair]:
    groups: dict[int, list[int]] = {}
    for i, f in enumerate(family):
        groups.setdefault(f, []).append(i)
    shingles = {}
    truth = set()
    for members in groups.values():
        for i in members:
            w = texts[i].split()
            shingles[i] = {tuple(w[k : k + 3]) for k in range(max(1, len(w) - 2))}
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                i, j = sorted((members[a], members[b]))
                si, sj = shingles[i], shingles[j]
                if len(si & sj) / len(si | sj) >= threshold:
                    truth.add((i, j))
    return truth


def ours(texts: list[str], threshold: float) -> set[Pair]:
    return {(i, j) for i, j, _ in near_duplicate_pairs(texts, threshold, num_perm=128, shingle_size=3)}


def baseline(texts: list[str], threshold: float, params: tuple[int, int] | None) -> tuple[set[Pair], set[Pair]]:
    """Plain datasketch: (every LSH candidate pair, candidates whose MinHash estimate >= threshold).

    params: (bands, rows) of the LSH; None = datasketch's own choice for the threshold.
    """
    shingle_lists = []
    for t in texts:
        w = t.split()
        shingle_lists.append([" ".join(w[k : k + 3]).encode() for k in range(max(1, len(w) - 2))])
    minhashes = MinHash.bulk(shingle_lists, num_perm=128)
    lsh = MinHashLSH(threshold=threshold, num_perm=128, params=params)
    with lsh.insertion_session() as session:
        for i, m in enumerate(minhashes):
            session.insert(i, m, check_duplication=False)
    plain, estimated = set(), set()
    for i, m in enumerate(minhashes):
        for j in lsh.query(m):
            if j > i:
                plain.add((i, j))
                if m.jaccard(minhashes[j]) >= threshold:
                    estimated.add((i, j))
    return plain, estimated


def prf(found: set[Pair], truth: set[Pair]) -> tuple[float, float, float]:
    tp = len(found & truth)
    p = tp / len(found) if found else 1.0
    r = tp / len(truth) if truth else 1.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    """(result, CPU seconds, wall seconds)."""
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c, time.perf_counter() - w


def exact_rate(texts: list[str], runs: int) -> tuple[float, float]:
    """docs/s per core (CPU) and wall of exact dedup on chat rows: conversation_text + exact_key + a seen-set."""
    rows = [
        {"messages": [{"role": "user", "content": t[: len(t) // 2]},
                      {"role": "assistant", "content": t[len(t) // 2 :]}]}
        for t in texts
    ]

    def dedup() -> int:
        seen: set[str] = set()
        for row in rows:
            seen.add(exact_key(conversation_text(row)))
        return len(seen)

    cpu, wall = [], []
    for _ in range(runs):
        _, c, w = timed(dedup)
        cpu.append(c)
        wall.append(w)
    return len(rows) / statistics.median(cpu), len(rows) / statistics.median(wall)


def scale(n_docs: int, threshold: float) -> None:
    """Peak memory of ours on n short documents (10-30 words)."""
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(50_000)]
    texts = [" ".join(rng.choices(vocab, k=rng.randint(10, 30))) for _ in range(n_docs)]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text_mb = sum(map(len, texts)) / 1e6
    pairs, cpu, wall = timed(lambda: near_duplicate_pairs(texts, threshold))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"scale docs: {n_docs}  text_MB: {text_mb:.0f}  pairs: {len(pairs)}")
    print(f"scale docs/s per core: {n_docs / cpu:.0f}  wall docs/s: {n_docs / wall:.0f}")
    print(f"scale peak RSS MB: {peak:.0f} (before the call: {base_rss:.0f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=0.85)
    ap.add_argument("--scale", type=int, default=0, help="only measure ours on this many short docs")
    args = ap.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}  cpus: {os.cpu_count()}")
    if args.scale:
        scale(args.scale, args.threshold)
        return
    texts, family = make_corpus(args.docs)
    truth = ground_truth(texts, family, args.threshold)
    print(f"docs: {len(texts)}  threshold: {args.threshold}  true pairs: {len(truth)}  "
          f"mean words: {np.mean([len(t.split()) for t in texts]):.0f}")
    ours(texts[:200], args.threshold)  # warm caches (permutations, power tables, LSH parameters)
    same = lsh_params(args.threshold, 128)
    variants: dict[str, Callable[[], object]] = {
        "ours": lambda: ours(texts, args.threshold),
        "datasketch default-lsh": lambda: baseline(texts, args.threshold, None),
        f"datasketch lsh{same}": lambda: baseline(texts, args.threshold, same),
    }
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    found: dict[str, object] = {}
    for _ in range(args.runs):  # alternate, so drifting load hits every variant alike
        for name, fn in variants.items():
            found[name], c, w = timed(fn)
            cpu[name].append(c)
            wall[name].append(w)
    rate = {k: len(texts) / statistics.median(v) for k, v in cpu.items()}
    wall_rate = {k: len(texts) / statistics.median(v) for k, v in wall.items()}
    for name in variants:
        print(f"{name} docs/s per core: {rate[name]:.0f}  (wall {wall_rate[name]:.0f}; "
              f"cpu s per run: {' '.join(f'{x:.2f}' for x in cpu[name])})")
    for name in list(variants)[1:]:
        print(f"speed ratio ours / {name}: {rate['ours'] / rate[name]:.2f}x")
    scored = [("ours", found["ours"])]
    for name in list(variants)[1:]:
        plain, estimated = found[name]
        scored += [(f"{name} plain", plain), (f"{name} +est", estimated)]
    for name, pairs in scored:
        p, r, f = prf(pairs, truth)
        print(f"{name} precision/recall/F1: {p:.4f} / {r:.4f} / {f:.4f}  (pairs {len(pairs)})")
    per_core, per_wall = exact_rate(texts, args.runs)
    print(f"exact dedup docs/s per core: {per_core:.0f}  (wall {per_wall:.0f})")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
