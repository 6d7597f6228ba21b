"""The full config schema with CPU-sized defaults; every preset starts from ``base_config()``.

Every field is declared as ``(default, valid range)`` (the rules of ``infra/ranges.py``: ``int >= 1``,
``float in [0, 1)``, ``one of a|b``, ...); a run's config is checked against the ranges when it is loaded,
before anything is written. Every field can be overridden on the command line: ``--config.optimizer.lr=1e-3``.
"""
import ml_collections

from configs.compare import COMPARE_RANGES

STEPS = "int >= 1"
COUNT = "int >= 0"
MESH_AXIS = "-1 or int >= 1"
DECAY = "float in [0, 1)"
EPS = "float > 0"
MULTIPLIER = "float > 0"

SCHEMA = {
    "workdir": ("runs/default", "nonempty str"),
    "seed": (0, COUNT),
    "steps": (200, STEPS),  # total optimizer steps
    "batch_size": (16, STEPS),  # global, in sequences
    "seq_len": (256, STEPS),
    "microbatches": (1, STEPS),  # gradient accumulation: batch_size is split into this many microbatches
    "loss_chunk": (0, COUNT),  # positions per cross-entropy piece (train/loss.py): float32 logits are made and
    #                            dropped piece by piece, never [B, L, V] at once; must divide seq_len; 0 = whole
    "cpu_devices": (8, COUNT),  # simulated CPU devices; 0 leaves the platform alone (GPU/TPU runs)
    "log_every": (10, STEPS),
    "eval_every": (50, STEPS),
    "eval_batches": (8, STEPS),  # held-out batches (of batch_size sequences) per periodic evaluation (the first)
    "final_eval_batches": (0, COUNT),  # the evaluation after the last step: 0 = the whole held-out split
    "eval_tasks": ("", "str"),  # multiple-choice task files (train/tasks.py), comma-separated, scored at every
    #                             evaluation: rows task/<file stem>/acc and acc_norm; "" = none
    "checkpoint_every": (100, STEPS),
    "keep_checkpoints": (3, STEPS),  # most recent checkpoints kept
    "keep_every": (0, COUNT),  # also keep every K-th step's checkpoint (0: none)
    "keep_set_aside": (2, COUNT),  # unreadable / unfinished checkpoints kept for inspection (per kind)
    "start_over": (False, "bool"),  # checkpoints exist but none restores: False stops with an error naming each
    #                                 and why; True sets them aside and trains from step 0
    "init_from": ("", "str"),  # checkpoint dir to take params from (fine-tuning with a fresh optimizer): a run's, or
    #                            a transformers GPT-2 dir (config.json + model.safetensors, models/hf_gpt2.py)
    "compiled_step": ("", "str"),  # a train step saved by tools.plan --save: loaded instead of compiled when it was
    #                                compiled for this program on devices like these (train/executable.py)
    "multiprocess": (False, "bool"),  # call jax.distributed.initialize() (SLURM / TPU pods / launch.local)
    "diagnostics_every": (0, COUNT),  # per-layer optimizer diagnostics every N steps (train/diagnostics.py); 0: off
    "profile_steps": ("", "str"),  # "START,END": a jax.profiler trace of those steps into <workdir>/profile/
    # loss spikes: with a factor, a step whose loss exceeds factor x the median of the last `window` losses keeps
    # the params and optimizer state it had (the data moves on); `max_skips` such steps in a row stop the run
    "loss_spike": {"factor": (0.0, "float >= 0"), "window": (100, "int >= 1"), "max_skips": (10, "int >= 1")},
    # Weights & Biases (the wandb extra): on with a project; the run's rows and config, resumed with the run
    "wandb": {"project": ("", "str"), "entity": ("", "str"), "group": ("", "str"), "name": ("", "str")},
    "mesh": {"data": (2, MESH_AXIS), "fsdp": (2, MESH_AXIS), "tensor": (2, MESH_AXIS)},  # one may be -1
    "model": {
        "name": ("cpu-small", "nonempty str"),  # a preset of models/presets.py (python -m models lists them)
        # the architecture (models/gpt.py): gpt2 | modern (the Celo2 paper's) | llama; "": the preset's
        "family": ("", "one of |gpt2|modern|llama"),
        "n_kv_heads": (0, COUNT),  # key/value heads, fewer than the heads for grouped-query attention; 0: the preset's
        "mlp_width": (0, COUNT),  # the MLP's hidden width; 0: the preset's (4D for GELU, ~8D/3 for SwiGLU)
        "vocab_size": (0, COUNT),  # 0: the tokenizer's vocabulary
        "vocab_multiple": (128, STEPS),  # pad the vocabulary to a multiple of this (shardable, faster matmuls)
        "compute_dtype": ("float32", "one of float32|bfloat16"),  # parameters stay float32
        "remat": ("none", "one of none|dots|dots_no_batch|full"),
        "dropout": (0.0, "float in [0, 1)"),
        "document_mask": (True, "bool"),
        # the attention kernel (models/attention.py): xla | splash (TPU) | pallas_gpu | cudnn (GPU, causal only,
        # bfloat16); auto picks by the devices' platform: TPU -> splash, GPU -> cudnn without document_mask in
        # bfloat16, else pallas_gpu; CPU -> xla
        "attention": ("auto", "one of auto|xla|splash|pallas_gpu|cudnn"),
    },
    "data": {
        "corpus": ("shakespeare", "nonempty str"),  # a named corpus (shakespeare, kjv, or joined: shakespeare+kjv)
        #                                             or your text
        "dir": ("data_cache/shakespeare-bpe4096", "str"),  # the prepared data ("" for none: tools.bench)
        "vocab_size": (4096, "int >= 300"),  # tokenizer vocabulary trained on the corpus (byte fallback: 259 ids)
        # a pretrained tokenizer instead (vocab_size is then ignored): a sentencepiece .model, a tokenizer.json,
        # a .tiktoken ranks file or a tiktoken encoding name (gpt2); "": train one of vocab_size
        "tokenizer": ("", "str"),
        "eot_token": ("", "str"),  # the token that begins each document (tokenizer.json / tiktoken); "": its own
        "num_threads": (2, STEPS),  # grain's loading threads per process
    },
    "optimizer": {
        "name": ("adamw", "one of adamw|muon|celo2|celo2_base|velo"),  # optim.registry's names
        "lr": (0.0, "float >= 0"),  # peak learning rate; 0: the optimizer's default (optim.registry records'
        #                             default_lr: adamw 3e-3, muon 0.02, celo2 / celo2_base 1e-3, velo 1 = as
        #                             published), filled in when the config is loaded
        "schedule": ("cosine", "one of cosine|constant|wsd"),
        "warmup_steps": (30, COUNT),
        "min_lr_ratio": (0.1, "float in [0, 1]"),  # the schedule's last lr, as a share of the peak
        "decay_fraction": (0.2, "float in (0, 1]"),  # wsd: share of the steps spent decaying
        "weight_decay": (0.1, "float >= 0"),  # on matrices and embeddings only
        "clip_norm": (1.0, "float >= 0"),  # global-norm clipping, 0 disables
        # where Muon and Celo2 run Newton-Schulz (optim/orthogonalize.py): each matrix gathered on every device
        # that holds a shard of it (replicated), or the matrices dealt out over the devices (distributed);
        # auto: distributed on a mesh of more than one device when the matrices hold >= 2^20 elements
        "orthogonalize": ("auto", "one of auto|replicated|distributed"),
        # each optimizer's own settings (the defaults of optim.registry records' ``settings``)
        "adamw": {"b1": (0.9, DECAY), "b2": (0.95, DECAY), "eps": (1e-8, EPS)},
        # adam_lr_mult: lr of the AdamW branch (embeddings, vectors) relative to lr
        "muon": {"beta": (0.95, DECAY), "nesterov": (True, "bool"), "adam_lr_mult": (0.15, MULTIPLIER),
                 "b1": (0.9, DECAY), "b2": (0.95, DECAY), "eps": (1e-8, EPS)},
        # theta: weight file (the official format); "": the shipped weights, filled in when the config is
        # loaded. celo2's adam_lr_mult: 20 = the meta-training mult_1d
        "celo2": {"theta": ("", "str"), "adam_lr_mult": (20.0, MULTIPLIER), "b1": (0.9, DECAY),
                  "b2": (0.95, DECAY), "eps": (1e-8, EPS)},
        "celo2_base": {"theta": ("", "str")},
        "velo": {"theta": ("", "str")},
    },
}


def _split(schema: dict, prefix: str = "") -> tuple[dict, dict]:
    """(the defaults as nested dicts, {dotted field: range}) of a schema of (default, range) leaves."""
    defaults, ranges = {}, {}
    for name, value in schema.items():
        if isinstance(value, dict):
            defaults[name], inner = _split(value, f"{prefix}{name}.")
            ranges.update(inner)
        else:
            defaults[name], ranges[prefix + name] = value
    return defaults, ranges


def base_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(_split(SCHEMA)[0])


def ranges() -> dict[str, str]:
    """{dotted field: valid range} of every field of the schema and of the comparison presets' section."""
    return {**_split(SCHEMA)[1], **COMPARE_RANGES}
