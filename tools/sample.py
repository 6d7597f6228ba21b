"""Generate text from a run's latest checkpoint.

    python -m tools.sample --workdir runs/default --prompt "ROMEO:" [--temperature 0.8 --top_k 40 --top_p 1
        --max_tokens 200 --seed 0 --checkpoint <step dir>] [--bench]

Reads the run's ``config.json`` (model and data dir), loads the tokenizer of the prepared data, restores
the parameters only (not the optimizer state) onto one device and samples with a jitted loop. The prompt
is encoded after a BOS token, like the start of every training document. Decoding keeps a KV cache
(``GPT.decode``): each position's keys and values are computed once, so a new token costs one position's
forward pass. When the prompt and the new tokens do not fit in the model's context, it falls back to running
the model over a window that slides once full (no cache: positions are learned, a shifted window changes
every key). ``--bench`` times both ways for the same tokens and prints tokens/s.
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from infra.cli import user_errors
from infra.files import exists, join, read_text
from infra.ranges import flag_type
from flax import nnx


def _window(n_prompt: int, max_tokens: int, ctx: int, multiple: int = 32) -> int:
    want = n_prompt + max_tokens
    return min(ctx, -(-want // multiple) * multiple)


def _pick(logits, key, temperature, top_k, top_p, vocab_limit: int):
    """The next token: greedy for temperature <= 0; else sampled at ``temperature`` among the ``top_k`` most
    likely (0: all) whose probabilities, most likely first, sum to at most ``top_p`` (the first always kept)."""
    vocab = jnp.arange(logits.shape[-1])
    logits = jnp.where(vocab < vocab_limit, logits, -jnp.inf)  # the padded part of the vocabulary
    greedy = jnp.argmax(logits)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab_limit), vocab_limit)
    kth = jnp.sort(logits)[logits.shape[-1] - k]
    logits = jnp.where(logits < kth, -jnp.inf, logits) / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-logits)
    before = jnp.cumsum(jax.nn.softmax(logits)[order]) - jax.nn.softmax(logits)[order]  # mass of the likelier
    logits = logits.at[order].set(jnp.where(before < top_p, logits[order], -jnp.inf))
    return jnp.where(temperature > 0, jax.random.categorical(key, logits), greedy).astype(jnp.int32)


@functools.lru_cache(maxsize=8)
def make_generate(graphdef, window: int, vocab_limit: int, max_tokens: int):
    """A jitted ``generate(params, buf[window], n, key, temperature, top_k, top_p) -> tokens[max_tokens]``
    without a cache: the model runs over the window for every token (``buf[:n]`` holds the context)."""

    @jax.jit
    def generate(params, buf, n, key, temperature, top_k, top_p):
        model = nnx.merge(graphdef, params)

        def body(i, carry):
            buf, n, key, out = carry
            logits = model(buf[None])[0, n - 1]  # causal: positions >= n do not influence position n - 1
            key, sub = jax.random.split(key)
            tok = _pick(logits, sub, temperature, top_k, top_p, vocab_limit)
            full = n == window
            buf = jnp.where(full, jnp.roll(buf, -1).at[window - 1].set(tok),
                            buf.at[jnp.minimum(n, window - 1)].set(tok))
            return buf, jnp.minimum(n + 1, window), key, out.at[i].set(tok)

        out = jnp.zeros((max_tokens,), jnp.int32)
        return jax.lax.fori_loop(0, max_tokens, body, (buf, n, key, out))[3]

    return generate


@functools.lru_cache(maxsize=8)
def make_generate_cached(graphdef, length: int, vocab_limit: int, max_tokens: int):
    """The same ``generate`` with a KV cache of ``length`` positions (the prompt and the new tokens but the
    last): the prompt's positions fill the cache, then every token is one ``GPT.decode`` step."""

    @jax.jit
    def generate(params, buf, n, key, temperature, top_k, top_p):
        model = nnx.merge(graphdef, params)
        cache = model.empty_cache(1, length)
        cache = jax.lax.fori_loop(0, n - 1, lambda i, c: model.decode(buf[i][None], i, c)[1], cache)

        def body(i, carry):
            tok, cache, key, out = carry
            logits, cache = model.decode(tok[None], n - 1 + i, cache)
            key, sub = jax.random.split(key)
            tok = _pick(logits[0], sub, temperature, top_k, top_p, vocab_limit)
            return tok, cache, key, out.at[i].set(tok)

        out = jnp.zeros((max_tokens,), jnp.int32)
        return jax.lax.fori_loop(0, max_tokens, body, (buf[n - 1], cache, key, out))[3]

    return generate


def sample(workdir: str, prompt: str, *, temperature: float = 0.8, top_k: int = 40, top_p: float = 1.0,
           max_tokens: int = 200, seed: int = 0, checkpoint: str | None = None, device=None, cache: bool = True,
           timed: dict | None = None) -> str:
    """The generated continuation of ``prompt`` (text only, without the prompt). ``cache`` False: the path
    without a KV cache; ``timed``: gets the seconds of the generation itself (``seconds``, compiled before)."""
    import data
    from infra.checkpoint import restore_params
    from train.build import build_run
    from train.config import with_dataset

    cfg = ml_collections.ConfigDict(json.loads(read_text(join(workdir, "config.json"))))
    with cfg.unlocked():
        # the fused kernels tile the sequence in 128-token blocks; the sampling window is a multiple of 32
        cfg.model.remat, cfg.model.dropout, cfg.model.attention = "none", 0.0, "xla"
        cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
        cfg.batch_size, cfg.microbatches = 1, 1
    info = data.load_info(cfg.data.dir)  # never prepares: the run's data exists
    run = build_run(with_dataset(cfg, info.vocab_size), [device or jax.devices()[0]], dataset=info)
    graphdef, _, abstract = run.params_layout
    _, params = restore_params(checkpoint or workdir, abstract)

    ids = [info.bos_id] + info.tokenizer.encode(prompt)
    if cache and len(ids) + max_tokens - 1 <= run.model_cfg.ctx:
        window = len(ids)
        generate = make_generate_cached(graphdef, len(ids) + max_tokens - 1, info.vocab_size, max_tokens)
    else:
        window = _window(len(ids), max_tokens, run.model_cfg.ctx)
        generate = make_generate(graphdef, window, info.vocab_size, max_tokens)
    ids = ids[-window:]
    buf = np.zeros((window,), np.int32)
    buf[:len(ids)] = ids
    args = (params, jnp.asarray(buf), jnp.int32(len(ids)), jax.random.key(seed), jnp.float32(temperature),
            jnp.int32(top_k), jnp.float32(top_p))
    if timed is not None:
        jax.block_until_ready(generate(*args))  # compiled and run once: the time below is the generation's
        t0 = time.perf_counter()
    out = jax.block_until_ready(generate(*args))
    if timed is not None:
        timed["seconds"] = time.perf_counter() - t0
    return info.tokenizer.decode(np.asarray(out))


def bench(workdir: str, prompt: str, max_tokens: int, checkpoint: str | None) -> str:
    """Tokens/s of greedy generation with and without the KV cache (the same tokens: checked)."""
    rates, texts = {}, {}
    for cache in (True, False):
        timed = {}
        texts[cache] = sample(workdir, prompt, temperature=0.0, max_tokens=max_tokens, checkpoint=checkpoint,
                              cache=cache, timed=timed)
        rates[cache] = max_tokens / timed["seconds"]
    same = "the same tokens" if texts[True] == texts[False] else "DIFFERENT tokens"
    return (f"{max_tokens} greedy tokens: KV cache {rates[True]:.1f} tokens/s, without {rates[False]:.1f} tokens/s "
            f"({rates[True] / rates[False]:.1f}x; {same})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="run directory (holds config.json and checkpoints/)")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--temperature", type=flag_type("float >= 0"), default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=flag_type("int >= 0"), default=40,
                   help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top_p", type=flag_type("float in (0, 1]"), default=1.0,
                   help="sample among the most likely tokens whose probabilities sum to this (1: all)")
    p.add_argument("--max_tokens", type=flag_type("int >= 1"), default=200)
    p.add_argument("--seed", type=flag_type("int >= 0"), default=0)
    p.add_argument("--checkpoint", default=None, help="a checkpoint step dir (default: the latest)")
    p.add_argument("--bench", action="store_true", help="time greedy generation with and without the KV cache")
    a = p.parse_args(argv)
    with user_errors():
        if not exists(join(a.workdir, "config.json")):
            raise ValueError(f"{a.workdir} has no config.json (not a training run's workdir)")
        if a.bench:
            print(bench(a.workdir, a.prompt, a.max_tokens, a.checkpoint), flush=True)
            return
        text = sample(a.workdir, a.prompt, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                      max_tokens=a.max_tokens, seed=a.seed, checkpoint=a.checkpoint)
    print(a.prompt + text, flush=True)


if __name__ == "__main__":
    main()
