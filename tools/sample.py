"""Generate text from a run's latest checkpoint.

    python -m tools.sample --workdir runs/default --prompt "ROMEO:" [--prompt "JULIET:" ...]
        [--prompts_file F] [--temperature 0.8 --top_k 40 --top_p 1 --max_tokens 200 --seed 0
        --checkpoint <step dir>] [--bench]

Reads the run's ``config.json`` (model and data dir), loads the tokenizer of the prepared data, restores
the parameters only (not the optimizer state) onto one device and samples all prompts as one batch with a
jitted loop. Each prompt is encoded after a BOS token, like the start of every training document.

Decoding keeps a KV cache (``GPT.decode``): each position's keys and values are computed once, so a new
token costs one position's forward pass. Positions are learned and end at the model's context, so once a
sequence outgrows it the remaining tokens come from running the model over the last ``ctx`` tokens, a
window that slides by one token per new token (no cache: a shifted window changes every key). The tokens
are the same as running the window from the start, only faster. ``--bench`` times both ways for the same
prompts and prints tokens/s.
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from infra.cli import user_errors
from infra.files import exists, join, read_text
from infra.ranges import flag_type


@dataclass(frozen=True)
class Settings:
    """How a token is picked: greedy for ``temperature`` <= 0; else sampled at ``temperature`` among the
    ``top_k`` most likely (0: all) whose probabilities, most likely first, sum to at most ``top_p``."""
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 1.0
    seed: int = 0

    def traced(self):
        return jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p)


def _pick(logits, key, temperature, top_k, top_p, vocab_limit: int):
    """One row's next token from its logits [V] (``Settings``; the first of the likeliest is always kept)."""
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)  # the padded vocabulary
    return jax.lax.cond(temperature > 0, _sampled, lambda logits, *_: jnp.argmax(logits).astype(jnp.int32),
                        logits, key, temperature, top_k, top_p, vocab_limit)


def _sampled(logits, key, temperature, top_k, top_p, vocab_limit):
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab_limit), vocab_limit)
    kth = jnp.sort(logits)[logits.shape[-1] - k]
    logits = jnp.where(logits < kth, -jnp.inf, logits) / temperature
    order = jnp.argsort(-logits)
    before = jnp.cumsum(jax.nn.softmax(logits)[order]) - jax.nn.softmax(logits)[order]  # mass of the likelier
    logits = logits.at[order].set(jnp.where(before < top_p, logits[order], -jnp.inf))
    return jax.random.categorical(key, logits).astype(jnp.int32)


_pick_rows = jax.vmap(_pick, in_axes=(0, 0, None, None, None, None))


@functools.lru_cache(maxsize=8)
def _cached_generator(graphdef, length: int, vocab_limit: int, max_tokens: int):
    """A jitted ``generate(params, prompts[B, P], n[B], key, temperature, top_k, top_p) -> tokens[B, max_tokens]``
    with a KV cache of ``length`` positions. One loop over positions t = 0 .. length - 1 serves every row: row
    b feeds its prompt token at t while t < n_b and its last pick after; the logits at t pick its token at
    t + 1, kept as its new token number t + 1 - n_b. Row b fills min(max_tokens, length - n_b + 1) tokens."""

    @jax.jit
    def generate(params, prompts_BxP, n_B, key, temperature, top_k, top_p):
        model = nnx.merge(graphdef, params)
        batch, width = prompts_BxP.shape
        rows = jnp.arange(batch)

        def body(t, carry):
            tok_B, cache, key, out_BxK = carry
            logits_BxV, cache = model.decode(tok_B, t, cache)
            key, sub = jax.random.split(key)
            new_B = _pick_rows(logits_BxV, jax.random.split(sub, batch), temperature, top_k, top_p, vocab_limit)
            index_B = t + 1 - n_B
            out_BxK = out_BxK.at[rows, jnp.where(index_B >= 0, index_B, max_tokens)].set(new_B, mode="drop")
            tok_B = jnp.where(t + 1 < n_B, prompts_BxP[:, jnp.minimum(t + 1, width - 1)], new_B)
            return tok_B, cache, key, out_BxK

        out = jnp.zeros((batch, max_tokens), jnp.int32)
        carry = (prompts_BxP[:, 0], model.empty_cache(batch, length), key, out)
        return jax.lax.fori_loop(0, length, body, carry)[3]

    return generate


@functools.lru_cache(maxsize=8)
def _window_generator(graphdef, window: int, vocab_limit: int, max_tokens: int):
    """The same ``generate`` without a cache, ``prompts[B, window]`` holding each row's last ``n_b`` tokens
    left-aligned: for every token the model runs over the window (causal: positions >= n_b do not change the
    logits at n_b - 1), which slides by one once full."""

    def one_row(params, buf, n, key, temperature, top_k, top_p):
        model = nnx.merge(graphdef, params)

        def body(i, carry):
            buf, n, key, out = carry
            logits = model(buf[None])[0, n - 1]
            key, sub = jax.random.split(key)
            tok = _pick(logits, sub, temperature, top_k, top_p, vocab_limit)
            buf = jnp.where(n == window, jnp.roll(buf, -1).at[window - 1].set(tok),
                            buf.at[jnp.minimum(n, window - 1)].set(tok))
            return buf, jnp.minimum(n + 1, window), key, out.at[i].set(tok)

        out = jnp.zeros((max_tokens,), jnp.int32)
        return jax.lax.fori_loop(0, max_tokens, body, (buf, n, key, out))[3]

    return jax.jit(jax.vmap(one_row, in_axes=(None, 0, 0, 0, None, None, None)))


def _left_aligned(seqs: list[list[int]], width: int):
    buf = np.zeros((len(seqs), width), np.int32)
    for b, s in enumerate(seqs):
        buf[b, :len(s)] = s
    return jnp.asarray(buf), jnp.asarray([len(s) for s in seqs], jnp.int32)


def generate(graphdef, params, prompts: list[list[int]], *, max_tokens: int, ctx: int, vocab_limit: int,
             settings: Settings = Settings(), cache: bool = True) -> np.ndarray:
    """``max_tokens`` new token ids [B, max_tokens] after each of the ``prompts`` (token ids, at least one
    each; only the last ``ctx`` of a prompt are seen). With ``cache``: the KV-cached loop while the longest
    sequence fits the context, the sliding window for what is left (the same tokens as the window alone)."""
    prompts = [list(p)[-ctx:] for p in prompts]
    longest = max(len(p) for p in prompts)
    key_cached, key_window = jax.random.split(jax.random.key(settings.seed))
    out = [[] for _ in prompts]
    if cache:
        length = min(ctx, longest + max_tokens - 1)
        fn = _cached_generator(graphdef, length, vocab_limit, max_tokens)
        tokens = np.asarray(fn(params, *_left_aligned(prompts, longest), key_cached, *settings.traced()))
        out = [list(tokens[b, :min(max_tokens, length - len(p) + 1)]) for b, p in enumerate(prompts)]
    left = max_tokens - min(len(o) for o in out)
    if left:
        window = ctx if cache else min(ctx, -(-(longest + max_tokens) // 32) * 32)  # 32: fewer recompiles
        fn = _window_generator(graphdef, window, vocab_limit, left)
        tails = [(p + o)[-window:] for p, o in zip(prompts, out)]
        keys = jax.random.split(key_window, len(prompts))
        tokens = np.asarray(fn(params, *_left_aligned(tails, window), keys, *settings.traced()))
        out = [o + list(tokens[b, :max_tokens - len(o)]) for b, o in enumerate(out)]
    return np.asarray(out, np.int32)


@dataclass
class Loaded:
    """A run's model on one device, ready to sample: ``graphdef``/``params`` (nnx), the prepared data's
    ``info`` (tokenizer, BOS, vocabulary), the model's context ``ctx``, and the checkpoint's ``step`` and the
    ``model_cfg`` (``GPTConfig``) the parameters were restored for."""
    graphdef: object
    params: object
    info: object
    ctx: int
    step: int = 0
    model_cfg: object = None

    def complete(self, prompts: list[str], max_tokens: int, settings: Settings = Settings(),
                 cache: bool = True) -> list[str]:
        """Each prompt's generated continuation (text only, without the prompt)."""
        ids = [[self.info.bos_id] + self.info.tokenizer.encode(p) for p in prompts]
        tokens = generate(self.graphdef, self.params, ids, max_tokens=max_tokens, ctx=self.ctx,
                          vocab_limit=self.info.vocab_size, settings=settings, cache=cache)
        return [self.info.tokenizer.decode(row) for row in tokens]


def load(workdir: str, checkpoint: str | None = None, device=None) -> Loaded:
    """The run's parameters (``checkpoint``, default the latest) restored onto ``device`` (default the first)."""
    import data
    from infra.checkpoint import restore_params
    from train.build import build_run
    from train.config import with_dataset

    cfg = ml_collections.ConfigDict(json.loads(read_text(join(workdir, "config.json"))))
    with cfg.unlocked():
        # the fused kernels tile the sequence in 128-token blocks; the sampling window may be shorter
        cfg.model.remat, cfg.model.dropout, cfg.model.attention = "none", 0.0, "xla"
        cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
        cfg.batch_size, cfg.microbatches = 1, 1
    info = data.load_info(cfg.data.dir)  # never prepares: the run's data exists
    run = build_run(with_dataset(cfg, info.vocab_size), [device or jax.devices()[0]], dataset=info)
    graphdef, _, abstract = run.params_layout
    step, params = restore_params(checkpoint or workdir, abstract)
    return Loaded(graphdef, params, info, run.model_cfg.ctx, step, run.model_cfg)


def sample(workdir: str, prompt: str, *, temperature: float = 0.8, top_k: int = 40, top_p: float = 1.0,
           max_tokens: int = 200, seed: int = 0, checkpoint: str | None = None, cache: bool = True) -> str:
    """The generated continuation of ``prompt`` (text only, without the prompt)."""
    loaded = load(workdir, checkpoint)
    return loaded.complete([prompt], max_tokens, Settings(temperature, top_k, top_p, seed), cache)[0]


def bench(loaded: Loaded, prompts: list[str], max_tokens: int) -> str:
    """Tokens/s of greedy generation for ``prompts`` (one batch) with and without the KV cache, each timed
    after a first call that compiles it; the tokens of both are checked equal."""
    rates, texts = {}, {}
    greedy = Settings(temperature=0.0)
    for cache in (True, False):
        loaded.complete(prompts, max_tokens, greedy, cache)  # compiles
        t0 = time.perf_counter()
        texts[cache] = loaded.complete(prompts, max_tokens, greedy, cache)
        rates[cache] = len(prompts) * max_tokens / (time.perf_counter() - t0)
    same = "the same tokens" if texts[True] == texts[False] else "DIFFERENT tokens"
    return (f"{len(prompts)} prompt(s) x {max_tokens} greedy tokens, context {loaded.ctx}: KV cache "
            f"{rates[True]:.1f} tokens/s, without {rates[False]:.1f} tokens/s "
            f"({rates[True] / rates[False]:.1f}x; {same})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="run directory (holds config.json and checkpoints/)")
    p.add_argument("--prompt", action="append", default=None,
                   help="text to continue; give it several times for a batch (default: one empty prompt)")
    p.add_argument("--prompts_file", default=None, help="a text file of prompts, one per line (added to --prompt)")
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
        prompts = list(a.prompt or [])
        if a.prompts_file:
            prompts += [line for line in read_text(a.prompts_file).splitlines() if line.strip()]
        prompts = prompts or [""]
        loaded = load(a.workdir, a.checkpoint)
        if a.bench:
            print(bench(loaded, prompts, a.max_tokens), flush=True)
            return
        texts = loaded.complete(prompts, a.max_tokens, Settings(a.temperature, a.top_k, a.top_p, a.seed))
    print(("\n" + "-" * 40 + "\n").join(prompt + text for prompt, text in zip(prompts, texts)), flush=True)


if __name__ == "__main__":
    main()
