"""Multiple-choice tasks (HellaSwag-style): the task file, and a run's accuracy on it.

A task file is jsonl, one item per line (blank lines are skipped)::

    {"context": "The cook cracked two eggs into the bowl", "endings": ["and whisked them.", "and sang."], "label": 0}

``label`` is the index of the right ending (an int, or a string of digits); at least two endings. Rows of HF
``hellaswag`` are read as they are: ``ctx`` for ``context`` and a string label; when they carry
``activity_label``, ``ctx_a`` and ``ctx_b`` the context is ``activity_label + ": " + ctx_a + " " +
ctx_b.capitalize()``, and context and endings lose their WikiHow markup (``[title]`` becomes ". ", other
``[...]`` tags are dropped, double spaces made single), as the evaluation harness prepares HellaSwag. The
task's name is the file's stem.

Tokens (as lm-evaluation-harness makes them for a multiple-choice request). The ending is scored as the
continuation ``c = " " + ending`` (the harness's target delimiter) of the context ``x``; whitespace that
ends ``x`` moves to the front of ``c``. Then ``enc(x + c)`` is encoded as one string and the ending's tokens
are those after the first ``len(enc(x))``; the sequence scored is ``[BOS] + enc(x + c)`` (every training
document starts with BOS), its first tokens dropped if it is longer than ``seq_len + 1``: the run's training
context (positions beyond it were never trained; an ending longer than it is refused).

Scoring. With ``e_1 .. e_n`` the ending's tokens and ``s_<k`` everything before ``e_k``::

    ll(ending) = sum_k log p(e_k | s_<k)
    acc        = mean over items of [argmax_j ll(ending_j) == label]
    acc_norm   = mean over items of [argmax_j ll(ending_j) / bytes(ending_j) == label]

``bytes`` is the UTF-8 length of the ending (the harness's ``acc_bytes``): the harness divides by characters
for HellaSwag's acc_norm; bytes equal characters on ASCII text (all of HellaSwag but a handful of items)
and, like bits per byte, measure the text in a unit no tokenizer or alphabet changes. Ties go to the first
ending (``argmax``).

Batching. Every (item, ending) sequence goes into the shortest of a few bucket lengths that holds it
(``buckets``: 32, 64, ... doubling below ``seq_len``, then ``seq_len``; multiples of 128 for the fused
attention kernels), right-padded with masked positions; a bucket's batches have one shape, so there is one
compilation per bucket. Batches are sharded over the mesh's batch axes like training batches and scored
with the run's own model and attention kernel (``Run.score_step``); rows per batch keep the tokens and the
float32 logits alive at once no more than a held-out batch's (``rows_per_batch``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import PurePosixPath

import jax
import numpy as np
from tqdm import tqdm

from infra.files import exists, read_text, resolve
from models.attention import FUSED_BLOCK

TARGET_DELIMITER = " "  # put between a context and each ending (lm-evaluation-harness's default)
SHORTEST_BUCKET = 32
FORMAT = '{"context": str, "endings": [str, ...], "label": int}'


@dataclasses.dataclass(frozen=True)
class Item:
    context: str
    endings: tuple[str, ...]
    label: int
    line: int  # in the task file, from 1


@dataclasses.dataclass(frozen=True)
class Task:
    name: str  # the file's stem
    path: str
    items: tuple[Item, ...]


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """A task's scores: ``lls[i][j]`` the log-likelihood (nats) of item i's ending j."""
    name: str
    lls: list[np.ndarray]
    acc: float
    acc_norm: float
    count: int


def read_tasks(spec: str) -> list[Task]:
    """The tasks of a comma-separated list of task files ("" = none); names (file stems) must differ."""
    tasks = [read_task(p.strip()) for p in spec.split(",") if p.strip()]
    names = [t.name for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"task names must differ, but {twice} name several files (a task's name is its file's "
                         "stem): rename one of the files")
    return tasks


def read_task(path: str) -> Task:
    """The items of a task file (module docstring); a bad line is a ValueError naming the file and line."""
    path = resolve(path)
    if not exists(path):
        raise ValueError(f"task file {path} does not exist: give a jsonl file of {FORMAT} lines")
    items = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            items.append(_item(line, f"{path}:{number}", number))
    if not items:
        raise ValueError(f"task file {path} is empty: it needs one item per line, {FORMAT}")
    return Task(PurePosixPath(path).name.split(".")[0], path, tuple(items))


def _item(line: str, where: str, number: int) -> Item:
    try:
        row = json.loads(line)
    except ValueError as e:
        raise ValueError(f"{where}: not JSON ({e}); each line must be one object {FORMAT}") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a JSON {type(row).__name__}, not an object {FORMAT}")
    key = "ctx" if "ctx" in row and "context" not in row else "context"
    missing = [k for k in (key, "endings", "label") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field {missing[0]!r}; each line must be {FORMAT} (or HF hellaswag's "
                         "ctx / endings / label)")
    context, endings, label = row[key], row["endings"], row["label"]
    if not isinstance(context, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {type(context).__name__}")
    if not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
        raise ValueError(f"{where}: 'endings' must be a list of strings")
    if len(endings) < 2:
        raise ValueError(f"{where}: {len(endings)} ending(s); a multiple-choice item needs at least 2")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError(f"{where}: label {label!r} is not an integer index into 'endings'")
    if not 0 <= label < len(endings):
        raise ValueError(f"{where}: label {label} is out of range for {len(endings)} endings (0 to "
                         f"{len(endings) - 1})")
    if key == "ctx" and all(isinstance(row.get(k), str) for k in ("activity_label", "ctx_a", "ctx_b")):
        context = _unmarked(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
        endings = [_unmarked(e) for e in endings]
    return Item(context, tuple(endings), label, number)


def _unmarked(text: str) -> str:
    """HellaSwag's WikiHow text without its markup: " [title]" -> ". ", other [...] tags dropped."""
    text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
    return text.replace("  ", " ")


# ---------------------------------------------------------------------------------------------- tokens

@dataclasses.dataclass(frozen=True)
class Scored:
    """One (item, ending): ``tokens`` = [BOS] + context + ending (left-truncated), the last ``n_scored`` the
    ending's."""
    tokens: np.ndarray
    n_scored: int


def encode_pair(tokenizer, context: str, ending: str) -> tuple[list[int], list[int]]:
    """(context tokens, ending tokens) as the harness splits them (module docstring)."""
    continuation = TARGET_DELIMITER + ending
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context)) if context else 0
    return whole[:n_context], whole[n_context:]


def encode_task(task: Task, tokenizer, bos_id: int, seq_len: int) -> list[list[Scored]]:
    """Every item's sequences, one per ending; an ending of no tokens or of more than ``seq_len`` is refused."""
    out = []
    for item in task.items:
        seqs = []
        for j, ending in enumerate(item.endings):
            context_ids, ending_ids = encode_pair(tokenizer, item.context, ending)
            if not 0 < len(ending_ids) <= seq_len:
                raise ValueError(f"{task.path}:{item.line}: ending {j} is {len(ending_ids)} tokens; it must be 1 to "
                                 f"seq_len={seq_len} tokens (the run's context): shorten it")
            tokens = np.asarray([bos_id] + context_ids + ending_ids, np.int32)[-(seq_len + 1):]
            seqs.append(Scored(tokens, len(ending_ids)))
        out.append(seqs)
    return out


def buckets(seq_len: int, attention: str) -> list[int]:
    """The padded lengths: ``SHORTEST_BUCKET`` (``FUSED_BLOCK`` for the fused kernels), doubling while below
    ``seq_len``, then ``seq_len``."""
    length, out = FUSED_BLOCK if attention in ("splash", "pallas_gpu") else SHORTEST_BUCKET, []
    while length < seq_len:
        out.append(length)
        length *= 2
    return out + [seq_len]


def rows_per_batch(batch_size: int, seq_len: int, loss_chunk: int, length: int) -> int:
    """Rows of a batch of ``length``-token sequences: at most ``batch_size * seq_len`` tokens and at most
    ``batch_size * (loss_chunk or seq_len)`` positions of logits at once (a piece of ``gcd(loss_chunk,
    length)`` positions, ``train.step.make_score_step``), as a held-out batch; a multiple of ``batch_size``."""
    piece = math.gcd(loss_chunk, length) if loss_chunk else length
    return batch_size * max(1, min(seq_len // length, (loss_chunk or seq_len) // piece))


def pack(seqs: list[Scored], length: int, rows: int, bos_id: int) -> dict[str, np.ndarray]:
    """A [rows, length] batch of ``seqs`` (fewer than ``rows``: padding rows), each sequence left-aligned and
    its ending's targets the only ones with ``loss_mask`` 1; padding is BOS with mask 0, one segment."""
    shape = (rows, length)
    batch = {"inputs": np.full(shape, bos_id, np.int32), "targets": np.full(shape, bos_id, np.int32),
             "segment_ids": np.ones(shape, np.int32), "loss_mask": np.zeros(shape, np.float32)}
    for r, s in enumerate(seqs):
        n = len(s.tokens) - 1
        batch["inputs"][r, :n], batch["targets"][r, :n] = s.tokens[:-1], s.tokens[1:]
        batch["loss_mask"][r, n - s.n_scored:n] = 1.0
    return batch


# --------------------------------------------------------------------------------------------- scoring

def log_likelihoods(run, params, seqs: list[Scored], desc: str = "score", progress: bool = True) -> np.ndarray:
    """ll of every sequence's scored tokens (module docstring), batched by bucket over the run's mesh."""
    cfg, bos = run.cfg, run.data.bos_id
    lengths = buckets(cfg.seq_len, run.model_cfg.attention)
    bucket_of = [next(b for b in lengths if b >= len(s.tokens) - 1) for s in seqs]
    out = np.zeros(len(seqs), np.float64)
    p, n_procs = jax.process_index(), jax.process_count()
    with tqdm(total=len(seqs), desc=desc, unit="seq", leave=False, dynamic_ncols=True,
              disable=not progress or p != 0) as bar, jax.set_mesh(run.mesh):
        for length in lengths:
            index = [k for k, b in enumerate(bucket_of) if b == length]
            rows = rows_per_batch(cfg.batch_size, cfg.seq_len, cfg.loss_chunk, length)
            local = rows // n_procs
            for start in range(0, len(index), rows):
                part = index[start:start + rows]
                batch = pack([seqs[k] for k in part], length, rows, bos)
                mine = {k: v[p * local:(p + 1) * local] for k, v in batch.items()}
                # one batch in flight at a time (see train.evaluation.heldout_loss)
                out[part] = np.asarray(jax.device_get(run.score_step(params, run.to_global(mine))))[:len(part)]
                bar.update(len(part))
    return out


def score_task(run, params, task: Task, encoded: list[list[Scored]] | None = None,
               progress: bool = True) -> TaskResult:
    """``task``'s acc and acc_norm (module docstring) for the run's ``params``; ``encoded``: ``encode_task``'s
    output, when it is kept between evaluations."""
    if encoded is None:
        encoded = encode_task(task, run.data.tokenizer, run.data.bos_id, run.cfg.seq_len)
    flat = [s for seqs in encoded for s in seqs]
    ll = log_likelihoods(run, params, flat, desc=f"task {task.name}", progress=progress)
    lls, start = [], 0
    for seqs in encoded:
        lls.append(ll[start:start + len(seqs)])
        start += len(seqs)
    return result(task, lls)


def result(task: Task, lls: list[np.ndarray]) -> TaskResult:
    """acc and acc_norm of the items' per-ending log-likelihoods ``lls``."""
    labels = np.asarray([item.label for item in task.items])
    picked = np.asarray([np.argmax(ll) for ll in lls])
    per_byte = np.asarray([np.argmax(ll / np.asarray([max(1, len(e.encode("utf-8"))) for e in item.endings]))
                           for ll, item in zip(lls, task.items)])
    return TaskResult(task.name, lls, float(np.mean(picked == labels)), float(np.mean(per_byte == labels)),
                      len(task.items))


def task_row(res: TaskResult) -> dict[str, float]:
    """A metrics row's entries for a task: ``task/<name>/acc`` and ``task/<name>/acc_norm``."""
    return {f"task/{res.name}/acc": res.acc, f"task/{res.name}/acc_norm": res.acc_norm}
