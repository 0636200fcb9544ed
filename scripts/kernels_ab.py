"""Compare kernel benchmark runs of two source trees, run alternately on one machine (before, after, before, ...).

    python -m scripts.kernels_ab --before b1/bench.json b2/bench.json --after a1/bench.json a2/bench.json

For every sparsek case of ``scripts/gpu_kernels.py``'s output: forward and forward+backward milliseconds of each
tree (median of its repeats), the after/before ratio, and the noise: the largest relative spread between repeats of
the same tree in that case (at least ``--floor``, 2% by default). A case is "slower" only when the ratio exceeds
1 + noise. Prints a markdown table; writes JSON with the inputs' environments when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

METRICS = ("fwd_ms", "fwdbwd_ms")


def load_runs(paths: list[str]) -> list[dict[tuple[str, str], dict[str, Any]]]:
    runs = []
    for path in paths:
        with open(path) as handle:
            data = json.load(handle)
        runs.append({(row["case"], row["method"]): row for row in data["bench"] if row.get("method") == "sparsek"})
    return runs


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / min(values) if len(values) > 1 and min(values) > 0 else 0.0


def compare(before: list[dict], after: list[dict], floor: float) -> list[dict[str, Any]]:
    rows = []
    keys = sorted(set.intersection(*(set(r) for r in before + after)), key=lambda key: (len(key[0]), key))
    for key in keys:
        row: dict[str, Any] = {"case": key[0]}
        for metric in METRICS:
            b = [r[key][metric] for r in before if r[key].get(metric)]
            a = [r[key][metric] for r in after if r[key].get(metric)]
            if not a or not b:
                continue
            noise = max(floor, spread(b), spread(a))
            ratio = statistics.median(a) / statistics.median(b)
            row[metric] = {"before": b, "after": a, "ratio": ratio, "noise": noise,
                           "verdict": "slower" if ratio > 1 + noise else ("faster" if ratio < 1 - noise else "same")}
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| case | fwd before ms | fwd after ms | ratio | fwd+bwd before ms | fwd+bwd after ms | ratio | noise | "
             "verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [row["case"]]
        verdicts, noise = [], 0.0
        for metric in METRICS:
            m = row.get(metric)
            if m is None:
                cells += ["", "", ""]
                continue
            cells += ["/".join(f"{x:.3f}" for x in m["before"]), "/".join(f"{x:.3f}" for x in m["after"]),
                      f"{m['ratio']:.3f}"]
            verdicts.append(m["verdict"])
            noise = max(noise, m["noise"])
        verdict = "slower" if "slower" in verdicts else ("faster" if verdicts and set(verdicts) == {"faster"} else
                                                         "same")
        cells += [f"{noise:.1%}", verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", nargs="+", required=True, help="bench.json of the old tree, one per repeat")
    ap.add_argument("--after", nargs="+", required=True, help="bench.json of the new tree, one per repeat")
    ap.add_argument("--floor", type=float, default=0.02, help="smallest noise band (default 0.02)")
    ap.add_argument("--out", default=None, help="write the comparison as JSON here")
    args = ap.parse_args()
    rows = compare(load_runs(args.before), load_runs(args.after), args.floor)
    table = markdown(rows)
    print(table)
    if args.out:
        envs = {}
        for side in ("before", "after"):
            with open(getattr(args, side)[0]) as handle:
                envs[side] = json.load(handle).get("env")
        with open(args.out, "w") as handle:
            json.dump({"rows": rows, "env": envs, "inputs": {"before": args.before, "after": args.after},
                       "floor": args.floor, "table": table}, handle, indent=2)


if __name__ == "__main__":
    main()
