"""``python -m launch.compare_runs PLAN_JSON [--exclude FILE] [--slice I/N] [--first]``: the runs of a
comparison's plan (``python -m tools.compare ... plan``) that a launcher should start now, one per line as
``NAME ARGS`` (``--first``: only the first), where ARGS are the shell-quoted arguments of
``python -m tools.compare`` for that run.

A run is listed when it is pending or started (a started one resumes), is not named in ``--exclude``
(e.g. the runs already submitted to SLURM), and, with ``--slice I/N``, belongs to slice I of N: runs are
spread over slices by a stable hash of their name, so every launcher of a fan-out agrees on the split.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex


def slice_of(name: str, n_slices: int) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % n_slices


def runs_to_start(plan: list[dict], exclude: set[str], my_slice: tuple[int, int] | None) -> list[tuple[str, str]]:
    out = []
    for row in plan:
        if row["status"] not in ("pending", "started") or row["name"] in exclude:
            continue
        if my_slice is not None and slice_of(row["name"], my_slice[1]) != my_slice[0]:
            continue
        args = shlex.split(row["command"])[3:]  # drop "python -m tools.compare"
        out.append((row["name"], shlex.join(args)))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m launch.compare_runs", description=__doc__.split("\n\n")[0])
    p.add_argument("plan_json")
    p.add_argument("--exclude", default=None, help="file of run names (whitespace-separated) to leave out")
    p.add_argument("--slice", default=None, help="I/N: only the runs of slice I (0-based) of N")
    p.add_argument("--first", action="store_true", help="only the first such run")
    args = p.parse_args(argv)
    exclude = set(open(args.exclude).read().split()) if args.exclude else set()
    my_slice = None
    if args.slice:
        i, n = (int(x) for x in args.slice.split("/"))
        if not 0 <= i < n:
            p.error(f"--slice {args.slice}: need 0 <= I < N")
        my_slice = (i, n)
    with open(args.plan_json) as f:
        plan = json.load(f)
    for name, run_args in runs_to_start(plan, exclude, my_slice)[:1 if args.first else None]:
        print(name, run_args)


if __name__ == "__main__":
    main()
