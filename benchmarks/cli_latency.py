"""How long the read-only commands take to answer, each in a fresh process as a user types it.

    python benchmarks/cli_latency.py [--spec specs/demo.yaml] [--repeats 5]

Run it from the repository root after `make demo`, so that `status` and `ls` read a real store, SAE
and registry (before it they answer about nothing, which is faster). The target (issue 30): under 3 s
each on the 2-core development machine when it is idle. The first `validate` of a model computes its
outline once (storage/model_outline.py); the table reports the runs after it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 3.0


def commands(spec: str) -> list[list[str]]:
    return [["--help"], ["validate", spec], ["status", spec], ["ls"], ["validate", "--help"]]


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"saeflow {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="specs/demo.yaml")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not Path(".saeflow/mlflow.db").exists():
        print("note: no ./.saeflow/mlflow.db (run `make demo` first): status and ls answer about an empty work dir")
    timed(["validate", args.spec])  # the model's outline, computed once per machine
    print(f"{'command':<34}{'median s':>10}{'max s':>8}  under {TARGET_S:g} s")
    for cmd in commands(args.spec):
        times = [timed(cmd) for _ in range(args.repeats)]
        median = statistics.median(times)
        verdict = "yes" if median < TARGET_S else "NO"
        print(f"{'saeflow ' + ' '.join(cmd):<34}{median:>10.2f}{max(times):>8.2f}  {verdict}")


if __name__ == "__main__":
    main()
