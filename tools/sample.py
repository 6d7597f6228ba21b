"""Generate text from a run's latest checkpoint.

    python -m tools.sample --workdir runs/default --prompt "ROMEO:" [--temperature 0.8 --top_k 40
        --max_tokens 200 --seed 0 --checkpoint <step dir>]

Reads the run's ``config.json`` (model and data dir), loads the tokenizer of the prepared data, restores
the parameters only (not the optimizer state) onto one device and samples with a jitted loop. The prompt
is encoded after a BOS token, like the start of every training document. There is no KV cache: every new
token runs the model over a fixed window (the prompt plus the new tokens, at most the model's context,
sliding once full), which is simple and fast enough for the small models of this project.
"""
from __future__ import annotations

import argparse
import functools
import json

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


@functools.lru_cache(maxsize=8)
def make_generate(graphdef, window: int, vocab_limit: int, max_tokens: int):
    """A jitted ``generate(params, buf[window], n, key, temperature, top_k) -> tokens[max_tokens]``.

    ``buf[:n]`` holds the context; temperature <= 0 is greedy, top_k = 0 samples from all tokens.
    """

    def pick(logits, key, temperature, top_k):
        vocab = jnp.arange(logits.shape[-1])
        logits = jnp.where(vocab < vocab_limit, logits, -jnp.inf)  # the padded part of the vocabulary
        greedy = jnp.argmax(logits)
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab_limit), vocab_limit)
        kth = jnp.sort(logits)[logits.shape[-1] - k]
        logits = jnp.where(logits < kth, -jnp.inf, logits) / jnp.maximum(temperature, 1e-6)
        return jnp.where(temperature > 0, jax.random.categorical(key, logits), greedy).astype(jnp.int32)

    @jax.jit
    def generate(params, buf, n, key, temperature, top_k):
        model = nnx.merge(graphdef, params)

        def body(i, carry):
            buf, n, key, out = carry
            logits = model(buf[None])[0, n - 1]  # causal: positions >= n do not influence position n - 1
            key, sub = jax.random.split(key)
            tok = pick(logits, sub, temperature, top_k)
            full = n == window
            buf = jnp.where(full, jnp.roll(buf, -1).at[window - 1].set(tok),
                            buf.at[jnp.minimum(n, window - 1)].set(tok))
            return buf, jnp.minimum(n + 1, window), key, out.at[i].set(tok)

        out = jnp.zeros((max_tokens,), jnp.int32)
        return jax.lax.fori_loop(0, max_tokens, body, (buf, n, key, out))[3]

    return generate


def sample(workdir: str, prompt: str, *, temperature: float = 0.8, top_k: int = 40, max_tokens: int = 200,
           seed: int = 0, checkpoint: str | None = None, device=None) -> str:
    """The generated continuation of ``prompt`` (text only, without the prompt)."""
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
    tok = info.tokenizer
    model_cfg = run.model_cfg
    graphdef, _, abstract = run.params_layout
    _, params = restore_params(checkpoint or workdir, abstract)

    ids = [info.bos_id] + tok.encode(prompt)
    window = _window(len(ids), max_tokens, model_cfg.ctx)
    ids = ids[-window:]
    buf = np.zeros((window,), np.int32)
    buf[:len(ids)] = ids
    generate = make_generate(graphdef, window, info.vocab_size, max_tokens)
    out = generate(params, jnp.asarray(buf), jnp.int32(len(ids)), jax.random.key(seed), jnp.float32(temperature),
                   jnp.int32(top_k))
    return tok.decode(np.asarray(out))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="run directory (holds config.json and checkpoints/)")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--temperature", type=flag_type("float >= 0"), default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=flag_type("int >= 0"), default=40,
                   help="sample among the k most likely tokens (0: all)")
    p.add_argument("--max_tokens", type=flag_type("int >= 1"), default=200)
    p.add_argument("--seed", type=flag_type("int >= 0"), default=0)
    p.add_argument("--checkpoint", default=None, help="a checkpoint step dir (default: the latest)")
    a = p.parse_args(argv)
    with user_errors():
        if not exists(join(a.workdir, "config.json")):
            raise ValueError(f"{a.workdir} has no config.json (not a training run's workdir)")
        text = sample(a.workdir, a.prompt, temperature=a.temperature, top_k=a.top_k, max_tokens=a.max_tokens,
                      seed=a.seed, checkpoint=a.checkpoint)
    print(a.prompt + text, flush=True)


if __name__ == "__main__":
    main()
