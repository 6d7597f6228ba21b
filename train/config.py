"""A run's config as the run uses it: loaded once, its defaults resolved, and that is what ``config.json`` holds.

Every command that builds a run (``train``, ``tools.compare``, ``tools.plan``, ``tools.bench``) takes an
ml_collections config file (``--config configs/<preset>.py``) with ``--config.<field>=<value>`` overrides and
passes it through ``load_config`` before anything else:

- local paths (``workdir``, ``data.dir``, ``init_from``, ``compiled_step``, each of ``eval_tasks``, a
  ``data.tokenizer`` file) become absolute (an empty one stays empty, a tiktoken encoding name such as ``gpt2``
  stays a name); URIs (``gs://...``) are kept, and refused at once when the libraries that reach them are not
  installed;
- ``optimizer.lr`` 0 becomes the optimizer's default peak rate and an empty ``optimizer.<name>.theta`` its
  shipped weight file (``optim.registry.resolve_defaults``);
- every field is checked against the valid range declared beside its definition (``configs/base.py``), and
  the loss chunk against the sequence length, the profiled steps against the run's.

``with_dataset`` then takes the model's vocabulary from the prepared dataset: ``model.vocab_size`` 0 becomes
the tokenizer's vocabulary, padded up to a multiple of ``model.vocab_multiple`` (a shardable size with faster
matmuls); a vocabulary smaller than the tokenizer's is refused, whoever set it.
"""
from __future__ import annotations

import json
import math
import os

import ml_collections

from configs.base import base_config, ranges
from infra.files import check_storage, resolve
from infra.ranges import check
from infra.wandb_run import check_wandb
from optim.registry import REGISTRY, resolve_defaults
from train.profiler import profile_window


def check_ranges(cfg) -> None:
    """ValueError naming the first field of ``cfg`` outside the valid range declared beside its definition
    (``configs.base.SCHEMA``, ``configs.compare.COMPARE_RANGES``)."""
    rules = ranges()
    for name, value in _leaves(cfg.to_dict()):
        if name in rules:
            check(name, value, rules[name])


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def load_config(cfg):
    """The resolved copy of ``cfg`` (see the module docstring); a config that cannot work raises ValueError."""
    check_ranges(cfg)
    profile_window(cfg.profile_steps, cfg.steps)
    if cfg.loss_chunk and cfg.seq_len % cfg.loss_chunk:
        raise ValueError(f"loss_chunk={cfg.loss_chunk} must be 0 (no chunking) or a positive divisor of "
                         f"seq_len={cfg.seq_len}")
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.workdir = resolve(cfg.workdir)
        for section, field in ((cfg.data, "dir"), (cfg, "init_from"), (cfg, "compiled_step")):  # "" stays empty
            if section[field]:
                section[field] = resolve(section[field])
        cfg.eval_tasks = ",".join(resolve(p.strip()) for p in cfg.eval_tasks.split(",") if p.strip())
        if os.path.splitext(cfg.data.tokenizer)[1] or "/" in cfg.data.tokenizer:  # a file, not an encoding name
            cfg.data.tokenizer = resolve(cfg.data.tokenizer)
        for path in (cfg.workdir, cfg.data.dir, cfg.init_from, cfg.data.corpus, cfg.data.tokenizer,
                     *cfg.eval_tasks.split(",")):
            check_storage(path)
        check_wandb(cfg.wandb)
        cfg.optimizer = resolve_defaults(cfg.optimizer)
    return cfg


def padded_vocab(vocab: int, multiple: int) -> int:
    """``vocab`` rounded up to a multiple of ``multiple`` (1 or less: unchanged)."""
    return math.ceil(vocab / multiple) * multiple if multiple > 1 else vocab


def with_dataset(cfg, tokenizer_vocab: int):
    """A copy of the loaded ``cfg`` whose ``model.vocab_size`` is the one the model is built with: the
    tokenizer's (``tokenizer_vocab``) when it is 0, padded to ``model.vocab_multiple``."""
    m = cfg.model
    if 0 < m.vocab_size < tokenizer_vocab:
        raise ValueError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's vocabulary "
                         f"({tokenizer_vocab}) of {cfg.data.dir}: token ids would index past the embedding; set "
                         f"--config.model.vocab_size={tokenizer_vocab} or 0 (the tokenizer's)")
    cfg = cfg.copy_and_resolve_references()
    cfg.model.vocab_size = padded_vocab(m.vocab_size or tokenizer_vocab, m.vocab_multiple)
    return cfg


# The optimizer fields of configs saved before each optimizer had its own section, and where they went.
_FORMER_FIELDS = {"b1": "b1", "b2": "b2", "eps": "eps", "muon_beta": "beta", "muon_nesterov": "nesterov",
                  "adam_lr_mult": "adam_lr_mult", "theta": "theta"}
_FORMER_NAMES = {"celo2-base": "celo2_base"}


def upgrade_saved(saved: dict, vocab_size: int) -> dict:
    """A config saved by an earlier version (``config.json``, a checkpoint's) in today's layout, so that it
    compares with a loaded config: one shared ``optimizer`` section whose ``b1``, ``b2``, ``eps``,
    ``muon_beta``, ``muon_nesterov``, ``adam_lr_mult`` and ``theta`` belonged to whichever optimizer ran
    becomes the per-optimizer sections, the hyphenated ``celo2-base`` is ``celo2_base``, and the defaults it
    left unresolved (``lr`` 0, ``adam_lr_mult`` 0, ``theta`` "") are resolved as ``load_config`` does, a
    ``model.vocab_size`` of 0 as ``vocab_size`` (the model's, from the same dataset). A config in today's
    layout gets only the fields added since it was saved, at their defaults (every later feature is off by
    default: what the run did without it)."""
    if saved.get("model", {}).get("vocab_size") == 0:
        saved = {**saved, "model": {**saved["model"], "vocab_size": vocab_size}}
    old = dict(saved.get("optimizer") or {})
    if not old or any(name in old for name in REGISTRY):
        return _with_later_fields(saved)
    name = _FORMER_NAMES.get(old.get("name"), old.get("name"))
    new = {k: v for k, v in old.items() if k not in _FORMER_FIELDS}
    new.update(name=name, **{n: dict(spec.settings) for n, spec in REGISTRY.items()})
    for field, value in old.items():
        moved = _FORMER_FIELDS.get(field)
        if name in new and moved in new[name] and not (field == "adam_lr_mult" and not value):
            new[name][moved] = value
    resolved = resolve_defaults(ml_collections.ConfigDict(new))
    return _with_later_fields({**saved, "optimizer": json.loads(resolved.to_json_best_effort())})


def _with_later_fields(saved: dict, defaults: dict | None = None) -> dict:
    """``saved`` with the schema's fields it lacks added at their defaults (nested sections too)."""
    defaults = base_config().to_dict() if defaults is None else defaults
    out = dict(saved)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = _with_later_fields(out[k], v)
    return out
