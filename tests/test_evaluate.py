"""Downstream evaluation: bits per byte and multiple-choice task rows during training, ``tools.evaluate`` on a
finished run (the trainer's held-out loss again; the scorer's log-likelihoods against a direct computation
and across meshes), and the one-line errors of bad task files and bad evaluation requests."""
import copy
import dataclasses
import glob
import json
import math
import os
import shutil
import types

import jax
import numpy as np
import pytest
from flax import nnx

import data
from data.pipeline import TokenWindows
from infra.metrics import read_metrics
from tests.helpers import tiny_config
from tests.test_checkpoint import compilation_cache, data_dir  # noqa: F401
from tests.test_diagnostics import _scalar_tags
from tools import evaluate as evaluate_tool
from train.evaluation import heldout_row
from train.loop import train
from train.tasks import buckets, encode_pair, encode_task, read_task, read_tasks, rows_per_batch, score_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN = 64  # two buckets (32, 64); some items are longer and are left-truncated


def heldout_task(data_dir: str, path: str, n_items: int = 6) -> str:
    """A HellaSwag-style task from the held-out text: each item is 0 to 6 lines and the first half of the
    next, its right ending the line's second half, the others the second halves of other lines."""
    info = data.load_info(data_dir)
    text = info.tokenizer.decode(TokenWindows(info, "eval", 1).tokens(0, 3000))
    lines = [line for line in text.split("\n") if len(line.split(" ")) >= 6]
    halves = [(" ".join(w[:len(w) // 2]), " ".join(w[len(w) // 2:])) for w in (line.split(" ") for line in lines)]
    with open(path, "w") as f:
        for i in range(n_items):
            k = 7 + 2 * i
            context = "\n".join(lines[k - 2 * (i % 4):k] + [halves[k][0]])  # 0 to 6 whole lines before
            endings = [halves[k][1]] + [halves[k + 20 + 5 * j][1] for j in range(3)]
            label = i % 4
            endings[0], endings[label] = endings[label], endings[0]
            f.write(json.dumps({"context": context, "endings": endings, "label": label}) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shakespeare):
    """A 4-step cpu-tiny run on the 2x2x2 mesh that scores a held-out task and the repository's task at every
    evaluation (steps 2 and 4)."""
    root = tmp_path_factory.mktemp("evaluate")
    task = heldout_task(shakespeare, str(root / "heldout.jsonl"))
    cfg = tiny_config(root / "run", shakespeare, steps=4, eval_every=2, log_every=2, checkpoint_every=2,
                      seq_len=SEQ_LEN, eval_batches=2, final_eval_batches=0,
                      eval_tasks=f"{task},{os.path.join(REPO, 'tasks', 'everyday.jsonl')}")
    cfg.optimizer.warmup_steps = 1
    summary = train(cfg)
    return {"workdir": str(root / "run"), "task": task, "summary": summary, "data": shakespeare}


def test_training_rows_carry_bits_per_byte_and_task_accuracy(trained):
    rows = {r["step"]: r for r in read_metrics(trained["workdir"]) if "eval_loss" in r}
    assert sorted(rows) == [2, 4]
    per_token = data.load_info(trained["data"]).bytes_per_token()
    for step, row in rows.items():
        assert row["eval_bpb"] == pytest.approx(row["eval_loss"] / math.log(2) / per_token, rel=1e-12)
        for name in ("heldout", "everyday"):
            assert 0 <= row[f"task/{name}/acc"] <= 1 and 0 <= row[f"task/{name}/acc_norm"] <= 1
    assert rows[4]["eval_bpb_full"] == pytest.approx(rows[4]["eval_loss_full"] / math.log(2) / per_token, rel=1e-12)
    summary = trained["summary"]
    assert summary["eval_bpb_full"] == rows[4]["eval_bpb_full"] and "task/everyday/acc" in summary
    tags = _scalar_tags(glob.glob(os.path.join(trained["workdir"], "tensorboard", "events.*")))
    assert {"eval_loss", "eval_bpb", "eval_bpb_full", "task/heldout/acc", "task/everyday/acc_norm"} <= tags


def test_evaluate_command_gives_the_trainer_s_held_out_loss(trained, capsys):
    workdir = trained["workdir"]
    evaluate_tool.main(["--workdir", workdir, "--tasks", trained["task"]])
    out = capsys.readouterr().out
    result = json.load(open(os.path.join(workdir, "evaluations", "step_4.json")))
    assert result["step"] == 4 and "heldout" in out and "bits/byte" in out
    (own,) = result["heldout"]
    assert own["loss"] == pytest.approx(trained["summary"]["eval_loss_full"], abs=1e-5)
    assert own["bpb"] == pytest.approx(own["loss"] / math.log(2) / own["bytes_per_token"], rel=1e-12)
    (task,) = result["tasks"]
    last = read_metrics(workdir)[-1]
    assert task["count"] == 6 and task["acc"] == last["task/heldout/acc"]
    assert task["acc_norm"] == last["task/heldout/acc_norm"]


def _direct_log_likelihoods(run, params, task) -> list[np.ndarray]:
    """Each (item, ending)'s log-likelihood from the model's logits over that one sequence, unbatched."""
    # each sequence alone, right-padded to seq_len (causal: the padding changes no earlier position): one compile
    forward = jax.jit(lambda p, x: jax.nn.log_softmax(nnx.merge(run.params_layout.graphdef, p)(x)))
    out = []
    for seqs in encode_task(task, run.data.tokenizer, run.data.bos_id, run.cfg.seq_len):
        lls = []
        for s in seqs:
            padded = np.pad(s.tokens[:-1], (0, run.cfg.seq_len - len(s.tokens) + 1))[None]
            logp = np.asarray(forward(params, padded)[0], np.float64)
            targets = s.tokens[1:]
            lls.append(sum(logp[t, targets[t]] for t in range(len(targets) - s.n_scored, len(targets))))
        out.append(np.asarray(lls))
    return out


def test_scorer_matches_a_direct_computation_on_two_meshes(trained):
    task = read_task(trained["task"])
    run, params, step = evaluate_tool.load_run(trained["workdir"])
    assert step == 4 and dict(run.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    lengths = [len(s.tokens) - 1 for seqs in encode_task(task, run.data.tokenizer, run.data.bos_id, SEQ_LEN)
               for s in seqs]
    assert min(lengths) <= 32 < max(lengths) == SEQ_LEN  # both buckets, and left-truncated items
    sharded = score_task(run, params, task, progress=False)
    one, one_params, _ = evaluate_tool.load_run(trained["workdir"], mesh=(1, 1, 1))
    assert one.mesh.size == 1
    single = score_task(one, one_params, task, progress=False)
    direct = _direct_log_likelihoods(one, one_params, task)
    for a, b, c in zip(sharded.lls, single.lls, direct):
        np.testing.assert_allclose(a, c, atol=1e-5)
        np.testing.assert_allclose(b, c, atol=1e-5)
    assert (sharded.acc, sharded.acc_norm) == (single.acc, single.acc_norm)


def test_tokens_are_split_as_the_harness_splits_them(shakespeare):
    tok = data.load_info(shakespeare).tokenizer
    context, ending = encode_pair(tok, "To be, or not to be, ", "that is the question")
    assert tok.decode(context) == "To be, or not to be,"  # its trailing space moved to the ending
    assert tok.decode(ending) == "  that is the question"  # which gets the delimiter
    assert context + ending == tok.encode("To be, or not to be,  that is the question")
    assert buckets(1024, "xla") == [32, 64, 128, 256, 512, 1024] and buckets(1024, "splash") == [128, 256, 512, 1024]
    assert rows_per_batch(8, 256, 0, 64) == 32 and rows_per_batch(8, 256, 128, 64) == 16
    assert rows_per_batch(8, 256, 128, 256) == 8
    pytest.importorskip("lm_eval")  # the evaluation harness's own split, given this tokenizer, where installed
    from lm_eval.api.model import TemplateLM

    harness = types.SimpleNamespace(backend="causal", tok_encode=tok.encode)
    for ctx, end in (("To be, or not to be, ", "that is the question"), ("Now is the winter", "of our discontent")):
        assert encode_pair(tok, ctx, end) == TemplateLM._encode_pair(harness, ctx, " " + end)


def test_bits_per_byte_is_left_out_for_a_data_dir_without_byte_counts(shakespeare):
    info = data.load_info(shakespeare)
    row = heldout_row(info, 2.0)
    assert row == {"eval_loss": 2.0, "eval_bpb": 2.0 / math.log(2) / info.bytes_per_token()}
    meta = copy.deepcopy(info.meta)
    del meta["splits"]["eval"]["n_bytes"]
    assert heldout_row(dataclasses.replace(info, meta=meta), 2.0, "eval_loss_full") == {"eval_loss_full": 2.0}


def test_hellaswag_rows_are_read_as_the_harness_reads_them(tmp_path):
    row = {"activity_label": "Baking cookies", "ctx_a": "A woman pours flour into a bowl.", "ctx_b": "she",
           "ctx": "A woman pours flour into a bowl. she", "endings": ["stirs it [title] Then bakes.", "sings."],
           "label": "0", "split": "val"}
    (tmp_path / "hellaswag.jsonl").write_text(json.dumps(row) + "\n")
    (item,) = read_task(str(tmp_path / "hellaswag.jsonl")).items
    assert item.context == "Baking cookies: A woman pours flour into a bowl. She"
    assert item.endings == ("stirs it. Then bakes.", "sings.") and item.label == 0
    # the same as the evaluation harness's own HellaSwag preparation, where it is installed
    pytest.importorskip("lm_eval")
    datasets = pytest.importorskip("datasets")
    from lm_eval.tasks.hellaswag.utils import process_docs

    (doc,) = process_docs(datasets.Dataset.from_list([row]))
    assert (doc["query"], tuple(doc["choices"]), doc["gold"]) == (item.context, item.endings, item.label)


@pytest.mark.parametrize("lines,message", [
    (['{"context": "a", "endings": ["b", "c"], "label": 0}', "{not json"], ":2: not JSON"),
    (['{"context": "a", "endings": ["b", "c"]}'], ":1: missing field 'label'"),
    (['{"endings": ["b", "c"], "label": 0}'], ":1: missing field 'context'"),
    (['{"context": "a", "endings": ["b", "c"], "label": 2}'], ":1: label 2 is out of range for 2 endings"),
    (['{"ctx": "a", "endings": ["b", "c"], "label": ""}'], ":1: label '' is not an integer"),
    (['', '{"context": "a", "endings": ["b"], "label": 0}'], ":2: 1 ending\\(s\\); a multiple-choice item needs"),
    (['[1, 2]'], ":1: a JSON list, not an object"),
    (['', '  '], "is empty"),
])
def test_bad_task_lines_are_one_line_errors_naming_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message) as e:
        read_task(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_task_names_must_differ(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "t.jsonl").write_text('{"context": "a", "endings": ["b", "c"], "label": 0}\n')
    with pytest.raises(ValueError, match="task names must differ"):
        read_tasks(f"{tmp_path / 'a' / 't.jsonl'},{tmp_path / 'b' / 't.jsonl'}")
    with pytest.raises(ValueError, match="does not exist"):
        read_tasks(str(tmp_path / "missing.jsonl"))


def _one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        evaluate_tool.main(argv)
    assert e.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    return errors[0]


def test_evaluate_errors(trained, data_dir, tmp_path, capsys):  # noqa: F811
    workdir = trained["workdir"]
    assert "no checkpoint of step 3; its checkpoints are of steps 2, 4" in _one_line_error(
        capsys, ["--workdir", workdir, "--step", "3"])
    empty = tmp_path / "untrained"
    empty.mkdir()
    shutil.copy(os.path.join(workdir, "config.json"), empty / "config.json")
    assert "has no checkpoint: train the run first" in _one_line_error(capsys, ["--workdir", str(empty)])
    assert "no prepared data dir" in _one_line_error(capsys, ["--workdir", workdir, "--data", str(tmp_path / "x")])
    assert "another tokenizer than the run's" in _one_line_error(capsys, ["--workdir", workdir, "--data", data_dir])
    (tmp_path / "bad.jsonl").write_text('{"context": "a", "endings": ["b", "c"], "label": 5}\n')
    assert f"{tmp_path / 'bad.jsonl'}:1: label 5" in _one_line_error(
        capsys, ["--workdir", workdir, "--tasks", str(tmp_path / "bad.jsonl")])
