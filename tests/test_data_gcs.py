"""Corpus preparation reading from and writing to object storage (gs://), against the GCS API emulator
(tests/gcs_bucket.py): the same input files and documents as from a local disk, the same output files byte for
byte with the local worker pool and with Beam's DirectRunner, resume after kill -9, reading the data back, and
clear errors."""
import contextlib
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import time

import grain
import numpy as np
import pytest

from tests.gcs_bucket import ROOT, blob, gcs, names  # noqa: F401  (skips without the gs:// libraries)
from data import corpus as corpus_lib  # noqa: E402
from data import ensure_prepared, load_info, pipeline, prepare_corpus, shards, train_iterator  # noqa: E402
from infra.files import upload  # noqa: E402
from tests.test_data_scale import _files, _jsonl, _meta_without_run, _parquet, _texts, _zst  # noqa: E402

OPTS = dict(vocab_size=300, chunk_size=64, shard_mb=0.002, verbose=False)  # several shards a unit


def _upload_tree(local_dir, uri):
    for path in sorted(local_dir.rglob("*")):
        if path.is_file():
            blob(f"{uri}/{path.relative_to(local_dir)}").upload_from_filename(str(path))


def _downloaded(uri) -> dict[str, bytes]:
    """Every object under ``uri`` but meta.json, as ``_files`` gives a local data dir's files."""
    return {name: blob(f"{uri}/{name}").download_as_bytes() for name in names(uri) if name != "meta.json"}


def _assert_same_as(uri, local):
    """The data dir at ``uri`` holds the files of the local data dir ``local`` byte for byte (every shard and the
    tokenizer), and the same meta.json but for the corpus's location and the run's statistics."""
    assert _downloaded(uri) == _files(local)
    meta = json.loads(blob(f"{uri}/meta.json").download_as_bytes())
    assert meta["corpus"].startswith("gs://")
    assert {k: v for k, v in meta.items() if k not in ("prepare", "created_unix", "corpus")} == {
        k: v for k, v in _meta_without_run(local).items() if k != "corpus"}


@pytest.fixture(scope="module")
def corpus(gcs, tmp_path_factory):
    """(local dir, its copy in the bucket): every input format, two .txt files in a subdirectory."""
    root = tmp_path_factory.mktemp("corpus")
    _jsonl(root / "a.jsonl", _texts(40, seed=0))
    _jsonl(root / "b.json.gz", _texts(40, seed=1), gzip.open)
    _zst(root / "c.jsonl.zst", _texts(40, seed=2))
    _parquet(root / "d.parquet", _texts(40, seed=3))
    (root / "txt").mkdir()
    for i, text in enumerate(_texts(2, seed=4)):
        (root / "txt" / f"e{i}.txt").write_text(text)
    (root / "README.md").write_text("not part of the corpus")
    _upload_tree(root, f"{gcs}/corpus")
    return root, f"{gcs}/corpus"


@pytest.fixture(scope="module")
def local(corpus, tmp_path_factory):
    """The corpus prepared from the local disk into a local dir: what every gs:// preparation must equal."""
    return prepare_corpus(tmp_path_factory.mktemp("local") / "data", corpus[0], **OPTS)


def test_gs_corpus_lists_and_reads_like_local(corpus):
    root, uri = corpus
    local_files, gs_files = corpus_lib.input_files(root), corpus_lib.input_files(uri)
    assert [(f.name, f.kind, f.size) for f in gs_files] == [(f.name, f.kind, f.size) for f in local_files]
    assert gs_files[0].path == f"{uri}/a.jsonl"
    assert corpus_lib.all_documents(uri) == corpus_lib.all_documents(root)
    by_glob = corpus_lib.input_files(f"{uri}/*.json*")
    assert [f.name for f in by_glob] == [f.name for f in corpus_lib.input_files(root / "*.json*")] == [
        "a.jsonl", "b.json.gz", "c.jsonl.zst"]
    one = corpus_lib.input_files(f"{uri}/c.jsonl.zst")
    assert [(f.path, f.name, f.kind) for f in one] == [(f"{uri}/c.jsonl.zst", "c.jsonl.zst", "jsonl")]


@pytest.fixture(scope="module")
def prepared(gcs, corpus):
    """The corpus in the bucket prepared by two local workers into a data dir in the bucket."""
    return ensure_prepared(f"{gcs}/prepared/local-engine", corpus[1], workers=2, **OPTS)  # under the gs:// lease


def test_local_engine_gs_to_gs_writes_the_local_files(gcs, corpus, local, prepared):
    info, out = prepared, f"{gcs}/prepared/local-engine"
    assert info.data_dir == out and info.corpus == corpus[1] and info.meta["prepare"]["workers"] == 2
    assert len(local.files("train")) > 5
    _assert_same_as(out, local)
    assert not any(n.startswith(".local-engine") for n in names(f"{gcs}/prepared"))  # no partial dir, no lease
    assert ensure_prepared(out, corpus[1], **OPTS).identity == load_info(out).identity == local.identity  # reused
    prepare_corpus(out, corpus[1], overwrite=True, **OPTS)  # a complete gs:// data dir redone in its place
    _assert_same_as(out, local)

    # training reads it back from the bucket: ArrayRecord's own GCS client reads the shards (one HTTP request a
    # record, so only the first and last 5 records of each split here)
    for split in ("train", "eval"):
        n, k = local.n_tokens[split], 5 * local.chunk_size
        for start, stop in ((0, k), (n - k, n)):
            np.testing.assert_array_equal(pipeline.TokenWindows(info, split, 1).tokens(start, stop),
                                          pipeline.TokenWindows(local, split, 1).tokens(start, stop))
    a, b = (next(train_iterator(i, seq_len=16, global_batch_size=4, seed=1)) for i in (local, info))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_training_reads_a_gs_data_dir(prepared, tmp_path):
    from tests.test_checkpoint import losses, make_config
    from train.loop import train

    cfg = make_config(tmp_path / "run", prepared.data_dir, steps=3, eval_every=3, checkpoint_every=100,
                      **{"data.vocab_size": OPTS["vocab_size"]})
    summary = train(cfg)
    assert summary["step"] == 3 and np.isfinite(summary["eval_loss"]), summary
    assert all(np.isfinite(loss) for loss in losses(tmp_path / "run").values())


def test_a_large_shard_is_uploaded_and_read_back(gcs, tmp_path):
    """A shard over 5 MiB goes up in a resumable upload (smaller ones in one request), and ArrayRecord's GCS
    reader, which opens a file with a request for its last MiB (a suffix range: tests/gcs_emulator.py), reads
    it back record for record."""
    from array_record.python.array_record_module import ArrayRecordWriter

    records = [np.random.default_rng(i).bytes(8192) for i in range(750)]
    writer = ArrayRecordWriter(str(tmp_path / "big.array_record"), "group_size:1,uncompressed")
    for record in records:
        writer.write(record)
    writer.close()
    assert (tmp_path / "big.array_record").stat().st_size > 5 * 2**20
    upload(tmp_path / "big.array_record", f"{gcs}/big/big.array_record")
    assert blob(f"{gcs}/big/big.array_record").download_as_bytes() == (tmp_path / "big.array_record").read_bytes()
    source = grain.sources.ArrayRecordDataSource([f"{gcs}/big/big.array_record"])
    assert len(source) == 750 and [source[i] for i in (0, 400, 749)] == [records[i] for i in (0, 400, 749)]
    assert source.__getitems__(list(range(740, 750))) == records[740:]


def test_beam_gs_to_gs_writes_the_local_files(gcs, corpus, local):
    pytest.importorskip("apache_beam")
    out = f"{gcs}/prepared/beam"
    info = prepare_corpus(out, corpus[1], engine="beam", **OPTS)  # DirectRunner
    assert info.meta["prepare"]["engine"] == "beam"
    _assert_same_as(out, local)


def test_interrupted_gs_preparation_resumes(gcs, corpus, tmp_path):
    """Killed with SIGKILL after some units: the rerun keeps those (their manifests and shards in the bucket)
    and gives a local preparation's files; no shard object is ever incomplete."""
    root = tmp_path / "c"
    root.mkdir()
    for i in range(12):
        _jsonl(root / f"s{i:02d}.jsonl", _texts(150, seed=i))
    src, out = f"{gcs}/resume-corpus", f"{gcs}/resume/data"
    _upload_tree(root, src)
    opts = dict(vocab_size=300, chunk_size=64, eval_fraction=0.1, shard_mb=0.01, workers=1)
    code = f"from data import prepare_corpus; prepare_corpus({out!r}, {src!r}, verbose=False, **{opts!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)})
    partial = f"{gcs}/resume/.data.partial"
    deadline = time.time() + 120
    while (sum(n.endswith(".json") for n in names(f"{partial}/units")) < 2 and proc.poll() is None
           and time.time() < deadline):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [n for n in names(f"{partial}/units") if n.endswith(".json")]
    assert 2 <= len(done) < 12 and not blob(f"{out}/meta.json").exists()
    left = [n for n in names(partial) if n.endswith(".array_record")]
    assert left and all(len(grain.sources.ArrayRecordDataSource([f"{partial}/{n}"])) > 0 for n in left)

    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        resumed = prepare_corpus(out, src, verbose=True, **opts)
    assert "resuming the interrupted preparation" in log.getvalue()
    assert f"{len(done)} of 12 units were already done" in log.getvalue()
    assert resumed.meta["prepare"]["units"] == 12 - len(done)
    fresh = prepare_corpus(tmp_path / "fresh", root, verbose=False, **opts)
    assert _downloaded(out) == _files(fresh)
    assert names(partial) == []


def test_missing_gs_corpus_is_a_clear_error(gcs):
    with pytest.raises(ValueError, match=rf"'{gcs}/nothing' is neither .*no object is at or under {gcs}/nothing"):
        corpus_lib.input_files(f"{gcs}/nothing")
    with pytest.raises(ValueError, match=rf"corpus '{gcs}/nothing/\*.jsonl' holds no input files"):
        corpus_lib.input_files(f"{gcs}/nothing/*.jsonl")
    cmd = [sys.executable, "-m", "data", "prepare", "--corpus", f"{gcs}/nothing/*.jsonl.zst", "--out",
           f"{gcs}/prepared/none"]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 2 and run.stderr.startswith(f"error: corpus '{gcs}/nothing/*.jsonl.zst' holds no"), \
        run.stderr
    assert "Traceback" not in run.stderr and names(f"{gcs}/prepared/none") == []


def test_bad_gs_line_names_the_object_and_line(gcs, tmp_path):
    uri = f"{gcs}/bad/x.jsonl"
    blob(uri).upload_from_string(b'{"text": "fine"}\n{not json\n')
    with pytest.raises(ValueError, match=rf"{uri}:2: not JSON"):
        prepare_corpus(tmp_path / "out", uri, **OPTS)


def test_dataflow_needs_the_corpus_and_data_dir_on_gs(gcs, corpus):
    pytest.importorskip("apache_beam")
    from data import beam

    units = corpus_lib.plan_units(corpus_lib.input_files(corpus[0]))
    job = shards.UnitJob(f"{gcs}/prepared/x", f"{gcs}/prepared/x/tokenizer.model", 0.1, 64, 1000, "text", "stop")
    with pytest.raises(ValueError, match=rf"share no filesystem, and {corpus[0]}/a.jsonl is a local path"):
        beam.run_units(job, units, ["--runner=DataflowRunner"])
    with pytest.raises(ValueError, match="/tmp/out is a local path"):
        beam.run_units(shards.UnitJob("/tmp/out", "/tmp/out/tokenizer.model", 0.1, 64, 1000, "text", "stop"), [],
                       ["--runner=DataflowRunner"])
