"""Tests of corpus preparation at scale: input formats, bad input, parallel workers, resume, Beam, many shards."""
import gzip
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data import corpus as corpus_lib
from data import ensure_prepared, load_info, pipeline, prepare_corpus, shards, train_iterator

REPO = pathlib.Path(__file__).resolve().parents[1]
WORDS = ("the king queen lord lady good night day love death sword crown heart blood fair sweet speak come go "
         "stay hear know think see tell give take make thou thee thy noble gentle honest poor brave").split()
OPTS = dict(vocab_size=300, chunk_size=64, verbose=False)


def _texts(n, seed=0):
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, int(rng.integers(20, 120)))) + "\ncafé ☃ end\n" for _ in range(n)]


def _jsonl(path, texts, opener=open):
  with opener(path, "wt", encoding="utf-8") as f:
    for t in texts:
      f.write(json.dumps({"text": t, "id": 7}) + "\n")
  return path


def _zst(path, texts):
  import zstandard
  raw = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
  path.write_bytes(zstandard.ZstdCompressor().compress(raw))
  return path


def _parquet(path, texts):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), path, row_group_size=7)
  return path


def _files(info):
  root = pathlib.Path(info.data_dir)
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
          and p.name != "meta.json"}


def _meta_without_run(info):
  return {k: v for k, v in info.meta.items() if k not in ("prepare", "created_unix")}


@pytest.mark.parametrize("fmt", ["jsonl", "json.gz", "jsonl.zst", "parquet", "txt"])
def test_each_input_format_reads_every_document_with_its_id(tmp_path, fmt):
  texts = _texts(30)
  root = tmp_path / "c"
  root.mkdir()
  if fmt == "txt":
    for i, t in enumerate(texts):
      (root / f"d{i:02d}.txt").write_text(t)
    corpus, ids = root / "*.txt", [f"d{i:02d}.txt" for i in range(30)]
  else:
    path = root / f"part.{fmt}"
    {"jsonl": _jsonl, "json.gz": lambda p, t: _jsonl(p, t, gzip.open), "jsonl.zst": _zst,
     "parquet": _parquet}[fmt](path, texts)
    corpus = root
    ids = [f"part.{fmt}#{i}" if fmt == "parquet" else f"part.{fmt}:{i + 1}" for i in range(30)]
  docs = corpus_lib.all_documents(corpus)
  assert [d.text for d in docs] == texts and [d.name for d in docs] == ids
  info = prepare_corpus(tmp_path / "out", corpus, eval_fraction=0.2, **OPTS)
  assert info.n_docs["train"] + info.n_docs["eval"] == 30 and info.n_docs["eval"] >= 1
  assert info.meta["problems"]["count"] == 0


def test_text_key_and_mixed_directory(tmp_path):
  root = tmp_path / "c"
  (root / "sub").mkdir(parents=True)
  with open(root / "a.jsonl", "w") as f:
    for t in _texts(5):
      f.write(json.dumps({"content": t}) + "\n")
  _parquet(root / "sub" / "b.parquet", _texts(4, seed=1))
  (root / "README.md").write_text("not part of the corpus")
  with pytest.raises(ValueError, match=r"a.jsonl:1: no string field 'text' .*'content'.*--text_key"):
    corpus_lib.all_documents(root)
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"content": _texts(4, seed=1)}), root / "sub" / "b.parquet")
  docs = corpus_lib.all_documents(root, text_key="content")
  assert [d.name for d in docs] == ["a.jsonl:1", "a.jsonl:2", "a.jsonl:3", "a.jsonl:4", "a.jsonl:5"] + [
      f"sub/b.parquet#{i}" for i in range(4)]


def _bad_corpus(root):
  """Four good files (40 documents) and, in bad.jsonl, a line of each kind of bad input, plus bad files."""
  root.mkdir()
  for i in range(4):
    _jsonl(root / f"good{i}.jsonl", _texts(10, seed=i))
  good = json.dumps({"text": "a good line between bad ones"})
  (root / "bad.jsonl").write_bytes(b"\n".join([
      good.encode(), b"{not json", b'{"text": "caf\xe9 latin-1"}', b'{"body": "no text field"}',
      b'{"text": 5}', b"[1, 2]", good.encode(), b""]))
  (root / "empty.jsonl").write_text("\n\n")
  long_lines = "".join(json.dumps({"text": t}) + "\n" for t in _texts(20, seed=9)).encode()
  (root / "truncated.jsonl.gz").write_bytes(gzip.compress(long_lines)[:60])  # ends inside its first line
  (root / "garbage.parquet").write_bytes(b"PAR1 this is not parquet")


def test_bad_input_stops_with_file_and_line_or_is_skipped_and_counted(tmp_path):
  _bad_corpus(tmp_path / "c")
  with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON .*--on_error skip"):
    prepare_corpus(tmp_path / "out", tmp_path / "c", eval_fraction=0.2, workers=1, **OPTS)  # (largest unit first)
  assert not (tmp_path / "out").exists()

  info = prepare_corpus(tmp_path / "out", tmp_path / "c", eval_fraction=0.2, on_error="skip", **OPTS)
  problems = info.meta["problems"]
  assert problems["on_error"] == "skip" and problems["count"] == 8, problems
  text = "\n".join(problems["examples"])
  for expected in ["bad.jsonl:2: not JSON", "bad.jsonl:3: not UTF-8 at byte", "bad.jsonl:4: no string field 'text'",
                   "bad.jsonl:5: no string field", "bad.jsonl:6: no string field", "empty.jsonl: holds no documents",
                   "truncated.jsonl.gz: unreadable", "garbage.parquet: not a readable parquet file"]:
    assert expected in text, (expected, text)
  assert info.n_docs["train"] + info.n_docs["eval"] == 42  # 40 + the two good lines of bad.jsonl


def test_latin1_txt_names_file_and_byte_offset(tmp_path):
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "a.txt").write_text("plain text\n" * 50)
  (tmp_path / "c" / "b.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
  with pytest.raises(ValueError, match=r"b.txt: not UTF-8 at byte 3 .*iconv -f latin1"):
    prepare_corpus(tmp_path / "out", tmp_path / "c", **OPTS)


def test_workers_and_beam_write_the_same_files(tmp_path):
  root = tmp_path / "c"
  root.mkdir()
  for i in range(5):
    _jsonl(root / f"s{i}.jsonl", _texts(40, seed=i))
  opts = dict(eval_fraction=0.1, shard_mb=0.002, **OPTS)  # ~1000 tokens per shard: several per unit
  one = prepare_corpus(tmp_path / "w1", root, workers=1, **opts)
  two = prepare_corpus(tmp_path / "w2", root, workers=2, **opts)
  pytest.importorskip("apache_beam")
  beam = prepare_corpus(tmp_path / "beam", root, engine="beam", **opts)
  assert len(one.files("train")) > 5
  assert _files(one) == _files(two) == _files(beam)
  assert _meta_without_run(one) == _meta_without_run(two) == _meta_without_run(beam)
  assert one.identity == two.identity == beam.identity
  assert two.meta["prepare"]["workers"] == 2 and beam.meta["prepare"]["engine"] == "beam"


def test_interrupted_preparation_resumes_at_unit_granularity(tmp_path):
  root = tmp_path / "c"
  root.mkdir()
  for i in range(12):
    _jsonl(root / f"s{i:02d}.jsonl", _texts(300, seed=i))
  out = tmp_path / "out"
  code = (f"from data import prepare_corpus; prepare_corpus({str(out)!r}, {str(root)!r}, vocab_size=300, "
          "chunk_size=64, eval_fraction=0.1, workers=1, verbose=False)")
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  proc = subprocess.Popen([sys.executable, "-c", code], env=env)
  units = tmp_path / ".out.partial" / "units"
  deadline = time.time() + 120
  while len(list(units.glob("*.json"))) < 2 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = sorted(p.name for p in units.glob("*.json"))
  assert 2 <= len(done) < 12 and not (out / "meta.json").exists()
  before = {p: (units / p).stat().st_mtime_ns for p in done}

  import contextlib
  import io
  log = io.StringIO()
  with contextlib.redirect_stdout(log):
    resumed = prepare_corpus(out, root, vocab_size=300, chunk_size=64, eval_fraction=0.1, workers=1, verbose=True)
  assert "resuming the interrupted preparation" in log.getvalue()
  assert f"{len(done)} of 12 units were already done" in log.getvalue()
  assert resumed.meta["prepare"]["units"] == 12 - len(done)
  fresh = prepare_corpus(tmp_path / "fresh", root, vocab_size=300, chunk_size=64, eval_fraction=0.1, workers=1,
                         verbose=False)
  assert _files(resumed) == _files(fresh) and _meta_without_run(resumed) == _meta_without_run(fresh)
  assert before and not (tmp_path / ".out.partial").exists()


def test_partial_preparation_with_other_settings_is_discarded(tmp_path, capsys):
  root = tmp_path / "c"
  root.mkdir()
  for i in range(3):
    _jsonl(root / f"s{i}.jsonl", _texts(20, seed=i))
  partial = tmp_path / ".out.partial"
  partial.mkdir()
  (partial / "plan.json").write_text(json.dumps({"eval_fraction": 0.5}))
  info = prepare_corpus(tmp_path / "out", root, eval_fraction=0.2, **{**OPTS, "verbose": True})
  assert "discarding" in capsys.readouterr().out and info.n_docs["train"] > 0


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  root = tmp_path_factory.mktemp("sharded")
  for i in range(3):
    _jsonl(root / f"s{i}.jsonl", _texts(60, seed=i))
  return ensure_prepared(root / "data", corpus=root / "*.jsonl", eval_fraction=0.1, shard_mb=0.001, **OPTS)


def test_windows_read_across_shards(sharded):
  shard_list = sharded.shards("train")
  assert len(shard_list) > 10 and {s.n_tokens for s in shard_list} != {shard_list[0].n_tokens}
  windows = pipeline.TokenWindows(sharded, "train", seq_len=100)
  stream = np.concatenate([pipeline.TokenWindows(sharded, "train", 1).tokens(0, sharded.n_tokens["train"])])
  tok, bos = sharded.tokenizer, sharded.bos_id
  docs = [d for d in corpus_lib.all_documents(pathlib.Path(sharded.data_dir).parent / "*.jsonl")
          if not shards.held_out(d.name, 0.1, tuple(sharded.meta["flipped_documents"]))]
  expected = np.concatenate([[bos] + tok.encode(d.text) for d in docs])
  np.testing.assert_array_equal(stream, expected)
  for i in range(0, len(windows), 7):  # every 7th window, many of them across a shard boundary
    np.testing.assert_array_equal(windows[i]["inputs"], stream[i * 100:i * 100 + 100])


def test_multi_shard_iterator_resumes_exactly(sharded, tmp_path):
  import grain
  import orbax.checkpoint as ocp

  it = train_iterator(sharded, seq_len=32, global_batch_size=8, seed=3)
  batches = [next(it) for _ in range(5)]
  with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
    mgr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mgr.wait_until_finished()
    after = [next(it) for _ in range(4)]
    resumed = train_iterator(sharded, seq_len=32, global_batch_size=8, seed=3)
    mgr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  for a, b in zip(after, [next(resumed) for _ in range(4)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  for p in range(2):  # and a process's slice is the same rows of the same global batch on any process count
    part = next(train_iterator(sharded, seq_len=32, global_batch_size=8, seed=3, process_index=p, process_count=2))
    np.testing.assert_array_equal(part["inputs"], batches[0]["inputs"][p * 4:(p + 1) * 4])


def test_format_1_dirs_are_still_read(sharded, tmp_path):
  """A data dir made before sharding (one <split>.array_record each, document lists in meta.json)."""
  import shutil
  old = tmp_path / "old"
  old.mkdir()
  shutil.copy(sharded.tokenizer_path, old / "tokenizer.model")
  meta = {k: v for k, v in sharded.meta.items() if k in ("corpus", "vocab_size", "bos_id", "eos_id", "dtype",
                                                          "chunk_size", "unigram_entropy_nats", "tokenizer")}
  meta.update(format_version=1, eval_fraction=0.1, splits={})
  for split in ("train", "eval"):
    src = sharded.shards(split)[0]
    shutil.copy(src.path, old / f"{split}.array_record")
    meta["splits"][split] = {"files": [f"{split}.array_record"], "n_tokens": src.n_tokens, "n_chunks": src.n_chunks,
                             "n_docs": 1, "n_chars": 1, "documents": [split]}
  (old / "meta.json").write_text(json.dumps(meta))
  info = load_info(old)
  w = pipeline.TokenWindows(info, "train", seq_len=16)
  np.testing.assert_array_equal(w.tokens(0, 40), pipeline.TokenWindows(sharded, "train", 16).tokens(0, 40))


def test_cli_prepare_formats_flags_and_one_line_errors(tmp_path):
  root = tmp_path / "c"
  _bad_corpus(root)
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  cmd = [sys.executable, "-m", "data", "prepare", "--corpus", str(root), "--out", str(tmp_path / "out"),
         "--vocab_size", "300", "--eval_fraction", "0.2", "--workers", "2"]
  bad = subprocess.run(cmd[:-1] + ["1"], capture_output=True, text=True, env=env)
  assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "bad.jsonl:2" in bad.stderr
  assert "Traceback" not in bad.stderr
  ok = subprocess.run(cmd + ["--on_error", "skip"], capture_output=True, text=True, env=env)
  assert ok.returncode == 0, ok.stderr
  assert "skipped bad input: 8" in ok.stdout and "2 local worker(s)" in ok.stdout and "peak RSS" in ok.stdout
  stray = subprocess.run(cmd + ["--runner=DirectRunner"], capture_output=True, text=True, env=env)
  assert stray.returncode == 2 and "only --engine beam" in stray.stderr
