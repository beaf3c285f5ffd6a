"""B7: serving, C concurrent clients vs one client at a time, on llama-server as `python -m pipelines serve` runs it.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_serve.py                        # f16 GGUF, 8 clients x 10 requests
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_serve.py --gguf Q8_0 --clients 4 --requests 5

The server is started from the project's own plan (pipelines.serve.llama_cpp_plan: the export-gguf stage's GGUF,
`--parallel` = the number of clients, continuous batching) on a free 127.0.0.1 port, and stopped at the end.
Requests go through the official `openai` client to /v1/chat/completions: the first test-split conversations
(paths.splits/test.jsonl, up to the last assistant turn), greedy, `--max-tokens` each.

Two arms send the same clients x requests requests: "sequential" one after another from one client, "concurrent"
from `--clients` threads at once. They alternate for `--repeats` rounds after one unmeasured warm-up request, so
load from other work hits both alike. Printed per arm: requests, errors, latency p50/p95 (s, per request),
completion tokens/s (from each response's usage) and requests/s; then the concurrent/sequential ratio of
completion tokens/s (target >= 1.5x on 2 cores: batching decodes several sequences per pass over the weights).
Loops are bounded (clients x requests x repeats requests per arm) and only a loopback address is contacted.
"""

from __future__ import annotations

import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import arg_parser, loadavg  # noqa: E402
from pipelines import llama_cpp, serve  # noqa: E402
from pipelines.config import load_params  # noqa: E402
from pipelines.io import read_jsonl  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def one_request(client, messages, max_tokens: int) -> tuple[float, int, bool]:
    """(seconds, completion tokens, ok) of one greedy chat completion."""
    started = time.perf_counter()
    try:
        reply = client.chat.completions.create(model=serve.MERGED_NAME, messages=messages, max_tokens=max_tokens,
                                               temperature=0)
        return time.perf_counter() - started, reply.usage.completion_tokens, True
    except Exception:  # noqa: BLE001 (an error is counted, the benchmark goes on)
        return time.perf_counter() - started, 0, False


def run_arm(client, jobs: list[list[dict]], max_tokens: int, workers: int) -> dict:
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda m: one_request(client, m, max_tokens), jobs))
    wall = time.perf_counter() - started
    return {"wall": wall, "latencies": [r[0] for r in results], "tokens": sum(r[1] for r in results),
            "errors": sum(not r[2] for r in results), "requests": len(results)}


def main() -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--gguf", default="f16", help="f16, Q8_0, ... or a .gguf file (default f16)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=10, help="requests per client per arm and round")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="measured rounds of both arms")
    parser.add_argument("--threads", type=int, default=None, help="llama-server threads (default: its own)")
    args = parser.parse_args()
    from openai import OpenAI

    params = load_params(args.params)
    rows = list(read_jsonl(params.path("splits") / "test.jsonl"))[: args.clients]
    prompts = [r["messages"][: max(i for i, m in enumerate(r["messages"]) if m["role"] == "assistant")] for r in rows]
    jobs = [prompts[i % len(prompts)] for i in range(args.clients * args.requests)]
    plan = serve.llama_cpp_plan(params, gguf=args.gguf, adapters=[], parallel=args.clients, ctx_per_slot=2048,
                                threads=args.threads)
    print(f"load average at start: {loadavg()}")
    print(f"llama-server {' '.join(plan.args)}")
    totals: dict[str, list[dict]] = {"sequential": [], "concurrent": []}
    with llama_cpp.LlamaServer(plan.program, plan.args) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
        one_request(client, prompts[0], args.max_tokens)  # warm-up: page in the weights
        for round_ in range(args.repeats):
            order = ["sequential", "concurrent"] if round_ % 2 == 0 else ["concurrent", "sequential"]
            for arm in order:
                totals[arm].append(run_arm(client, jobs, args.max_tokens, 1 if arm == "sequential" else args.clients))
    rates = {}
    print(f"{'arm':<11} {'requests':>8} {'errors':>6} {'p50 s':>7} {'p95 s':>7} {'tok/s':>7} {'req/s':>6}")
    for arm, runs in totals.items():
        latencies = [x for r in runs for x in r["latencies"]]
        wall = sum(r["wall"] for r in runs)
        tokens, requests = sum(r["tokens"] for r in runs), sum(r["requests"] for r in runs)
        rates[arm] = statistics.median(r["tokens"] / r["wall"] for r in runs)
        print(f"{arm:<11} {requests:>8} {sum(r['errors'] for r in runs):>6} {percentile(latencies, 50):>7.2f} "
              f"{percentile(latencies, 95):>7.2f} {tokens / wall:>7.1f} {requests / wall:>6.2f}")
    print(f"concurrent/sequential completion tokens/s: {rates['concurrent'] / rates['sequential']:.2f}x "
          f"({args.clients} clients, --parallel {args.clients}, target >= 1.5x)")
    print(f"load average at end: {loadavg()}")
    return 0 if all(r["errors"] == 0 for runs in totals.values() for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
