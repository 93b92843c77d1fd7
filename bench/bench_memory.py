"""The driver's memory over a whole `restpg pipeline`, read from finished runs (issue 27's memory goals).

A pipeline's result file (`<home>/results/pipeline-<UTC time>.json`) holds the driver's peak resident memory
and its resident memory right after each training job (`memory`). Per run given, this prints and records:

- driver RSS after the last training job / after the first one (goal ≤ 1.1: a training job leaves nothing
  behind, so the sixth costs the driver what the first did);
- the driver's peak RSS in GB (goal ≤ 6 GB for a run on 64 Amazon inputs, four variants; shown, without a
  goal, for the others).

Both figures come from one run each: there is nothing to put side by side but a run's own first and last
job. Run the pipelines first (`make run`; the Amazon run in README "Using real LongLaMP data"), then

    .venv/bin/python bench/bench_memory.py --run demo=.restpg --run amazon64=/tmp/amz [--name NAME]

Writes bench/results/memory-<name>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import machine, ratio_row, table  # noqa: E402

HERE = Path(__file__).resolve().parent
GB = 2**30  # GiB, as the run summary prints "GB"
AMAZON_PEAK_GOAL_GB = 6.0


def latest_pipeline_result(home: Path) -> tuple[Path, dict]:
    """The newest pipeline result file of a home that records the driver's memory."""
    files = sorted((home / "results").glob("pipeline-*.json"), key=lambda p: p.name, reverse=True)
    for path in files:
        result = json.loads(path.read_text())
        if isinstance(result.get("memory"), dict):
            return path, result
    raise SystemExit(f"bench_memory: no pipeline result with a 'memory' record under {home / 'results'} "
                     f"({len(files)} pipeline result files); run `restpg pipeline --home {home}` first")


def rows_of(label: str, result: dict) -> list[dict]:
    """The ratio rows of one run: after-last / after-first training job, and the peak."""
    mem = result["memory"]
    after = list(mem["after_train_bytes"].items())
    data = result.get("data") or {}
    what = f"{label}: {data.get('source', '?')}"
    if data.get("max_examples"):
        what += f", {data['max_examples']} inputs"
    what += f", {len(result.get('variants') or [])} variants, T={result.get('iterations', '?')}"
    rows = []
    if len(after) >= 2:
        (first_label, first), (last_label, last) = after[0], after[-1]
        rows.append(ratio_row(f"{label}: RSS after last/first train job", [last / first], "x", 1.1,
                              f"{len(after)} training jobs", higher=False)
                    | {"note": f"{first / GB:.2f} GB after {first_label}, {last / GB:.2f} GB after {last_label}",
                       "run": what})
    else:
        rows.append({"measure": f"{label}: RSS after last/first train job", "reference": "", "median": None,
                     "why": f"{len(after)} training job(s) in the run", "run": what})
    is_amazon_64 = "amazon" in label.lower() and (data.get("max_examples") or 0) >= 64
    rows.append(ratio_row(f"{label}: driver peak RSS", [mem["peak_bytes"] / GB], " GB",
                          AMAZON_PEAK_GOAL_GB if is_amazon_64 else None, "whole pipeline", higher=False)
                | {"run": what, "note": f"GiB; {mem['peak_bytes'] / 1e9:.2f} GB of 10^9 bytes"})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", required=True, metavar="LABEL=HOME",
                    help="a finished pipeline's home, labelled (label 'amazon…' with ≥ 64 inputs gets the 6 GB goal)")
    ap.add_argument("--name", default="cpu2-vm")
    args = ap.parse_args()
    rows, runs = [], {}
    for spec in args.run:
        label, _, home = spec.partition("=")
        if not home:
            ap.error(f"--run takes LABEL=HOME, not {spec!r}")
        path, result = latest_pipeline_result(Path(home))
        runs[label] = {"result_file": str(path), "memory": result["memory"], "data": result.get("data"),
                       "variants": result.get("variants"), "iterations": result.get("iterations")}
        rows += rows_of(label, result)
    print(table(rows))
    out = HERE / "results" / f"memory-{args.name}.json"
    out.write_text(json.dumps({"name": args.name, "machine": machine(args.name), "runs": runs, "ratios": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
