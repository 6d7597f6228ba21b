"""The full config schema with CPU-sized defaults; every preset starts from ``base_config()``.

Every field can be overridden on the command line: ``--config.optimizer.lr=1e-3``.
"""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/default"
    c.seed = 0
    c.steps = 200  # total optimizer steps
    c.batch_size = 16  # global, in sequences
    c.seq_len = 256
    c.microbatches = 1  # gradient accumulation: batch_size is split into this many microbatches
    c.loss_chunk = 0  # positions per cross-entropy piece (train/loss.py): float32 logits are made and dropped
    #                   piece by piece, never [B, L, V] at once; must divide seq_len; 0 = the whole sequence
    c.cpu_devices = 8  # simulated CPU devices; 0 leaves the platform alone (GPU/TPU runs)
    c.log_every = 10
    c.eval_every = 50
    c.eval_batches = 8  # held-out batches (of batch_size sequences) per periodic evaluation (the first ones)
    c.final_eval_batches = 0  # the evaluation after the last step: 0 = the whole held-out split
    c.checkpoint_every = 100
    c.keep_checkpoints = 3  # most recent checkpoints kept
    c.keep_every = 0  # also keep every K-th step's checkpoint (0: none)
    c.keep_set_aside = 2  # unreadable / unfinished checkpoints kept for inspection (per kind); older are deleted
    c.start_over = False  # checkpoints exist but none restores: False stops with an error naming each and why;
    #                       True sets them aside and trains from step 0
    c.init_from = ""  # checkpoint dir to take params from (fine-tuning with a fresh optimizer)
    c.multiprocess = False  # call jax.distributed.initialize() (SLURM / TPU pods / launch.local set this)

    c.mesh = ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2))  # one entry may be -1

    c.model = ml_collections.ConfigDict(dict(
        name="cpu-small",
        vocab_size=0,  # 0: the tokenizer's vocabulary
        vocab_multiple=128,  # pad the vocabulary to a multiple of this (shardable, faster matmuls)
        compute_dtype="float32",
        remat="none",
        dropout=0.0,
        document_mask=True,
        attention="auto",  # kernel (models/attention.py): xla | splash (TPU) | pallas_gpu | cudnn (GPU, causal
        #                    only, bfloat16); auto picks by the devices' platform: TPU -> splash, GPU -> cudnn
        #                    without document_mask in bfloat16, else pallas_gpu; CPU -> xla
    ))

    c.data = ml_collections.ConfigDict(dict(
        corpus="shakespeare",  # a named corpus (shakespeare, kjv, or joined: shakespeare+kjv) or your text
        dir="data_cache/shakespeare-bpe4096",
        vocab_size=4096,  # tokenizer vocabulary trained on the corpus
        num_threads=2,
    ))

    c.optimizer = optimizer_config()
    return c


def optimizer_config() -> ml_collections.ConfigDict:
    """The shared optimizer fields and one section per optimizer (``optimizer.<name>``), whose defaults are the
    optimizer's own (optim.registry records' ``settings``)."""
    adam = dict(b1=0.9, b2=0.95, eps=1e-8)
    return ml_collections.ConfigDict(dict(
        name="adamw",  # adamw | muon | celo2 | celo2_base | velo
        lr=0.0,  # peak learning rate; 0: the optimizer's default (optim.registry records' default_lr: adamw 3e-3,
        #          muon 0.02, celo2 / celo2_base 1e-3, velo 1 = as published), filled in when the config is loaded
        schedule="cosine",  # cosine | constant | wsd
        warmup_steps=30,
        min_lr_ratio=0.1,
        decay_fraction=0.2,  # wsd: share of the steps spent decaying
        weight_decay=0.1,  # on matrices and embeddings only
        clip_norm=1.0,  # global-norm clipping, 0 disables
        adamw=ml_collections.ConfigDict(dict(adam)),
        # adam_lr_mult: lr of the AdamW branch (embeddings, vectors) relative to lr
        muon=ml_collections.ConfigDict(dict(beta=0.95, nesterov=True, adam_lr_mult=0.15, **adam)),
        # theta: weight file (the official format); "": the shipped weights, filled in when the config is loaded.
        # celo2's adam_lr_mult: 20 = the meta-training mult_1d
        celo2=ml_collections.ConfigDict(dict(theta="", adam_lr_mult=20.0, **adam)),
        celo2_base=ml_collections.ConfigDict(dict(theta="")),
        velo=ml_collections.ConfigDict(dict(theta="")),
    ))
