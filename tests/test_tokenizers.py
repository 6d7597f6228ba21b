"""Pretrained tokenizers at preparation: a tokenizer.json (tokenizers), a .tiktoken ranks file and a tiktoken
encoding name (tiktoken), next to the trained sentencepiece model; every stored id is checked against the
library's own encoder, built directly from the library."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from data import ensure_prepared, load_info, load_tokenizer, prepare_corpus
from data import corpus as corpus_lib
from data import pipeline, shards
from data.tokenizer_source import open_pretrained
from data.tokenizer_tiktoken import GPT2_PATTERN, parse_ranks
from tests.tokenizer_files import EOT, dump_tiktoken, ranks_of, train_byte_level_bpe

BPE_VOCAB = 1000  # ids of the trained byte-level BPE; <|endoftext|> is id 1000
ROOT = pathlib.Path(__file__).resolve().parents[1]
TRICKY = ["Hello  world\u00a0\u2003 it's  \t\n\n  x\x1c.y 123 <|endoftext|> \u00e9\U0001F600",
          "a   ", "a \n", "  \n\n b", "x\u3000\u3000y\u2028z", "don't   stop!!  \r\n 42.5%   \x0b\x0cend"]


@pytest.fixture(scope="module")
def works():
    """Twelve works of Shakespeare: the first six train the BPE, all twelve are the corpus."""
    return corpus_lib.all_documents("shakespeare")[:12]


@pytest.fixture(scope="module")
def files(works, tmp_path_factory):
    """(tokenizer.json, .tiktoken of the same BPE, corpus dir of one .txt per work)."""
    root = tmp_path_factory.mktemp("tok")
    tk = train_byte_level_bpe([w.text for w in works[:6]], root / "tokenizer.json", BPE_VOCAB)
    corpus = root / "corpus"
    corpus.mkdir()
    for w in works:
        (corpus / f"{w.name}.txt").write_text(w.text)
    return root / "tokenizer.json", dump_tiktoken(ranks_of(tk), root / "bpe.tiktoken"), corpus


@pytest.fixture(scope="module")
def prepared(files, tmp_path_factory):
    """The corpus prepared with each pretrained kind."""
    hf_json, ranks, corpus = files
    root = tmp_path_factory.mktemp("prep")
    return {kind: prepare_corpus(root / kind, corpus, tokenizer=tok, eval_fraction=0.2, chunk_size=256,
                                 verbose=False)
            for kind, tok in (("hf", hf_json), ("tiktoken", ranks))}


def _library_encoder(kind, files):
    """The library's own encoder of the test BPE: tokenizers.Tokenizer, or tiktoken.Encoding with GPT-2's pattern."""
    hf_json, ranks, _ = files
    if kind == "hf":
        from tokenizers import Tokenizer
        tk = Tokenizer.from_file(str(hf_json))
        tk.encode_special_tokens = True
        return lambda text: tk.encode(text, add_special_tokens=False).ids
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    mergeable = load_tiktoken_bpe(str(ranks))
    enc = tiktoken.Encoding("test", pat_str=GPT2_PATTERN, mergeable_ranks=mergeable,
                            special_tokens={EOT: len(mergeable)})
    return enc.encode_ordinary


def _stored(info, split):
    return pipeline.TokenWindows(info, split, seq_len=8).tokens(0, info.n_tokens[split])


def test_tiktoken_file_is_the_libraries_encoding(files, works):
    """Our ranks parser reads what tiktoken's does; TiktokenTokenizer encodes as tiktoken.Encoding built from the
    file with GPT-2's pattern, and (the same BPE) as the tokenizer.json; special tokens' text stays text."""
    from tiktoken.load import load_tiktoken_bpe
    hf_json, ranks, _ = files
    assert parse_ranks(ranks.read_bytes(), str(ranks)) == load_tiktoken_bpe(str(ranks))
    tik, hf = load_tokenizer(ranks), load_tokenizer(hf_json)
    enc = _library_encoder("tiktoken", files)
    for text in [w.text[:20000] for w in works[6:]] + TRICKY:
        ids = tik.encode(text)
        assert ids == enc(text) == hf.encode(text) == _library_encoder("hf", files)(text)
        assert tik.decode(ids) == hf.decode(ids) == text
        assert EOT not in text or tik.bos_id not in ids
    assert (tik.vocab_size, tik.bos_id, tik.eos_id, tik.unk_id) == (BPE_VOCAB + 1, BPE_VOCAB, BPE_VOCAB, None)
    assert (hf.vocab_size, hf.bos_id, hf.boundary_token) == (BPE_VOCAB + 1, BPE_VOCAB, EOT)
    assert tik.encode_batch(TRICKY, num_threads=2) == hf.encode_batch(TRICKY) == [enc(t) for t in TRICKY]


@pytest.mark.parametrize("kind", ["hf", "tiktoken"])
def test_prepare_with_a_pretrained_tokenizer(prepared, files, kind, capsys):
    """The stored streams are [<|endoftext|>] + the library's ids of each document; decoding gives the text back."""
    info = load_info(prepared[kind].data_dir)
    entry = info.meta["tokenizer"]
    source = files[0] if kind == "hf" else files[1]
    assert entry["kind"] == info.tokenizer_kind == kind and entry["source"] == str(source)
    assert entry["file"] == {"hf": "tokenizer.json", "tiktoken": "tokenizer.tiktoken"}[kind]
    assert entry["sha256"] == shards.sha256_file(source) == shards.sha256_file(info.tokenizer_path)
    assert entry["eot_token"] == EOT and (kind == "hf" or entry["pattern"] == GPT2_PATTERN)
    assert kind == "hf" or entry["special_tokens"] == {EOT: BPE_VOCAB}
    assert (info.vocab_size, info.bos_id, info.eos_id, info.dtype) == (BPE_VOCAB + 1, BPE_VOCAB, BPE_VOCAB, "uint16")
    encode = _library_encoder(kind, files)
    flipped = tuple(info.meta["flipped_documents"])
    for split in ("train", "eval"):
        docs = [d for d in corpus_lib.all_documents(files[2])
                if shards.held_out(d.name, 0.2, flipped) == (split == "eval")]
        want = [i for d in docs for i in [BPE_VOCAB] + encode(d.text)]
        stored = _stored(info, split)
        np.testing.assert_array_equal(stored, want)
        texts = info.tokenizer.decode(stored).split(EOT)[1:]
        assert texts == [d.text for d in docs]
        assert info.meta["splits"][split]["n_bytes"] == sum(len(t.encode()) for t in texts)
    from data.__main__ import main
    assert main(["info", info.data_dir]) == 0
    assert f"vocab {BPE_VOCAB + 1} ({kind} {source}; documents begin with {EOT} = id {BPE_VOCAB})" in \
        capsys.readouterr().out


def test_long_documents_in_pieces_give_the_same_shards(prepared, files, tmp_path, monkeypatch):
    """With GPT-2's pattern a long document is encoded in pieces cut where whitespace runs start: the shards are
    byte for byte those of whole documents, and cuts happen in the tricky texts' whitespace too."""
    toks = (load_tokenizer(files[0]), load_tokenizer(files[1]))
    for tok in toks:
        for text in TRICKY + [files[2].joinpath(os.listdir(files[2])[0]).read_text()[:5000]]:
            pieces = list(tok.encode_pieces(text * 3, 7))
            assert len(pieces) > 1 and [i for p in pieces for i in p] == tok.encode(text * 3)
    alphabet = list("ab's ll've\t\n\r.,!1") + ["\u00a0", "\u3000", "\u2028", "\x1c", "\x85", "\u00e9", "\U0001F600"]
    rng = np.random.default_rng(0)
    for _ in range(300):  # random strings dense in whitespace of every kind, contractions, digits and symbols
        text = "".join(rng.choice(alphabet, size=80))
        for tok in toks:
            assert [i for p in tok.encode_pieces(text, 3) for i in p] == tok.encode(text), repr(text)
    monkeypatch.setattr(shards, "_ENCODE_CHARS", 500)
    got = prepare_corpus(tmp_path / "d", files[2], tokenizer=files[1], eval_fraction=0.2, chunk_size=256,
                         workers=1, verbose=False)
    want = prepared["tiktoken"]
    names = sorted(str(p.relative_to(want.data_dir)) for p in pathlib.Path(want.data_dir).rglob("*.array_record"))
    for name in names:
        assert (pathlib.Path(got.data_dir) / name).read_bytes() == (pathlib.Path(want.data_dir) / name).read_bytes()


def test_no_cut_without_a_safe_place(files):
    """Another split pattern (here, as cl100k's, punctuation joined with the newlines after it) or a normalizer:
    documents are encoded whole."""
    joined = r"""'s|'t| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s+(?!\S)|\s+"""
    ranks = load_tokenizer(files[1], pattern=joined)
    text = "a.\n\nb c " * 50
    assert ranks.cut_pattern() is None and list(ranks.encode_pieces(text, 10)) == [ranks.encode(text)]
    assert ranks.encode("a.\n\nb") != load_tokenizer(files[1]).encode("a.\n\nb")  # (the pattern is used)
    layout = json.loads(files[0].read_text())
    layout["normalizer"] = {"type": "NFC"}
    normalized = files[0].with_name("normalized.json")
    normalized.write_text(json.dumps(layout))
    assert load_tokenizer(normalized).cut_pattern() is None


def test_bad_tokenizers_are_one_line_errors(files, tmp_path):
    hf_json, ranks, corpus = files
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "junk.tiktoken").write_text("QUI= 0\nnot base64!! 1\n")
    (tmp_path / "gaps.tiktoken").write_text("QQ== 0\nQg== 5\n")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    layout = json.loads(hf_json.read_text())
    layout["added_tokens"] = []
    (tmp_path / "no_eot.json").write_text(json.dumps(layout))
    cases = [(tmp_path / "junk.json", None, "is not a Hugging Face tokenizer.json"),
             (tmp_path / "junk.tiktoken", None, r"junk.tiktoken:2 is not a '<base64 token> <rank>' line"),
             (tmp_path / "gaps.tiktoken", None, "ranks are not 0..1"),
             (tmp_path / "vocab.txt", None, "of no known kind"),
             (tmp_path / "missing.json", None, "does not exist"),
             ("no_such_encoding", None, "of no known kind"),
             (tmp_path / "no_eot.json", None, "no end-of-text token.*--eot_token"),
             (hf_json, "Ġthe", "is not one of its special added tokens"),
             (ranks, "<|im_end|>", "is not one of its special tokens")]
    for tok, eot, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            prepare_corpus(tmp_path / "out", corpus, tokenizer=tok, eot_token=eot, verbose=False)
        assert "\n" not in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="give tokenizer too"):
        prepare_corpus(tmp_path / "out", corpus, eot_token=EOT, verbose=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_tokenizer_config_names_the_end_of_text_token(files, tmp_path):
    """A tokenizer_config.json beside a tokenizer.json names its end-of-text token (its eos_token) when that is a
    special token; --eot_token overrides it."""
    from tokenizers import Tokenizer
    tk = Tokenizer.from_file(str(files[0]))
    tk.add_special_tokens(["</s>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    assert open_pretrained(tmp_path / "tokenizer.json").tokenizer.boundary_token == EOT  # first known one
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    got = open_pretrained(tmp_path / "tokenizer.json")
    assert got.tokenizer.boundary_token == "</s>" and got.tokenizer.bos_id == BPE_VOCAB + 1
    assert got.identity()["eot_token"] == "</s>"
    assert open_pretrained(tmp_path / "tokenizer.json", EOT).tokenizer.bos_id == BPE_VOCAB
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "Ġthe"}))  # not special: not taken
    assert open_pretrained(tmp_path / "tokenizer.json").tokenizer.boundary_token == EOT


def test_ensure_prepared_compares_tokenizer_identity(prepared, files, tmp_path):
    """A complete dir is reused for the same tokenizer bytes from anywhere; another tokenizer, another
    eot_token or a trained one is refused."""
    hf_json, ranks, corpus = files
    info = prepared["hf"]
    copy = tmp_path / "elsewhere.json"
    copy.write_bytes(hf_json.read_bytes())
    kw = dict(corpus=corpus, eval_fraction=0.2, verbose=False)
    assert ensure_prepared(info.data_dir, tokenizer=copy, eot_token=EOT, **kw) == info
    for tok, eot in ((ranks, None), (hf_json, "<|other|>"), (None, None)):
        with pytest.raises(ValueError, match="was prepared with .*tokenizer"):
            ensure_prepared(info.data_dir, tokenizer=tok, eot_token=eot, **kw)
    assert open_pretrained(copy).sha256 == info.meta["tokenizer"]["sha256"]


def test_vocabulary_beyond_uint16(works, tmp_path):
    """token_dtype: uint16 up to 65,536 ids, uint32 beyond; a 65,793-id tiktoken BPE (every byte and byte pair)
    stores uint32 ids, those of tiktoken.Encoding."""
    assert shards.token_dtype(65_536) == np.uint16 and shards.token_dtype(65_537) == np.uint32
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({bytes([a, b]): 256 + a * 256 + b for a in range(256) for b in range(256)})
    path = dump_tiktoken(ranks, tmp_path / "pairs.tiktoken")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for w in works[:3]:
        (corpus / f"{w.name}.txt").write_text(w.text[:30000])
    info = prepare_corpus(tmp_path / "d", corpus, tokenizer=path, chunk_size=256, verbose=False)
    assert (info.vocab_size, info.bos_id, info.dtype) == (65_793, 65_792, "uint32")
    import tiktoken
    enc = tiktoken.Encoding("pairs", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 65_792})
    flipped = tuple(info.meta["flipped_documents"])
    docs = [d for d in corpus_lib.all_documents(corpus) if not shards.held_out(d.name, 0.05, flipped)]
    stored = _stored(info, "train")
    np.testing.assert_array_equal(stored, [i for d in docs for i in [65_792] + enc.encode_ordinary(d.text)])
    assert stored.max() > 65_535


_PLUGIN = '''
"""A tiktoken encoding registered as tiktoken registers its own (a tiktoken_ext plugin module)."""
import os
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str


def test_bpe():
    ranks = load_tiktoken_bpe(os.environ["TEST_BPE_RANKS"])
    return {"name": "test_bpe", "pat_str": r50k_pat_str, "mergeable_ranks": ranks,
            "special_tokens": {"<|endoftext|>": len(ranks)}}


ENCODING_CONSTRUCTORS = {"test_bpe": test_bpe}
'''

_BY_NAME = '''
import json, sys
from data import ensure_prepared, load_info
info = ensure_prepared(sys.argv[1], corpus=sys.argv[2], tokenizer="test_bpe", eval_fraction=0.2, chunk_size=256,
                       verbose=False)
again = ensure_prepared(sys.argv[1], corpus=sys.argv[2], tokenizer="test_bpe", eval_fraction=0.2, verbose=False)
try:
    ensure_prepared(sys.argv[3], corpus=sys.argv[2], tokenizer="test_bpe", eval_fraction=0.2, verbose=False)
    other = ""
except ValueError as e:
    other = str(e)
print(json.dumps({"same": again == info, "other": other, "entry": info.meta["tokenizer"]}))
'''


def test_tiktoken_encoding_name_is_stored_as_a_ranks_file(prepared, files, tmp_path):
    """``--tokenizer <encoding name>`` (gpt2 in practice; here one registered through tiktoken's plugin
    mechanism, offline): the data dir holds its ranks as tokenizer.tiktoken, meta.json the name, pattern and
    special tokens; the streams equal those of the ranks file; the name matches it again, another dir's
    tokenizer does not."""
    plugin = tmp_path / "plugins" / "tiktoken_ext"
    plugin.mkdir(parents=True)
    (plugin / "test_bpe_plugin.py").write_text(_PLUGIN)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path / 'plugins'}", "TEST_BPE_RANKS": str(files[1])}
    out = subprocess.run([sys.executable, "-c", _BY_NAME, str(tmp_path / "named"), str(files[2]),
                          prepared["hf"].data_dir], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["same"] and "was prepared with" in result["other"]
    entry = result["entry"]
    assert entry["source"] == "tiktoken:test_bpe" and entry["kind"] == "tiktoken"
    assert entry["pattern"] == GPT2_PATTERN and entry["special_tokens"] == {EOT: BPE_VOCAB}
    named = load_info(tmp_path / "named")
    assert (tmp_path / "named" / "tokenizer.tiktoken").read_bytes() == files[1].read_bytes()
    assert named.n_tokens == prepared["tiktoken"].n_tokens
    np.testing.assert_array_equal(_stored(named, "eval"), _stored(prepared["tiktoken"], "eval"))


def test_gpt2_by_name(works, tmp_path):
    """GPT-2's own BPE through tiktoken (needs its files in TIKTOKEN_CACHE_DIR or the network)."""
    import tiktoken
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # noqa: BLE001 - offline: requests' connection errors
        pytest.skip(f"tiktoken cannot load gpt2 here ({type(e).__name__})")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for w in works[:4]:
        (corpus / f"{w.name}.txt").write_text(w.text[:20000])
    info = prepare_corpus(tmp_path / "d", corpus, tokenizer="gpt2", eval_fraction=0.3, verbose=False)
    assert (info.vocab_size, info.bos_id, info.dtype) == (50_257, 50_256, "uint16")
    flipped = tuple(info.meta["flipped_documents"])
    docs = [d for d in corpus_lib.all_documents(corpus) if shards.held_out(d.name, 0.3, flipped)]
    want = [i for d in docs for i in [50_256] + enc.encode_ordinary(d.text)]
    np.testing.assert_array_equal(_stored(info, "eval"), want)


def test_config_names_a_pretrained_tokenizer(prepared, files):
    """data.tokenizer reaches ensure_prepared; the model's vocabulary is the tokenizer's padded up."""
    from configs.base import base_config
    from train.build import prepare_dataset
    from train.config import load_config, with_dataset
    cfg = base_config()
    cfg.data.dir, cfg.data.corpus, cfg.data.tokenizer = prepared["tiktoken"].data_dir, str(files[2]), str(files[1])
    cfg = load_config(cfg)
    with pytest.raises(ValueError, match="eval_fraction") as e:  # (prepared with 0.2; a config prepares with 0.05)
        prepare_dataset(cfg)
    assert "'tokenizer'" not in str(e.value)  # the tokenizer matches: it was passed on
    cfg.data.tokenizer = str(files[0])
    with pytest.raises(ValueError, match="'tokenizer'"):
        prepare_dataset(cfg)
    assert with_dataset(cfg, prepared["tiktoken"].vocab_size).model.vocab_size == 1024
    assert with_dataset(cfg, 50_257).model.vocab_size == 50_304
