"""Corpus preparation: input files -> work units -> tokenizer -> sharded ArrayRecord token streams + meta.json.

Steps (the on-disk format is in ``data.info``, the per-unit computation in ``data.shards``):

1. The corpus's input files are grouped into work units (``data.corpus``).
2. The tokenizer is trained on a bounded, seeded sample of the training documents: units in a seeded
   random order, their training documents in order, until ``tokenizer_sample_chars`` characters;
   sentencepiece then samples at most ``input_sentence_size`` of those lines (``data.tokenizer_spm``). Or a
   pretrained tokenizer is stored (a sentencepiece ``.model``, a ``tokenizer.json``, a ``.tiktoken`` file or a
   tiktoken encoding name such as ``gpt2``: ``data.tokenizer_source``).
3. Every unit is tokenized and written as shards, by ``workers`` processes (``engine="local"``) or by an
   Apache Beam pipeline (``engine="beam"``, ``data.beam``); the output is the same.
4. meta.json is assembled from the units' manifests and written last, and the directory is renamed into
   place.

Everything is written into ``.<name>.partial`` next to the data dir, with the settings in its
``plan.json``. An interrupted preparation (killed, or stopped by bad input) resumes from there when rerun
with the same settings: finished units are kept, only unfinished ones are redone. Memory stays bounded
whatever the corpus size: documents are streamed, and each worker holds one batch of text at a time.

The corpus and the data dir may be on object storage (``gs://...``, through ``infra.files``): the same files
are written there as objects, each uploaded whole; the finished directory's objects are moved into place
(copied on the server, then deleted) and meta.json is written after them, so a data dir never looks complete
with files missing.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import resource
import shutil
import time
import uuid
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from data import corpus as corpus_lib
from data import shards
from data.info import FORMAT_VERSION, META, SPLITS, TOKENIZER_FILES, DatasetInfo, load_info
from data.tokenizer import KIND_FILES, load_tokenizer, options_of
from data.tokenizer_source import Pretrained, open_pretrained, same_tokenizer
from data.tokenizer_spm import TRAINER_SEED, TRAINER_SETTINGS, train_sentencepiece
from infra.files import (check_storage, epath, exists, is_uri, join, list_objects, makedirs, move_tree, read_bytes,
                         read_text, resolve, write_atomic)
from infra.lease import LeaseError, WorkdirLease

PLAN = "plan.json"
ENGINES = ("local", "beam")
_LEASE_POLL_S = 5.0  # how often a preparation waiting for another one's lease on gs:// tries again
_OUR_FILES = {META, *TOKENIZER_FILES, PLAN, *(f"{s}.array_record" for s in SPLITS), *SPLITS, shards.UNITS_DIR}


@functools.lru_cache(maxsize=1)
def default_workers() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0))


def _entropy_nats(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


SMALL_CORPUS_BYTES = 256 * 2**20
SMALL_CORPUS_DOCS = 1000


def _held_out_by_size(sizes: dict[str, int], eval_fraction: float) -> set[str]:
    """Whole documents in order of their hash, each one that brings the held-out share of characters closer
    to eval_fraction (always at least one; at least one stays for training)."""
    target = eval_fraction * sum(sizes.values())
    held, size = set(), 0
    for doc_id in sorted(sizes, key=lambda i: hashlib.sha256(i.encode()).hexdigest()):
        if size >= target or len(held) == len(sizes) - 1:
            break
        if held and abs(size + sizes[doc_id] - target) >= target - size:
            continue  # taking it would land further from the target than stopping here; try the next one
        held.add(doc_id)
        size += sizes[doc_id]
    return held


def flipped_documents(units, text_key: str, eval_fraction: float, on_error: str) -> tuple[str, ...]:
    """The documents on the other side of the hash rule (``data.shards.held_out``), from one scan of a corpus
    of at most SMALL_CORPUS_BYTES; larger corpora are not scanned and keep the hash rule as it is.

    With at most SMALL_CORPUS_DOCS documents the held-out set is ``_held_out_by_size``'s, which hits
    eval_fraction of the characters as closely as whole documents allow (a few documents would otherwise
    give a share far from it, or none); with more, the hash rule stands, except that the document with the
    smallest hash is held out if it holds out none (the largest stays for training if it holds out all).
    """
    if sum(u.size for u in units) > SMALL_CORPUS_BYTES:
        return ()
    quiet = corpus_lib.Problems(on_error, verbose=False)  # the tokenizing pass counts skipped input
    sizes = {doc.name: len(doc.text) for u in units for doc, _ in corpus_lib.read_documents(u, text_key, quiet)}
    if len(sizes) < 2:
        raise ValueError(
            f"the corpus has {len(sizes)} non-empty document(s); holding out whole documents for evaluation needs "
            "at least 2 (use a directory of several .txt files, separate documents with <|endoftext|> lines, or "
            "give jsonl/parquet records)")
    by_hash = {i for i in sizes if shards.held_out(i, eval_fraction)}
    if len(sizes) <= SMALL_CORPUS_DOCS:
        return tuple(sorted(_held_out_by_size(sizes, eval_fraction) ^ by_hash))
    if not by_hash:
        return (min(sizes, key=shards.doc_hash),)
    if len(by_hash) == len(sizes):
        return (max(sizes, key=shards.doc_hash),)
    return ()


def tokenizer_sample(units, text_key: str, eval_fraction: float, sample_chars: int, seed: int,
                     flipped: tuple[str, ...] = (), on_error: str = "skip"):
    """Training-document texts for the tokenizer: units in a seeded random order, up to sample_chars."""
    problems = corpus_lib.Problems(on_error, verbose=False)  # the tokenizing pass counts skipped input
    total = 0
    for i in np.random.default_rng(seed).permutation(len(units)):
        for doc, _ in corpus_lib.read_documents(units[i], text_key, problems):
            if not shards.held_out(doc.name, eval_fraction, flipped):
                yield doc.text[:sample_chars - total]
                total += len(doc.text)
                if total >= sample_chars:
                    return


def _tokenizer(tmp: str, pretrained: Pretrained | None, vocab_size, units, text_key, on_error, eval_fraction,
               flipped, sample_chars, verbose) -> dict:
    """Puts the tokenizer into tmp (the pretrained one's file, or tokenizer.model trained or kept from an
    interrupted run); its meta entry."""
    if pretrained is not None:
        return pretrained.install(tmp)
    if vocab_size is None:
        raise ValueError("give vocab_size (to train a tokenizer) or tokenizer (a pretrained one)")
    model = join(tmp, KIND_FILES["sentencepiece"])
    settings = {**TRAINER_SETTINGS, "vocab_size": vocab_size, "seed": TRAINER_SEED, "sample_chars": sample_chars}
    if not exists(model):
        if verbose:
            print(f"training a {vocab_size}-token BPE tokenizer on up to {sample_chars:,} characters of training "
                  "documents ...", flush=True)
        train_sentencepiece(tokenizer_sample(units, text_key, eval_fraction, sample_chars, TRAINER_SEED, flipped,
                                             on_error), model, vocab_size)
    return {"file": KIND_FILES["sentencepiece"], "source": "trained", "sha256": shards.sha256_file(model),
            "kind": "sentencepiece", "settings": settings}


_progress_counter = None


def _init_worker(counter) -> None:
    """Each of several worker processes tokenizes on one thread (tokenizers' own pool too: RAYON_NUM_THREADS)."""
    global _progress_counter
    _progress_counter = counter
    os.environ["RAYON_NUM_THREADS"] = "1"


def _add_progress(n: int) -> None:
    with _progress_counter.get_lock():
        _progress_counter.value += n


def _worker_prepare(job, unit):
    return shards.prepare_unit(job, unit, _add_progress)


def run_local(job: shards.UnitJob, units: Sequence[corpus_lib.Unit], workers: int, verbose: bool) -> int:
    """Prepares ``units``, largest first, in a pool of up to ``workers`` processes, or in this process when
    one would do (workers=1, or a single unit); returns the number of processes that tokenized."""
    todo = sorted(units, key=lambda u: -u.size)
    workers = min(workers, len(todo)) if len(todo) > 1 else 1
    with tqdm(total=sum(u.size for u in todo), unit="B", unit_scale=True, desc=f"tokenizing ({workers} workers)",
              disable=not verbose, smoothing=0.1) as bar:
        if workers == 1:
            for unit in todo:
                shards.prepare_unit(job, unit, bar.update)
            return 1
        ctx = multiprocessing.get_context("spawn")  # fork is unsafe once jax or grain threads run
        counter = ctx.Value("q", 0)
        with ctx.Pool(workers, initializer=_init_worker, initargs=(counter,)) as pool:
            results = pool.imap_unordered(functools.partial(_worker_prepare, job), todo)
            while True:
                try:
                    results.next(timeout=0.5)
                except multiprocessing.TimeoutError:
                    pass
                except StopIteration:
                    break
                finally:
                    bar.update(counter.value - bar.n)
    return workers


def _plan(corpus, files, pretrained: Pretrained | None, vocab_size, eval_fraction, chunk_size, shard_tokens, text_key,
          on_error, sample_chars) -> dict:
    """Everything the output depends on; a partial preparation resumes only under the same plan."""
    return {"format_version": FORMAT_VERSION, "corpus": corpus_lib.canonical_corpus(corpus),
            "inputs": [[f.name, f.size] for f in files], "eval_fraction": eval_fraction, "chunk_size": chunk_size,
            "shard_tokens": shard_tokens, "text_key": text_key, "on_error": on_error,
            "tokenizer": pretrained.identity() if pretrained is not None else
            {"vocab_size": vocab_size, "sample_chars": sample_chars}}


def _beside(out: str, suffix: str) -> str:
    """``.<name><suffix>`` next to the data dir ``out``."""
    parent, name = os.path.split(out)
    return join(parent, f".{name}{suffix}")


def _partial_dir(out: str, plan: dict, verbose: bool) -> str:
    """``.<name>.partial`` next to out, holding plan.json; an existing one is kept if its plan matches."""
    partial = _beside(out, ".partial")
    if epath(partial).is_dir():
        try:
            same = json.loads(read_text(join(partial, PLAN))) == plan
        except (OSError, ValueError):
            same = False
        if same:
            if verbose:
                print(f"resuming the interrupted preparation in {partial}", flush=True)
            return partial
        if verbose:
            print(f"discarding {partial}: an interrupted preparation with other settings", flush=True)
        epath(partial).rmtree()
    makedirs(partial)
    write_atomic(join(partial, PLAN), json.dumps(plan, indent=1).encode())
    return partial


def _assemble_meta(partial: str, units, manifests, tok_meta, plan, stats) -> dict:
    """meta.json from the units' manifests (in unit order) and their token counts."""
    tok = load_tokenizer(join(partial, tok_meta["file"]), **options_of(tok_meta))
    counts = sum(np.load(io.BytesIO(read_bytes(shards.counts_path(partial, u.index)))) for u in units)
    splits = {}
    for s in SPLITS:
        parts = [p for m in manifests for p in m["splits"][s]["parts"]]
        splits[s] = {"files": parts, "n_tokens": sum(p["n_tokens"] for p in parts),
                     "n_chunks": sum(p["n_chunks"] for p in parts),
                     "n_docs": sum(m["splits"][s]["n_docs"] for m in manifests),
                     "n_chars": sum(m["splits"][s]["n_chars"] for m in manifests),
                     "n_bytes": _total(m["splits"][s].get("n_bytes") for m in manifests),
                     "ids_sha256": hashlib.sha256("".join(m["splits"][s]["ids_sha256"] for m in manifests)
                                                  .encode()).hexdigest()}
    problems = corpus_lib.Problems("skip", verbose=False)
    for m in manifests:
        problems.merge(m["problems"]["count"], m["problems"]["examples"])
    if splits["train"]["n_docs"] == 0 or splits["eval"]["n_docs"] == 0:
        empty = "train" if splits["train"]["n_docs"] == 0 else "eval"
        raise ValueError(
            f"the corpus's {splits['train']['n_docs'] + splits['eval']['n_docs']} document(s) left the {empty} "
            f"split empty (a document is held out when a hash of its id falls below eval_fraction="
            f"{plan['eval_fraction']}); use more documents (a directory of several .txt files, documents "
            "separated by <|endoftext|> lines, or jsonl/parquet records) or another --eval_fraction")
    return {
        "format_version": FORMAT_VERSION,
        "corpus": plan["corpus"],
        "inputs": {"files": len(plan["inputs"]), "bytes": sum(s for _, s in plan["inputs"]), "units": len(units),
                   "text_key": plan["text_key"]},
        "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "unk_id": tok.unk_id,
        "dtype": shards.token_dtype(tok.vocab_size).name,
        "chunk_size": plan["chunk_size"], "shard_tokens": plan["shard_tokens"], "eval_fraction": plan["eval_fraction"],
        "layout": "each split: its documents as [BOS]+tokens, concatenated, stored in the listed shards in order; "
                  "record i of a shard = its tokens [i*chunk_size, (i+1)*chunk_size) as raw little-endian dtype",
        "splits": splits,
        "tokenizer": tok_meta,
        "unigram_entropy_nats": _entropy_nats(counts),
        "empty_documents": sum(m["empty_documents"] for m in manifests),
        "problems": {"on_error": plan["on_error"], "count": problems.count, "examples": problems.examples},
        "prepare": stats,
        "created_unix": int(time.time()),
    }


def _total(counts) -> int | None:
    """The sum of per-unit counts; None when a unit lacks one (prepared before it was counted, then resumed)."""
    counts = list(counts)
    return None if None in counts else sum(counts)


def _run_stats(manifests, engine, workers, seconds) -> dict:
    """Throughput and memory of this run's tokenizing step, from the manifests of the units it prepared
    (units done before a resume are not counted)."""
    n_bytes = sum(m["input_bytes"] for m in manifests)
    n_tokens = sum(m["splits"][s]["n_tokens"] for m in manifests for s in SPLITS)
    busy = sum(m["seconds"] for m in manifests)
    main_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_rss = max((m["peak_rss_mib"] for m in manifests), default=0.0)
    return {"engine": engine, "workers": workers, "units": len(manifests), "seconds": round(seconds, 2),
            "input_mb": round(n_bytes / 1e6, 1), "tokens": n_tokens,
            "input_mb_per_s": round(n_bytes / 1e6 / max(seconds, 1e-9), 2),
            "tokens_per_s": round(n_tokens / max(seconds, 1e-9)),
            "input_mb_per_s_per_worker": round(n_bytes / 1e6 / max(busy, 1e-9), 2),
            "peak_rss_mib": {"main": round(main_rss, 1), "largest_worker": worker_rss,
                             "bound": round(main_rss + (workers if engine == "local" and workers > 1 else 0)
                                            * worker_rss, 1)}}


def _check_settings(*, eval_fraction: float, engine: str, on_error: str, eot_without_tokenizer: bool,
                    **positive) -> None:
    """ValueError naming the first preparation setting out of its range (or an eot_token without a tokenizer)."""
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    corpus_lib.Problems(on_error)  # checks the value
    if eot_without_tokenizer:
        raise ValueError("eot_token applies to a pretrained tokenizer; give tokenizer too (a trained sentencepiece "
                         "model begins documents with its BOS)")


def _tokenize_units(job, units, engine: str, beam_args, workers: int, verbose: bool):
    """Tokenize the units not done yet (local worker processes or Beam); returns (every unit's manifest, the
    run's statistics)."""
    todo = [u for u in units if shards.read_manifest(job.out, u.index) is None]
    if verbose and len(todo) < len(units):
        print(f"{len(units) - len(todo)} of {len(units)} units were already done", flush=True)
    t0 = time.perf_counter()
    if engine == "beam":
        from data import beam  # the optional "beam" extra
        beam.run_units(job, todo, beam_args)
    else:
        workers = run_local(job, todo, workers, verbose)
    seconds = time.perf_counter() - t0
    manifests = [shards.read_manifest(job.out, u.index) for u in units]
    return manifests, _run_stats([manifests[u.index] for u in todo], engine, workers, seconds)


def _shard_tokens(vocab_size: int | None, chunk_size: int, shard_mb: float) -> int:
    """Tokens per output shard: about ``shard_mb`` MB of them, at least a record's."""
    return max(chunk_size, int(shard_mb * 1e6) // shards.token_dtype(vocab_size or 1).itemsize)


def prepare_corpus(
    data_dir: str | os.PathLike,
    corpus: str | os.PathLike = corpus_lib.SHAKESPEARE,
    vocab_size: int | None = 4096,
    *,
    tokenizer: str | os.PathLike | None = None,
    eot_token: str | None = None,
    eval_fraction: float = 0.05,
    chunk_size: int = 4096,
    shard_mb: float = 256,
    text_key: str = "text",
    on_error: str = "stop",
    tokenizer_sample_chars: int = 100_000_000,
    workers: int | None = None,
    engine: str = "local",
    beam_args: Sequence[str] = (),
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    verbose: bool = True,
) -> DatasetInfo:
    """Prepares ``corpus`` into ``data_dir`` (see the module docstring) and returns its info.

    ``tokenizer`` names a pretrained tokenizer (``data.tokenizer_source``; ``eot_token`` the end-of-text token of
    a tokenizer.json or tiktoken one, default its own), else one of ``vocab_size`` is trained. ``shard_mb`` bounds
    each output shard (about that many MB of tokens), ``workers`` (default: the cores available) the local
    processes. A complete ``data_dir`` is an error unless ``overwrite``; ``ensure_prepared`` reuses it and locks.
    """
    out, workers = resolve(data_dir), default_workers() if workers is None else workers
    _check_settings(chunk_size=chunk_size, shard_mb=shard_mb, workers=workers,
                    tokenizer_sample_chars=tokenizer_sample_chars, eval_fraction=eval_fraction, engine=engine,
                    on_error=on_error, eot_without_tokenizer=bool(eot_token) and tokenizer is None)
    if exists(join(out, META)) and not overwrite:
        raise ValueError(f"{out} is already prepared; use ensure_prepared() (or --force to redo it)")
    if exists(out) and not exists(join(out, META)):
        _check_removable(out)
    files = corpus_lib.input_files(corpus, cache_dir)
    units = corpus_lib.plan_units(files)
    pretrained = open_pretrained(tokenizer, eot_token) if tokenizer is not None else None
    shard_tokens = _shard_tokens(pretrained.tokenizer.vocab_size if pretrained else vocab_size, chunk_size, shard_mb)
    plan = _plan(corpus, files, pretrained, vocab_size, eval_fraction, chunk_size, shard_tokens, text_key, on_error,
                 tokenizer_sample_chars)
    makedirs(os.path.dirname(out))
    flipped = flipped_documents(units, text_key, eval_fraction, on_error)
    partial = _partial_dir(out, plan, verbose)
    try:
        tok_meta = _tokenizer(partial, pretrained, vocab_size, units, text_key, on_error, eval_fraction, flipped,
                              tokenizer_sample_chars, verbose)
    except ValueError:
        if not exists(join(partial, shards.UNITS_DIR)):  # nothing worth resuming
            epath(partial).rmtree()
        raise
    job = shards.UnitJob(partial, join(partial, tok_meta["file"]), eval_fraction, chunk_size, shard_tokens,
                         text_key, on_error, flipped, options_of(tok_meta))
    manifests, stats = _tokenize_units(job, units, engine, beam_args, workers, verbose)
    meta = {**_assemble_meta(partial, units, manifests, tok_meta, plan, stats), "flipped_documents": list(flipped)}
    _install(partial, out, json.dumps(meta, indent=1).encode(), overwrite)
    info = load_info(out)
    if verbose:
        print_summary(info)
    return info


def print_summary(info: DatasetInfo) -> None:
    m = info.meta
    print(f"prepared {info.corpus} into {info.data_dir}: vocab {info.vocab_size} ({describe_tokenizer(info)}), "
          f"{info.dtype}, {info.chunk_size} tokens per record")
    for s in SPLITS:
        sm = m["splits"][s]
        print(f"  {s:5s}: {sm['n_docs']:8,d} docs, {sm['n_chars']:14,d} chars, {sm['n_tokens']:14,d} tokens "
              f"({sm['n_chars'] / max(sm['n_tokens'], 1):.2f} chars/token, {_per_token(info.bytes_per_token(s))} "
              f"bytes/token), {len(info.files(s))} shard(s)")
    print(f"  unigram entropy of the training tokens: {info.unigram_entropy_nats:.4f} nats "
          f"(the loss of a model that ignores context; uniform would be {math.log(info.vocab_size):.4f})")
    problems = m.get("problems", {})
    if problems.get("count"):
        print(f"  skipped bad input: {problems['count']} (first: {problems['examples'][0]}; all examples in "
              f"meta.json)")
    run = m.get("prepare")
    if run:
        rss = run["peak_rss_mib"]
        by = f"{run['workers']} local worker(s)" if run["engine"] == "local" else "Apache Beam"
        print(f"  last run: {run['seconds']:.1f} s for {run['input_mb']:,.1f} MB in {run['units']} unit(s) with "
              f"{by}: {run['input_mb_per_s']:.2f} MB/s, "
              f"{run['tokens_per_s']:,d} tokens/s ({run['input_mb_per_s_per_worker']:.2f} MB/s per busy worker); "
              f"peak RSS: main {rss['main']:.0f} MiB, largest worker {rss['largest_worker']:.0f} MiB, "
              f"at most {rss['bound']:.0f} MiB together")


def describe_tokenizer(info: DatasetInfo) -> str:
    """``sentencepiece BPE trained here``, ``tiktoken gpt2``, ``hf /path/tokenizer.json``..., with the boundary."""
    entry = info.meta["tokenizer"]
    source = entry["source"]
    source = "BPE trained here" if source == "trained" else source.replace("tiktoken:", "")
    boundary = entry.get("eot_token") or ("<s>" if info.tokenizer_kind == "sentencepiece" else "?")
    return f"{info.tokenizer_kind} {source}; documents begin with {boundary} = id {info.bos_id}"


def _per_token(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def _check_removable(out: str) -> None:
    """An incomplete dir is replaced only if it holds nothing but files this module writes."""
    if epath(out).is_file():
        raise ValueError(f"{out} exists and is not a directory; choose another --out")
    names = {name[len(out) + 1:].split("/")[0] for name in list_objects(out)} if is_uri(out) else os.listdir(out)
    foreign = sorted(set(names) - _OUR_FILES)
    if foreign:
        raise ValueError(f"{out} is not a complete prepared data dir and holds other files ({foreign[:5]}); "
                         "empty it or choose another --out")


def _remove_progress(directory: str) -> None:
    """The unit manifests and plan.json, which a finished data dir does not keep."""
    epath(join(directory, shards.UNITS_DIR)).rmtree()
    epath(join(directory, PLAN)).unlink()


def _install(partial: str, out: str, meta: bytes, overwrite: bool) -> None:
    """Puts the finished preparation in place as ``out``, with ``meta`` as its meta.json, which marks it complete.

    Locally the partial dir gets meta.json and is renamed (atomic; a complete ``out`` that is redone stays
    readable until it is replaced). Object storage has no rename: ``out`` is emptied (meta.json first), the
    partial dir's objects are moved (copied, then deleted: until then a rerun resumes from it), meta.json is
    written, and only then are the unit manifests and plan.json deleted; ``out`` never looks complete with a
    file missing.
    """
    complete = exists(join(out, META))
    if complete and not overwrite:
        raise ValueError(f"{out} was prepared concurrently by another process; use ensure_prepared()")
    if exists(out) and not complete:
        _check_removable(out)
    if is_uri(out):
        if exists(out):
            epath(join(out, META)).unlink(missing_ok=True)  # first: out never looks complete with files missing
            epath(out).rmtree()
        move_tree(partial, out)
        write_atomic(join(out, META), meta)
        _remove_progress(out)
        return
    _remove_progress(partial)
    write_atomic(join(partial, META), meta)
    if complete:
        old = _beside(out, f".old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        move_tree(out, old)
        move_tree(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if exists(out):
            shutil.rmtree(out)
        move_tree(partial, out)


@contextlib.contextmanager
def file_lock(path: str, verbose: bool):
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if verbose:
                print(f"waiting for another process to finish preparing (lock {path}) ...", flush=True)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def prepare_lock(out: str, verbose: bool):
    """Holds the lock of the data dir ``out`` (``.<name>.lock`` next to it), waiting while another process holds
    it: a ``file_lock`` on a local disk; on gs://, the lease of ``infra.lease`` (an object written with GCS's
    generation preconditions, kept fresh by a heartbeat and taken over once stale)."""
    lock = _beside(out, ".lock")
    if not is_uri(out):
        makedirs(os.path.dirname(out))
        with file_lock(lock, verbose):
            yield
        return
    if not out.startswith("gs://"):
        raise ValueError(f"{out}: a data dir on object storage is implemented for gs:// only")
    lease = WorkdirLease(lock)
    for attempt in itertools.count():
        try:
            lease.acquire()
            break
        except LeaseError:
            if verbose and attempt == 0:
                print(f"waiting for another process to finish preparing (lease {lease.path}) ...", flush=True)
            time.sleep(_LEASE_POLL_S)
    try:
        yield
    finally:
        lease.release()


def _check_matches(info: DatasetInfo, corpus, vocab_size, tokenizer, eot_token, eval_fraction) -> None:
    """ValueError naming what differs between the request and what the dir was prepared with: the corpus, the
    tokenizer (its identity: the file's sha256 or the tiktoken encoding's name, and the end-of-text token when
    one is named; or vocab_size of a trained one), eval_fraction."""
    want, have = {}, {}
    if corpus_lib.canonical_corpus(corpus) != info.corpus:
        want["corpus"], have["corpus"] = corpus_lib.canonical_corpus(corpus), info.corpus
    if tokenizer is not None:
        if not same_tokenizer(tokenizer, eot_token, info.meta["tokenizer"]):
            want["tokenizer"] = f"{os.fspath(tokenizer)}" + (f" (eot_token {eot_token})" if eot_token else "")
            have["tokenizer"] = f"{info.meta['tokenizer']['source']} (sha256 {info.meta['tokenizer']['sha256'][:12]})"
    elif info.meta["tokenizer"]["source"] != "trained":
        want["tokenizer"], have["tokenizer"] = "trained", info.meta["tokenizer"]["source"]
    elif vocab_size is not None and vocab_size != info.vocab_size:
        want["vocab_size"], have["vocab_size"] = vocab_size, info.vocab_size
    if not math.isclose(eval_fraction, info.meta["eval_fraction"]):
        want["eval_fraction"], have["eval_fraction"] = eval_fraction, info.meta["eval_fraction"]
    if want:
        raise ValueError(f"{info.data_dir} was prepared with {have}, but {want} was requested. Use another "
                         f"data dir, or delete this one to prepare it again")


def ensure_prepared(
    data_dir: str | os.PathLike,
    corpus: str | os.PathLike = corpus_lib.SHAKESPEARE,
    vocab_size: int | None = 4096,
    *,
    tokenizer: str | os.PathLike | None = None,
    eot_token: str | None = None,
    eval_fraction: float = 0.05,
    verbose: bool = True,
    **options,
) -> DatasetInfo:
    """Returns the info of ``data_dir``, preparing it first unless it is already complete.

    Idempotent. A complete dir must have been prepared with the same corpus, vocab_size (or, when
    ``tokenizer`` is given, the same tokenizer: file bytes or tiktoken encoding name, and ``eot_token`` if
    given; vocab_size is then ignored) and eval_fraction, else ValueError. ``options`` go to
    ``prepare_corpus``. Processes that call this at once on the same dir serialize on its lock
    (``prepare_lock``: a file lock on one machine, a lease object on gs:// across machines): one prepares, the
    others wait and then read the result. (Hosts that share no filesystem and use local dirs each prepare
    their own, identical, copy.)
    """
    out = resolve(data_dir)
    for path in (out, corpus, tokenizer or ""):
        check_storage(path)
    if not exists(join(out, META)):
        with prepare_lock(out, verbose):
            if not exists(join(out, META)):
                return prepare_corpus(out, corpus, vocab_size, tokenizer=tokenizer, eot_token=eot_token,
                                      eval_fraction=eval_fraction, verbose=verbose, **options)
    info = load_info(out)
    _check_matches(info, corpus, vocab_size, tokenizer, eot_token, eval_fraction)
    return info

