"""grain input pipeline over a prepared data dir: fixed windows, global shuffle, per-process batches.

Examples. The split's token stream is cut into non-overlapping windows of ``seq_len + 1`` tokens that
overlap by one: window ``i`` = tokens ``[i * L, i * L + L + 1)``, ``len = (n_tokens - 1) // L``. Documents
are packed back to back (each begins with BOS), so a window may hold the end of one document and the
start of the next. Each example is a dict of numpy arrays of length ``L``:

- ``inputs``  int32: ``w[:-1]``
- ``targets`` int32: ``w[1:]``
- ``segment_ids`` int32: ``1 + (number of BOS tokens in inputs[1:t+1])``, so every token of one document
  has the same id and a BOS starts a new id (a window that begins with BOS still starts at 1). The model
  must let position t attend to s <= t only where ``segment_ids[s] == segment_ids[t]``.
- ``loss_mask`` float32: 0 where ``targets == BOS`` (predicting the next document's first token from the
  previous document), else 1. Together with the segment mask, nothing crosses a document boundary.

Batches. ``train_iterator`` serves global batch ``k`` = shuffled windows ``[k * B, (k + 1) * B)`` of an
infinite stream in which every epoch is a fresh seeded permutation of all windows; process ``p`` of
``P`` gets rows ``[p * B / P, (p + 1) * B / P)``. The data position is a pure function of the step, and
global batch ``k`` is the same for every ``P``, so a run can resume on another number of processes with
``start_step``.
"""
from __future__ import annotations

import os
import grain
import numpy as np

from data.info import DatasetInfo, load_info

Batch = dict[str, np.ndarray]


def _info(info_or_dir: DatasetInfo | str | os.PathLike) -> DatasetInfo:
    return info_or_dir if isinstance(info_or_dir, DatasetInfo) else load_info(info_or_dir)


class TokenWindows:
    """grain ``RandomAccessDataSource``: window i of a split as an example dict (see module docstring).

    The split's stream is the concatenation of its shards; a window is read from the one or few records
    (of one or more shards) that hold it. Picklable (the readers open lazily).
    """

    def __init__(self, info: DatasetInfo, split: str, seq_len: int):
        if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        self.seq_len = int(seq_len)
        self.split = split
        self.n_tokens = info.n_tokens[split]
        self.bos_id = info.bos_id
        self._chunk = info.chunk_size
        self._dtype = np.dtype(info.dtype)
        shards = info.shards(split)
        self._shard_start = np.cumsum([0] + [s.n_tokens for s in shards])  # first token of each shard
        self._record_start = np.cumsum([0] + [s.n_chunks for s in shards])  # first global record of each
        self._source = grain.sources.ArrayRecordDataSource([s.path for s in shards])
        self._len = max(0, (self.n_tokens - 1) // self.seq_len)

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"TokenWindows(split={self.split!r}, seq_len={self.seq_len}, windows={self._len})"

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's stream."""
        keys, offset = [], None
        shard = int(np.searchsorted(self._shard_start, start, side="right")) - 1
        while shard < len(self._shard_start) - 1 and self._shard_start[shard] < stop:
            local_start = max(start, self._shard_start[shard]) - self._shard_start[shard]
            local_stop = min(stop, self._shard_start[shard + 1]) - self._shard_start[shard]
            first, last = local_start // self._chunk, (local_stop - 1) // self._chunk
            if offset is None:
                offset = local_start - first * self._chunk
            keys += range(self._record_start[shard] + first, self._record_start[shard] + last + 1)
            shard += 1
        # Every shard but the last one read is read to its end, so the records form one contiguous piece.
        records = self._source.__getitems__(keys) if len(keys) > 1 else [self._source[keys[0]]]
        stream = np.concatenate([np.frombuffer(r, self._dtype) for r in records])
        return stream[offset:offset + stop - start]

    def __getitem__(self, index) -> Batch:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} out of range [0, {self._len})")
        start = index * self.seq_len
        return make_example(self.tokens(start, start + self.seq_len + 1), self.bos_id)


def make_example(window: np.ndarray, bos_id: int) -> Batch:
    """The example dict of a window of L + 1 tokens."""
    w = window.astype(np.int32)
    inputs, targets = w[:-1], w[1:]
    new_doc = inputs == bos_id
    new_doc[0] = False
    return {
        "inputs": inputs,
        "targets": targets,
        "segment_ids": (1 + np.cumsum(new_doc)).astype(np.int32),
        "loss_mask": (targets != bos_id).astype(np.float32),
    }


def _check_sharding(batch_size: int, process_index: int, process_count: int, name: str) -> int:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"{name} must be a positive integer, got {batch_size!r}")
    if not isinstance(process_count, (int, np.integer)) or process_count < 1:
        raise ValueError(f"process_count must be a positive integer, got {process_count!r}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    if batch_size % process_count:
        raise ValueError(f"{name}={batch_size} is not divisible by process_count={process_count}; every "
                         "process loads an equal slice of each global batch")
    return batch_size // process_count


def _shuffle_seed(seed: int) -> int:
    # grain reshuffles epoch e with seed + e; hashing the user seed first keeps seed s + 1 from replaying
    # the epochs of seed s shifted by one.
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(np.random.SeedSequence([int(seed), 0x6461_7461]).generate_state(1, np.uint32)[0])


def train_dataset(info_or_dir, *, seq_len: int, global_batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
    """The infinite MapDataset whose element k is this process's part of global batch k."""
    info = _info(info_or_dir)
    local = _check_sharding(global_batch_size, process_index, process_count, "global_batch_size")
    windows = TokenWindows(info, "train", seq_len)
    if len(windows) < global_batch_size:
        raise ValueError(
            f"the train split ({info.n_tokens['train']} tokens) holds {len(windows)} windows of seq_len="
            f"{seq_len}, fewer than global_batch_size={global_batch_size}; use a shorter seq_len, a smaller "
            "batch or a larger corpus")
    ds = grain.MapDataset.source(windows).shuffle(seed=_shuffle_seed(seed)).repeat()  # epoch e: permutation e
    # Batch by the local size, then keep every process_count-th batch starting at process_index: element
    # k holds windows [(k * P + p) * B_local, ...) = rows [p * B_local, (p + 1) * B_local) of global batch k.
    return ds.batch(local, drop_remainder=True)[process_index::process_count]


def train_iterator(info_or_dir, *, seq_len: int, global_batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1, start_step: int = 0, num_threads: int = 2,
                   prefetch: int = 4) -> grain.DatasetIterator:
    """Infinite iterator of this process's slices of the global training batches.

    Yields dicts (see the module docstring) of arrays shaped ``[global_batch_size // process_count,
    seq_len]``; the first one is global batch ``start_step``. ``get_state()`` is ``{"next_index": k}``
    where k is the step of the next batch; the iterator is checkpointed with orbax through
    ``grain.checkpoint.CheckpointSave(it)`` / ``CheckpointRestore(it)``. ``num_threads`` threads load
    ``prefetch`` batches ahead (threads, not processes: no absl flag parsing needed).
    """
    ds = train_dataset(info_or_dir, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                       process_index=process_index, process_count=process_count)
    if not isinstance(start_step, (int, np.integer)) or start_step < 0:
        raise ValueError(f"start_step must be a non-negative integer, got {start_step!r}")
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)).__iter__()
    if start_step:
        it.set_state({"next_index": int(start_step)})  # the same state a run that took start_step steps saves
    return it


def eval_batches(info_or_dir, *, seq_len: int, batch_size: int, process_index: int = 0,
                 process_count: int = 1, max_batches: int | None = None) -> list[Batch]:
    """This process's slices of the global eval batches, in order, over all held-out windows.

    Global eval batch k = eval windows ``[k * batch_size, (k + 1) * batch_size)`` in stream order (no
    shuffle, no overlap); process p gets rows ``[p * b, (p + 1) * b)`` with ``b = batch_size //
    process_count``. The last batch is padded to full size with rows whose ``loss_mask`` is 0 (inputs and
    targets BOS, segment_ids 1), so every process gets the same number of equal-shape batches. Average the
    loss over tokens: ``sum(loss * loss_mask) / sum(loss_mask)`` summed over all batches and processes.
    ``max_batches`` keeps only the first global batches.
    """
    info = _info(info_or_dir)
    local = _check_sharding(batch_size, process_index, process_count, "batch_size")
    windows = TokenWindows(info, "eval", seq_len)
    n = len(windows)
    if n == 0:
        raise ValueError(f"the eval split ({info.n_tokens['eval']} tokens) is shorter than seq_len + 1 = "
                         f"{seq_len + 1}; use a shorter seq_len or a larger eval_fraction")
    n_batches = -(-n // batch_size)
    if max_batches is not None:
        if max_batches < 1:
            raise ValueError(f"max_batches must be positive or None, got {max_batches}")
        n_batches = min(n_batches, max_batches)
    pad = make_example(np.full(seq_len + 1, info.bos_id, np.int64), info.bos_id)
    pad["loss_mask"][:] = 0
    pad["segment_ids"][:] = 1
    batches = []
    for k in range(n_batches):
        first = k * batch_size + process_index * local
        rows = [windows[i] if i < n else pad for i in range(first, first + local)]
        batches.append({key: np.stack([r[key] for r in rows]) for key in pad})
    return batches

