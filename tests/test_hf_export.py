"""Hugging Face transformers GPT-2: the export of a run (tools.export), the import (init_from a GPT-2 dir), the
tokenizer conversion (data.hf_tokenizer) and lm-eval through the export.

The run is cpu-tiny trained 4 steps on the Shakespeare fixture on the 2x2x2 mesh (so its checkpoint is sharded);
the export is loaded by ``GPT2LMHeadModel.from_pretrained`` (PyTorch, CPU, float32)."""
import base64
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import data
from tests.helpers import tiny_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
STEPS = 4
ODD_TEXT = "Naïve café — 日本語 🙂 e\u0301\ttab  two spaces\n\n  <s> x </s> <|endoftext|> ▁odd 12345 don't\r\n"


def _tiny_run(workdir, data_dir, **overrides):
    cfg = tiny_config(workdir, data_dir, steps=STEPS, seq_len=32, checkpoint_every=2, eval_every=STEPS, log_every=1,
                      eval_batches=1, final_eval_batches=1, **overrides)
    cfg.optimizer.warmup_steps = 1
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shakespeare):
    from train.loop import train

    workdir = tmp_path_factory.mktemp("hf") / "run"
    train(_tiny_run(workdir, shakespeare))
    return str(workdir)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    from tools.export import export

    out = str(tmp_path_factory.mktemp("hf_export") / "gpt2")
    return out, export(trained, out)


def _hf_logits(model_dir_or_model, tokens):
    model = model_dir_or_model
    if isinstance(model, str):
        model = transformers.GPT2LMHeadModel.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def _eval_rows(data_dir, n_rows=4, length=255):
    """Held-out token rows [n, length] that start with a boundary token and hold no other."""
    info = data.load_info(data_dir)
    batch = data.eval_batches(info, seq_len=length, batch_size=32, process_index=0, process_count=1,
                              max_batches=1)[0]
    rows = [r for r in batch["inputs"] if not (r[1:] == info.bos_id).any()][:n_rows]
    assert len(rows) == n_rows
    return np.concatenate([np.full((n_rows, 1), info.bos_id), np.stack(rows)[:, :length - 1]], axis=1)


def test_export_gives_gpt2lmheadmodel_with_the_runs_logits(trained, exported, shakespeare):
    """Sequences without a document boundary after position 0: the export's logits equal the harness's (all of
    the padded vocabulary too). With a boundary inside, the harness (attention within documents) and GPT-2
    (attention across them) agree before it only."""
    from tools.sample import load

    out, summary = exported
    assert summary["step"] == STEPS and summary["vocab_size"] == 4096
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["model_type"], config["activation_function"], config["n_layer"], config["n_embd"],
            config["n_head"], config["n_positions"], config["tie_word_embeddings"]) == (
        "gpt2", "gelu_new", 2, 128, 4, 256, True)
    assert config["bos_token_id"] == config["eos_token_id"] == data.load_info(shakespeare).bos_id

    loaded = load(trained)
    model = nnx.merge(loaded.graphdef, loaded.params)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32)
    rows = _eval_rows(shakespeare)
    ours = np.asarray(model(jnp.asarray(rows), jnp.ones(rows.shape, jnp.int32)))
    np.testing.assert_allclose(_hf_logits(hf, rows), ours, atol=TOL, rtol=0)
    assert np.abs(ours).max() > 1.0  # trained logits, not a degenerate model

    joined = rows.copy()
    joined[:, 100] = loaded.info.bos_id  # a second document from position 100
    segments = jnp.asarray(1 + (np.arange(rows.shape[1]) >= 100), jnp.int32)[None].repeat(len(rows), 0)
    ours, theirs = np.asarray(model(jnp.asarray(joined), segments)), _hf_logits(hf, joined)
    np.testing.assert_allclose(theirs[:, :100], ours[:, :100], atol=TOL, rtol=0)
    assert np.abs(theirs[:, 101:] - ours[:, 101:]).max() > 1e-2


def test_exported_tokenizer_gives_the_run_tokenizers_ids(exported, shakespeare):
    """``AutoTokenizer.from_pretrained(export)`` encodes held-out text (and characters the vocabulary lacks, byte
    fallback) to the run tokenizer's ids, the boundary token first unless ``add_special_tokens=False``."""
    out, _ = exported
    info = data.load_info(shakespeare)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    held_out = info.tokenizer.decode(_eval_rows(shakespeare, n_rows=8).reshape(-1)).replace("<s>", "\n")
    for text in held_out.split("\n\n") + [ODD_TEXT]:
        ids = info.tokenizer.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok(text).input_ids == [info.bos_id] + ids
    odd = info.tokenizer.encode(ODD_TEXT)
    assert any(info.tokenizer.sp.IsByte(i) for i in odd)
    assert tok.decode(odd) == info.tokenizer.decode(odd)
    assert (tok.bos_token_id, tok.eos_token_id) == (info.bos_id, info.bos_id)


def _byte_level_ranks(texts, vocab_size=1000) -> dict[bytes, int]:
    """tiktoken ranks of a byte-level BPE trained on ``texts`` (ranks = the trainer's ids: merge order)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    return {bytes(byte_of[c] for c in piece): i for piece, i in tok.get_vocab().items()}


def test_tiktoken_ranks_and_tokenizer_json_convert_to_the_same_ids(tmp_path, shakespeare):
    """A ``tokenizer.tiktoken`` (GPT-2's split pattern) becomes a byte-level BPE with tiktoken's ids and
    ``<|endoftext|>`` after the last rank; a ``tokenizer.json`` is taken as it is. Saved as transformers files,
    both load with ``AutoTokenizer`` and put the boundary token first."""
    tiktoken = pytest.importorskip("tiktoken")
    from tokenizers import Tokenizer

    from data.hf_tokenizer import ENDOFTEXT, GPT2_PATTERN, hf_tokenizer, save_pretrained_files

    info = data.load_info(shakespeare)
    text = info.tokenizer.decode(_eval_rows(shakespeare, n_rows=8).reshape(-1))
    ranks = _byte_level_ranks([text[: len(text) // 2]])
    path = tmp_path / "tokenizer.tiktoken"
    path.write_text("".join(f"{base64.b64encode(b).decode()} {r}\n" for b, r in sorted(ranks.items(), key=lambda x: x[1])))
    reference = tiktoken.Encoding("ranks", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                  special_tokens={ENDOFTEXT: len(ranks)})
    tok = hf_tokenizer(str(path), bos_id=len(ranks))
    odd = ODD_TEXT.replace(ENDOFTEXT, "")  # (a tokenizers.Tokenizer matches special tokens in the text itself)
    for piece in (text[len(text) // 2:], odd):
        assert tok.encode(piece, add_special_tokens=False).ids == reference.encode_ordinary(piece)
    assert tok.token_to_id(ENDOFTEXT) == len(ranks)
    save_pretrained_files(tok, str(tmp_path / "tiktoken_hf"), bos_id=len(ranks), eos_id=len(ranks), unk_id=None,
                          model_max_length=256)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tiktoken_hf"))
    assert auto(ODD_TEXT).input_ids == [len(ranks)] + reference.encode_ordinary(ODD_TEXT)
    assert auto.decode(reference.encode_ordinary(ODD_TEXT)) == ODD_TEXT

    as_json = tmp_path / "json" / "tokenizer.json"
    as_json.parent.mkdir()
    tok.save(str(as_json))
    copied = hf_tokenizer(str(as_json), bos_id=len(ranks))
    assert copied.encode(odd).ids == [len(ranks)] + reference.encode_ordinary(odd)
    assert Tokenizer.from_file(str(as_json)).get_vocab() == copied.get_vocab()


def _random_gpt2(directory, vocab_size, seed=0):
    """A randomly initialised GPT-2 of cpu-tiny's shape saved by transformers (safetensors)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=256, vocab_size=vocab_size,
                                     bos_token_id=1, eos_token_id=1)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # biases and norms away from their init (zeros, ones), so that a swapped one shows
        for name, p in model.named_parameters():
            if name.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(directory))
    return model


def test_import_maps_a_gpt2_checkpoint_onto_the_harness(tmp_path):
    """A transformers GPT-2 (vocabulary 4000, padded to the model's 4096) read from safetensors and from
    pytorch_model.bin: the harness's logits equal GPT-2's; each padded id's logit is the mean of the real ones."""
    from models import GPT, abstract_params, model_config
    from models.hf_gpt2 import check_hf_config, from_hf, read_hf_checkpoint, to_hf

    hf = _random_gpt2(tmp_path / "gpt2", vocab_size=4000)
    model_cfg = model_config("cpu-tiny", vocab_size=4096)
    config, tensors = read_hf_checkpoint(str(tmp_path / "gpt2"))
    check_hf_config(config, model_cfg)
    params = from_hf(tensors, model_cfg)
    graphdef, _ = abstract_params(model_cfg)
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
    assert isinstance(model, GPT)
    tokens = np.random.default_rng(0).integers(0, 4000, (2, 256))
    ours = np.asarray(model(jnp.asarray(tokens)))
    np.testing.assert_allclose(ours[..., :4000], _hf_logits(hf, tokens), atol=TOL, rtol=0)
    np.testing.assert_allclose(ours[..., 4000:], ours[..., :4000].mean(-1, keepdims=True).repeat(96, -1),
                               atol=TOL, rtol=0)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text(json.dumps(config))
    torch.save({k: v for k, v in hf.state_dict().items()}, bin_dir / "pytorch_model.bin")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(from_hf(read_hf_checkpoint(str(bin_dir))[1], model_cfg))):
        np.testing.assert_array_equal(a, b)
    back = to_hf(params)  # and back: the same tensors (wte with the padded rows)
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name][: value.shape[0]], value)


@pytest.mark.parametrize("override,message", [
    (dict(n_layer=3), r"\(layers, d_model, heads, context\) = \(3, 128, 4, 256\), the model preset \(2, 128, 4, 256\)"),
    (dict(activation_function="relu"), "activation_function='relu'"),
    (dict(vocab_size=5000), "vocabulary of 5000, larger than the model's 4096"),
    (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon=1e-06"),
    (dict(model_type="llama"), "not a GPT-2 checkpoint"),
])
def test_import_refuses_checkpoints_of_another_model(override, message):
    from models import model_config
    from models.hf_gpt2 import check_hf_config

    config = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=256, vocab_size=4096).to_dict()
    config.update(override)
    with pytest.raises(ValueError, match=message):
        check_hf_config(config, model_config("cpu-tiny", vocab_size=4096))


def test_init_from_a_gpt2_checkpoint_starts_from_its_weights(tmp_path, shakespeare):
    """A run with ``init_from=<GPT-2 dir>`` on the 2x2x2 mesh: its first loss is that of the imported
    parameters on batch 0, and GPT-2's own on that batch; and it trains."""
    from infra.metrics import read_metrics
    from train.build import build_run
    from train.config import load_config, with_dataset
    from train.loop import train
    from train.resume import hf_params

    hf = _random_gpt2(tmp_path / "gpt2", vocab_size=4096)
    cfg = _tiny_run(tmp_path / "run", shakespeare, init_from=str(tmp_path / "gpt2"))
    summary = train(cfg)
    assert summary["step"] == STEPS
    losses = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "run")) if "loss" in r}
    assert sorted(losses) == list(range(1, STEPS + 1)) and np.isfinite(list(losses.values())).all()

    run = build_run(with_dataset(load_config(cfg), data.load_info(shakespeare).vocab_size))
    params = hf_params(str(tmp_path / "gpt2"), run.model_cfg, run.layout.abstract.params)
    batch = next(data.train_iterator(shakespeare, seq_len=32, global_batch_size=8, seed=0, num_threads=1))
    with jax.set_mesh(run.mesh):
        total, count = run.eval_step(params, jax.device_put(batch, run.batch_sharding))
    np.testing.assert_allclose(losses[1], float(total) / float(count), rtol=1e-5)
    # batch 0 holds no document boundary, so GPT-2 itself computes the same loss on it
    assert not (batch["inputs"][:, 1:] == data.load_info(shakespeare).bos_id).any()
    logits = torch.tensor(_hf_logits(hf, batch["inputs"]))
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           torch.tensor(batch["targets"], dtype=torch.long).reshape(-1), reduction="none")
    mask = torch.tensor(batch["loss_mask"]).reshape(-1)
    np.testing.assert_allclose(losses[1], float((ce * mask).sum() / mask.sum()), rtol=1e-5)
    assert abs(losses[1] - np.log(4096)) < 0.5  # a random GPT-2: about ln V


def test_export_refuses_bad_input_in_one_line(trained, exported, tmp_path, capsys):
    """No checkpoints, a missing step, an existing non-empty --out: one ``error:`` line each; --force replaces."""
    from tools.export import main

    out, _ = exported
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.json").write_text(open(os.path.join(trained, "config.json")).read())
    cases = [([f"--workdir={empty}", f"--out={tmp_path / 'a'}"], "no checkpoint in"),
             ([f"--workdir={trained}", f"--out={tmp_path / 'b'}", "--step=3"], "no checkpoint of step 3 (its "
                                                                                "checkpoints: steps 2, 4)"),
             ([f"--workdir={trained}", f"--out={out}"], "exists and is not empty")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert e.value.code == 2 and len(err) == 1 and message in err[0], err
    main([f"--workdir={trained}", f"--out={out}", "--step=2", "--force"])
    assert "exported step 2" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]


# ------------------------------------------------------------------------------------------------- lm-eval

ITEMS = [  # HellaSwag-style: a context, four endings, the index of the right one
    {"context": "ROMEO: But soft, what light through yonder window", "label": 0,
     "endings": ["breaks? It is the east", "swims the sea of cheese", "computes a gradient", "sells cars"]},
    {"context": "To be, or not to be, that is the", "label": 0,
     "endings": ["question:", "banana:", "spreadsheet:", "carburettor:"]},
    {"context": "Now is the winter of our", "label": 0,
     "endings": ["discontent", "database", "cereal", "tax return"]},
    {"context": "Friends, Romans, countrymen, lend me your", "label": 0,
     "endings": ["ears", "laptop", "bicycle", "password"]},
]
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: endings
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def local_task(tmp_path, monkeypatch):
    """(task name, include path) of a local multiple-choice task; datasets and the hub offline."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (tasks / "shakespeare_mc.yaml").write_text(TASK_YAML.format(name="shakespeare_mc", items=tasks / "items.jsonl"))
    return "shakespeare_mc", str(tasks)


def test_the_local_multiple_choice_task_loads_offline(local_task):
    """The task yaml of the README: lm-eval reads its local json offline, 4 choices per item."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    name, include = local_task
    task = TaskManager(include_path=include).load([name])["tasks"][name]
    docs = list(task.test_docs())
    assert len(docs) == len(ITEMS) and task.doc_to_choice(docs[0]) == ITEMS[0]["endings"]
    assert task.doc_to_text(docs[0]) == ITEMS[0]["context"] and task.doc_to_target(docs[0]) == 0


def test_lm_eval_scores_the_export(trained, local_task, tmp_path):
    """``lm_eval --model hf`` on the export (the README's command) reports acc and acc_norm, and with the
    boundary token first (``add_bos_token=True``, as the harness scores) its per-ending log-likelihoods equal
    the harness's own multiple-choice scorer's (``tools.evaluate``) on the same items."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate", reason="lm_eval's hf backend imports accelerate")
    from tools.evaluate import evaluate
    from tools.export import export

    out = str(tmp_path / "export")  # (the module's shared export is rewritten by other tests, at other steps)
    export(trained, out)
    name, include = local_task
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={out},dtype=float32,add_bos_token=True", "--tasks", name, "--include_path", include,
           "--device", "cpu", "--batch_size", "4", "--output_path", str(tmp_path / "results"), "--log_samples"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "results") for f in fs]
    results = json.load(open(next(f for f in found if os.path.basename(f).startswith("results"))))["results"][name]
    assert {"acc,none", "acc_norm,none"} <= set(results), results
    assert all(0.0 <= results[k] <= 1.0 for k in ("acc,none", "acc_norm,none"))
    samples = [json.loads(line) for f in found if os.path.basename(f).startswith("samples") for line in open(f)]
    theirs = [[r[0] for r in s["filtered_resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]
    ours = evaluate(trained, task_files=[os.path.join(include, "items.jsonl")], progress=False)["tasks"][0]
    np.testing.assert_allclose(np.array(ours["lls"]), np.array(theirs, dtype=float), rtol=1e-4, atol=1e-3)
    assert ours["acc"] == results["acc,none"]
