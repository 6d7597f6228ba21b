"""The config schema: every field declares a valid range beside its definition, and loading a config refuses
a value outside it (naming the field and the range) before anything is built or written; the commands with
plain flags check theirs the same way."""
import json
import math
import pathlib
import re
import subprocess
import sys

import pytest

from configs.base import SCHEMA, ranges
from configs.compare_cpu import get_config as compare_config
from infra.ranges import check, flag_type
from optim.registry import REGISTRY
from train.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _outside(rule: str):
    """A value of the rule's own type outside its range (None: the type is the whole range)."""
    if m := re.fullmatch(r"(?:-1 or )?(int|float) (>=|>) (\S+)", rule):
        kind, op, bound = m.groups()
        if kind == "float":
            return math.nan
        return int(bound) - 1 if op == ">=" else int(bound)
    if m := re.fullmatch(r"(int|float) in [\[(](\S+), (\S+)[\])]", rule):
        return (int if m[1] == "int" else float)(m[3]) + 1
    if rule.startswith("one of "):
        return "no-such-choice"
    return "" if rule == "nonempty str" else None


def _leaves(tree: dict, prefix=""):
    for key, value in tree.items():
        yield from _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [(prefix + key, value)]


def test_every_field_declares_a_range_its_default_satisfies():
    rules = ranges()
    fields = dict(_leaves(compare_config().to_dict()))
    missing = [k for k in fields if k not in rules and not k.startswith("compare.lrs.")]
    assert not missing, f"fields without a declared range: {missing}"
    for name, value in fields.items():
        if name in rules:
            check(name, value, rules[name])


@pytest.mark.parametrize("name,rule", sorted(ranges().items()))
def test_a_value_out_of_range_is_refused_when_loaded(name, rule):
    bad = _outside(rule)
    if bad is None:  # bool and str fields: ml_collections refuses a value of another type
        return
    cfg = compare_config()
    *parents, leaf = name.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[leaf] = bad
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}=.* is out of range: it must be "):
        load_config(cfg)


def test_optimizer_names_in_the_schema_are_the_registry_s():
    rule = SCHEMA["optimizer"]["name"][1]
    assert rule.removeprefix("one of ").split("|") == list(REGISTRY)


@pytest.mark.parametrize("rule,good,bad", [
    ("float >= 0", "0.5", "nan"), ("float >= 0", "0", "-1"), ("int >= 1", "3", "0"), ("int >= 1", "3", "1.5"),
    ("float in (0, 1)", "0.05", "1"),
])
def test_flag_types_check_the_range(rule, good, bad):
    parse = flag_type(rule)
    assert parse(good) == float(good)
    with pytest.raises(Exception, match="must be"):
        parse(bad)


@pytest.mark.parametrize("argv,message", [
    (["-m", "tools.sample", "--workdir", "w", "--temperature", "nan"], "argument --temperature: 'nan' must be a "
                                                                      "finite number >= 0"),
    (["-m", "data", "prepare", "--out", "x", "--eval_fraction", "1.5"], "argument --eval_fraction: '1.5' must be"),
    (["-m", "optim.learned.meta", "--workdir", "w", "--std", "-0.1"], "argument --std: '-0.1' must be"),
    (["-m", "tools.plan", "--gpu", "h100", "--gpus", "0"], "flag --gpus=0: 0 is not a positive integer"),
])
def test_commands_refuse_flags_out_of_range(argv, message):
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and message in " ".join(proc.stderr.split()), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_config_saved_by_an_earlier_version_reads_as_today_s():
    """config.json of a default run made before the per-optimizer sections and the later features (profile,
    loss spikes, W&B, diagnostics): upgraded, it equals today's default config, so resuming it warns of nothing."""
    from configs.default import get_config
    from train.config import load_config, upgrade_saved, with_dataset
    from train.resume import config_changes

    old = json.loads((pathlib.Path(__file__).parent / "data" / "config_2026-12-01.json").read_text())
    assert "loss_spike" not in old and "muon_beta" in old["optimizer"]
    now = json.loads(with_dataset(load_config(get_config()), 4096).to_json_best_effort())
    changes = config_changes(upgrade_saved(old, 4096), now)
    assert set(changes) <= {"workdir", "data.dir"}, changes  # paths: made absolute when loaded
