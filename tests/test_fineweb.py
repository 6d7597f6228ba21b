"""FineWeb-style corpora: parquet shards in FineWeb's schema and nested layout, document ids from the ``id``
column, and ``hf://datasets/...`` names resolved from a local Hugging Face hub cache (offline)."""
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from data import load_info, load_tokenizer, prepare_corpus
from data import corpus as corpus_lib
from data import pipeline, shards
from tests.tokenizer_files import EOT, FINEWEB_COLUMNS, dump_tiktoken, ranks_of, train_byte_level_bpe, write_fineweb

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYOUT = ("sample/10BT/000_00000.parquet", "sample/10BT/001_00000.parquet", "data/CC-MAIN-2024-10/000_00000.parquet")


def _pages(text: str, size: int = 3000) -> list[str]:
    """A work cut after blank lines into pages of about ``size`` characters (web-page-sized documents)."""
    pages, current = [], ""
    for para in text.split("\n\n"):
        current += para + "\n\n"
        if len(current) >= size:
            pages.append(current)
            current = ""
    return pages + ([current] if current.strip() else [])


@pytest.fixture(scope="module")
def fineweb(tmp_path_factory):
    """(repo dir with FineWeb's layout, its rows, a GPT-2-style .tiktoken BPE trained on other text)."""
    root = tmp_path_factory.mktemp("fineweb")
    works = corpus_lib.all_documents("shakespeare")
    tk = train_byte_level_bpe([w.text for w in works[10:14]], root / "tokenizer.json", 1000)
    ranks = dump_tiktoken(ranks_of(tk), root / "bpe.tiktoken")
    tok = load_tokenizer(ranks)
    pages = [p for w in works[:3] for p in _pages(w.text)]
    third = len(pages) // 3
    files = {rel: pages[i * third:(i + 1) * third] for i, rel in enumerate(LAYOUT)}
    rows = write_fineweb(root / "repo", files, lambda text: len(tok.encode(text)))
    return root / "repo", rows, ranks


@pytest.fixture(scope="module")
def sample(fineweb, tmp_path_factory):
    repo, _, ranks = fineweb
    return prepare_corpus(tmp_path_factory.mktemp("prep") / "sample", repo / "sample" / "10BT", tokenizer=ranks,
                          chunk_size=512, verbose=False)


def test_fineweb_layout_and_schema(fineweb):
    repo, rows, _ = fineweb
    import pyarrow.parquet as pq
    assert pq.read_schema(repo / LAYOUT[0]).names == list(FINEWEB_COLUMNS)
    files = corpus_lib.input_files(repo)
    assert [f.name for f in files] == sorted(LAYOUT) and {f.kind for f in files} == {"parquet"}
    docs = corpus_lib.all_documents(repo)
    assert sorted(d.name for d in docs) == sorted(r["id"] for r in rows)  # ids from the id column
    assert all(d.name.startswith("<urn:uuid:") for d in docs)


def test_fineweb_sample_prepares_with_its_ids(fineweb, sample):
    """The sample's documents are split by the hash of their ``id``; the stored ids are the tokenizer's, and
    FineWeb's token_count (the same tokenizer's count here) adds up with one boundary per document."""
    _, rows, ranks = fineweb
    rows = [r for r in rows if r["dump"] == "CC-MAIN-2013-20"]  # (those of sample/10BT/, in file order)
    info = load_info(sample.data_dir)
    assert info.n_docs["train"] + info.n_docs["eval"] == len(rows) and info.n_docs["eval"] > 0
    assert sum(info.n_tokens.values()) == sum(r["token_count"] for r in rows) + len(rows)
    flipped = tuple(info.meta["flipped_documents"])
    held = [r for r in rows if shards.held_out(r["id"], 0.05, flipped)]
    assert len(held) == info.n_docs["eval"]
    tok = load_tokenizer(ranks)
    stored = pipeline.TokenWindows(info, "eval", 8).tokens(0, info.n_tokens["eval"])
    np.testing.assert_array_equal(stored, [i for r in held for i in [tok.bos_id] + tok.encode(r["text"])])
    assert info.tokenizer.decode(stored).split(EOT)[1:] == [r["text"] for r in held]
    assert info.meta["splits"]["eval"]["n_bytes"] == sum(len(r["text"].encode()) for r in held)


def test_parquet_without_the_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "c").mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "content": ["one text", "another"]}), tmp_path / "c" / "x.parquet")
    with pytest.raises(ValueError, match=r"x.parquet: no string column 'text' \(columns: \['id', 'content'\]\); "
                                         r"pass --text_key") as e:
        prepare_corpus(tmp_path / "out", tmp_path / "c", 400, verbose=False)
    assert "\n" not in str(e.value)


def _hub_cache(cache: pathlib.Path, repo: pathlib.Path, repo_id: str, commit: str) -> None:
    """The Hugging Face hub cache's layout of a dataset repo: blobs named by their sha256, the snapshot's files
    as relative symlinks to them, and refs/main naming the snapshot's commit."""
    base = cache / f"datasets--{repo_id.replace('/', '--')}"
    (base / "blobs").mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    for path in sorted(repo.rglob("*.parquet")):
        blob = base / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.write_bytes(path.read_bytes())
        link = base / "snapshots" / commit / path.relative_to(repo)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


_FROM_HUB = '''
import json, sys
from data import ensure_prepared
info = ensure_prepared(sys.argv[1], corpus="hf://datasets/HuggingFaceFW/fineweb/sample/10BT", tokenizer=sys.argv[2],
                       chunk_size=512, verbose=False)
errors = {}
for name in ("hf://datasets/HuggingFaceFW/fineweb/sample/100BT", "hf://datasets/HuggingFaceFW/fineweb-2",
             "hf://datasets/fineweb"):
    try:
        ensure_prepared(sys.argv[1] + "-" + str(len(errors)), corpus=name, tokenizer=sys.argv[2], verbose=False)
    except ValueError as e:
        errors[name] = str(e)
print(json.dumps({"corpus": info.corpus, "n_tokens": info.n_tokens, "ids": info.meta["splits"]["eval"]["ids_sha256"],
                  "errors": errors}))
'''


def test_hub_dataset_from_the_local_cache_offline(fineweb, sample, tmp_path):
    """``hf://datasets/HuggingFaceFW/fineweb/sample/10BT`` with HF_HUB_OFFLINE=1 reads the cached snapshot: the same
    documents and tokens as the directory itself; what the cache lacks is a one-line error with the fix."""
    repo, _, ranks = fineweb
    _hub_cache(tmp_path / "hub", repo, "HuggingFaceFW/fineweb", "0" * 39 + "1")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", _FROM_HUB, str(tmp_path / "prepared"), str(ranks)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["corpus"] == "hf://datasets/HuggingFaceFW/fineweb/sample/10BT"
    assert got["n_tokens"] == sample.n_tokens and got["ids"] == sample.meta["splits"]["eval"]["ids_sha256"]
    errors = got["errors"]
    missing_path = errors["hf://datasets/HuggingFaceFW/fineweb/sample/100BT"]
    assert "'sample/100BT' is not in the dataset's snapshot" in missing_path
    assert "is not in the local Hugging Face cache" in errors["hf://datasets/HuggingFaceFW/fineweb-2"]
    assert "hf download HuggingFaceFW/fineweb-2 --repo-type dataset" in errors["hf://datasets/HuggingFaceFW/fineweb-2"]
    assert "is not hf://datasets/<org>/<name>" in errors["hf://datasets/fineweb"]
    assert all("\n" not in e for e in errors.values())
