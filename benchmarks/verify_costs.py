"""What one `llama_decode` call of n rows of one sequence costs, by rows and by context.

The speculator's cost model (`kvchat.engine.speculation.call_cost`) comes from this
run. llama.cpp's CPU flash attention has two kernels: below 64 rows it works row by
row (each row pays for every cached cell it sees, at a high price per cell), from
64 rows up it works in 64x64 tiles (matrix products). So the cost of a call jumps
*down* at 64 rows, and the row-by-row price grows with the context: after 9,000
cached tokens, 8 rows cost about what 64 do. For each context length the script
evaluates a history, then times calls of each row count (every row asking for
logits, as a verify does; the rows removed after each call, the row counts
interleaved so drift hits all alike) and fits, per kernel,
``seconds = base + rows * per_row + attended * context * per_cell``, where
`attended` is the rows, padded to whole 64-row tiles for the tiled kernel (65 rows
cost two tiles of attention).

    python benchmarks/verify_costs.py [--contexts 400 2000 4000 9000] [--reps 3]

Writes benchmarks/results/verify_costs.json: the timings, the fit and how far each
timing lies from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from kvchat.engine import EngineSettings
from kvchat.engine.speculation import TILE_ROWS, attended_rows
from kvchat.llama import Batch, Context, Model
from kvchat.models import resolve

sys.path.insert(0, str(Path(__file__).parent))
from bare_backend import evaluate, row_call_seconds  # noqa: E402
from machine_info import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "verify_costs.json"
ROWS = (1, 2, 3, 5, 9, 17, 33, 49, 63, 64, 65, 80, 96, 128)


def history(n: int) -> list[int]:
    """A deterministic token history (ordinary vocabulary ids)."""
    return [(i * 7919) % 20000 + 100 for i in range(n)]


def timings(model: Model, contexts: list[int], reps: int) -> dict[int, dict[int, float]]:
    """Median seconds of a call of each row count after each context length."""
    settings = EngineSettings(n_ctx=max(contexts) + max(ROWS) + 512)
    tokens = history(max(contexts) + max(ROWS))
    result: dict[int, dict[int, float]] = {}
    with Context(model, settings.context_params(model)) as ctx, Batch(settings.n_batch) as batch:
        for previous, context in zip([0, *sorted(contexts)], sorted(contexts), strict=False):
            evaluate(ctx, batch, tokens[:context], start=previous)  # the history grows context by context
            result[context] = row_call_seconds(ctx, batch, tokens[context:], context, ROWS, reps)
            print(f"after {context:>6} cached: " + ", ".join(
                f"{rows}: {1000 * s:.0f} ms" for rows, s in result[context].items()), flush=True)
    return result


KERNELS = {"one_row": (1, 1), "row_by_row": (2, TILE_ROWS - 1), "tiled": (TILE_ROWS, max(ROWS))}
"""Row ranges fitted apart: one row takes llama.cpp's matrix-vector path, 2 to 63 the
row-by-row attention, 64 and more the tiled one."""


def fit(costs: dict[int, dict[int, float]], kernel: str) -> dict[str, float]:
    """Least squares (of relative errors) of ``base + rows * per_row + attended * context * per_cell``
    over the calls of one of `KERNELS` (one row: ``base + context * per_cell``)."""
    low, high = KERNELS[kernel]
    points = [(context, rows, s) for context, by_rows in costs.items() for rows, s in by_rows.items()
              if low <= rows <= high]
    # Relative errors weigh alike: a 40 ms call matters as much as a 7 s one.
    if low == high:  # rows and base cannot be told apart
        a = np.array([[1.0 / s, attended_rows(rows) * context / s] for context, rows, s in points])
        (base, per_cell), *_ = np.linalg.lstsq(a, np.ones(len(points)), rcond=None)
        per_row = 0.0
    else:
        a = np.array([[1.0 / s, rows / s, attended_rows(rows) * context / s] for context, rows, s in points])
        (base, per_row, per_cell), *_ = np.linalg.lstsq(a, np.ones(len(points)), rcond=None)
    worst = max(abs(base + rows * per_row + attended_rows(rows) * context * per_cell - s) / s for context, rows, s in points)
    return {"base_ms": 1000 * base, "per_row_ms": 1000 * per_row, "per_cell_us": 1e6 * per_cell,
            "worst_relative_error": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--contexts", type=int, nargs="+", default=[400, 2000, 4000, 9000])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--refit", action="store_true", help="fit the timings already in --out again (no model run)")
    args = parser.parse_args()
    if args.refit:
        saved = json.loads(args.out.read_text())
        costs = {int(c): {int(r): s for r, s in by_rows.items()} for c, by_rows in saved["seconds"].items()}
    else:
        with Model(resolve(args.model)) as model:
            costs = timings(model, args.contexts, args.reps)
        saved = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
                 "model": args.model, "seconds": {str(c): {str(r): s for r, s in by_rows.items()}
                                                  for c, by_rows in costs.items()}}
    model_fit = {kernel: fit(costs, kernel) for kernel in KERNELS}
    for kernel, values in model_fit.items():
        print(f"{kernel}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    for context, by_rows in costs.items():
        cheaper = [rows for rows in ROWS if rows < TILE_ROWS and by_rows[rows] > by_rows[TILE_ROWS]]
        print(f"after {context}: calls of {cheaper[0] if cheaper else '-'} rows and more cost more than 64 rows")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**saved, "fit": model_fit}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
