"""Export a run's parameters as a Hugging Face transformers GPT-2 checkpoint (``GPT2LMHeadModel``).

    python -m tools.export --workdir runs/cpu_tiny --out exports/cpu_tiny [--step N] [--force]

Restores the parameters of checkpoint ``--step`` (default: the newest that restores) onto one device, from the
checkpoint alone (no training mesh: a run saved sharded over many devices or hosts exports on one CPU), and
writes into ``--out``:

- ``config.json``: ``model_type: gpt2``, the run's shape, its padded vocabulary, ``gelu_new`` (the harness's
  tanh-approximate GELU), tied embeddings, BOS and EOS = the data's boundary token (``models.hf_gpt2``);
- ``model.safetensors``: float32, the tensor layout of ``models/hf_gpt2.py``'s docstring;
- ``generation_config.json``: the boundary token as BOS, EOS and padding;
- ``tokenizer.json`` and ``tokenizer_config.json``: the run's tokenizer (``data.hf_tokenizer``), which puts the
  boundary token first, as before every training document.

Then ``GPT2LMHeadModel.from_pretrained(out)`` and ``AutoTokenizer.from_pretrained(out)`` load it, and so does
``lm_eval --model hf --model_args pretrained=<out>``. Where the model differs from ``GPT2LMHeadModel`` (document
masking, the padded vocabulary): docs/architecture.md#transformers-gpt-2-export-and-import.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import jax
import numpy as np

from infra.checkpoint import candidates
from infra.cli import user_errors
from infra.files import exists, join
from infra.ranges import flag_type


def checkpoint_dir(workdir: str, step: int | None) -> str | None:
    """The step dir of checkpoint ``step`` in ``workdir`` (None for the newest usable one, which
    ``restore_params`` picks); ValueError naming the steps there when it has none of that step."""
    dirs = candidates(workdir)  # FileNotFoundError (one line) for a workdir without checkpoints
    if step is None:
        return None
    for d in dirs:
        if os.path.basename(d.rstrip("/")) == str(step):
            return d
    have = ", ".join(os.path.basename(d.rstrip("/")) for d in reversed(dirs))
    raise ValueError(f"{workdir} has no checkpoint of step {step} (its checkpoints: steps {have}); choose one of "
                     "them with --step or leave --step out for the newest")


def _check_out(out: str, force: bool) -> None:
    if os.path.isfile(out):
        raise ValueError(f"--out {out} is a file; name a directory")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise ValueError(f"--out {out} exists and is not empty: choose a new directory, or pass --force to replace "
                         "its contents")


def _write_model(loaded, out: str) -> None:
    """config.json, generation_config.json and model.safetensors of the restored parameters."""
    from safetensors.numpy import save_file

    from models.hf_gpt2 import CONFIG, SAFETENSORS, hf_config, to_hf

    boundary = loaded.info.bos_id
    params = jax.tree.map(np.asarray, jax.device_get(loaded.params))
    save_file(to_hf(params), join(out, SAFETENSORS), metadata={"format": "pt"})
    with open(join(out, CONFIG), "w") as f:
        json.dump(hf_config(loaded.model_cfg, bos_id=boundary, eos_id=boundary), f, indent=2)
    with open(join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": boundary, "eos_token_id": boundary, "pad_token_id": boundary}, f, indent=2)


def _write_tokenizer(info, out: str, ctx: int) -> list[str]:
    """The run's tokenizer as transformers' files; the names written."""
    from data.hf_tokenizer import GPT2_PATTERN, hf_tokenizer, save_pretrained_files, source_file

    source = source_file(info.data_dir, info.tokenizer_path)
    pattern = info.meta.get("tokenizer", {}).get("pattern") or GPT2_PATTERN
    tok = hf_tokenizer(source, info.bos_id, pattern)
    unk = info.meta.get("unk_id")
    names = save_pretrained_files(tok, out, bos_id=info.bos_id, eos_id=info.bos_id,
                                  unk_id=None if unk is None else int(unk), model_max_length=ctx)
    return [os.path.basename(n) for n in names]


def export(workdir: str, out: str, step: int | None = None, force: bool = False) -> dict:
    """Write the run's checkpoint ``step`` (None: the newest usable) to ``out`` as a transformers GPT-2
    checkpoint (module docstring); returns what was exported."""
    from models.hf_gpt2 import check_family
    from tools.sample import load

    if not exists(join(workdir, "config.json")):
        raise ValueError(f"{workdir} has no config.json (not a training run's workdir)")
    _check_out(out, force)
    step_dir = checkpoint_dir(workdir, step)
    loaded = load(workdir, step_dir, device=jax.devices("cpu")[0])
    check_family(loaded.model_cfg)
    partial = out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    _write_model(loaded, partial)
    files = _write_tokenizer(loaded.info, partial, loaded.ctx)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.replace(partial, out)
    m = loaded.model_cfg
    return {"step": loaded.step, "out": out, "layers": m.n_layers, "d_model": m.d_model, "heads": m.n_heads,
            "ctx": m.ctx, "vocab_size": m.vocab_size, "tokenizer_vocab": loaded.info.vocab_size,
            "files": sorted(["config.json", "generation_config.json", "model.safetensors", *files])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="run directory (holds config.json and checkpoints/)")
    p.add_argument("--out", required=True, help="directory to write the transformers checkpoint into (local)")
    p.add_argument("--step", type=flag_type("int >= 0"), default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--force", action="store_true", help="replace the contents of a non-empty --out")
    a = p.parse_args(argv)
    # the export runs on the CPU: no accelerator backend is started (a GPU's would reserve most of its memory)
    jax.config.update("jax_platforms", "cpu")
    with user_errors():
        done = export(a.workdir, a.out, a.step, a.force)
    print(f"exported step {done['step']} of {a.workdir} to {done['out']}: GPT-2 of {done['layers']} layers, d_model "
          f"{done['d_model']}, {done['heads']} heads, context {done['ctx']}, vocabulary {done['vocab_size']} "
          f"({done['tokenizer_vocab']} used by the tokenizer); files: {', '.join(done['files'])}", flush=True)


if __name__ == "__main__":
    main()
