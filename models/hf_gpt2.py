"""GPT-2 in Hugging Face transformers' format (``GPT2LMHeadModel``) <-> this harness's parameters, in numpy.

A transformers GPT-2 checkpoint is a directory with ``config.json`` (``model_type: gpt2``) and the weights in
``model.safetensors`` (or the older ``pytorch_model.bin``). Its layers are torch ``Conv1D`` modules, which
compute ``y = x @ W + b`` with ``W`` stored ``[in, out]`` (the transpose of ``torch.nn.Linear``'s). With
D = d_model, N heads, H = D / N, F = 4 D, V the vocabulary, T the positions and ``i`` a layer, the tensors
map one to one (HF names under ``transformer.``; older files have no prefix):

=============================  ========  =================================  ============
HF tensor                      HF shape  harness leaf                       shape
=============================  ========  =================================  ============
``wte.weight``                 [V, D]    ``token_embed`` (and the tied head) [V, D]
``wpe.weight``                 [T, D]    ``pos_embed``                      [T, D]
``h.i.ln_1.weight``, ``bias``  [D]       ``blocks/i/ln1/scale``, ``bias``   [D]
``h.i.attn.c_attn.weight``     [D, 3D]   ``blocks/i/attn/qkv_kernel``       [3, N, D, H]
``h.i.attn.c_attn.bias``       [3D]      ``blocks/i/attn/qkv_bias``         [3 N H]
``h.i.attn.c_proj.weight``     [D, D]    ``blocks/i/attn/out_kernel``       [N, H, D]
``h.i.attn.c_proj.bias``       [D]       ``blocks/i/attn/out_bias``         [D]
``h.i.ln_2.weight``, ``bias``  [D]       ``blocks/i/ln2/scale``, ``bias``   [D]
``h.i.mlp.c_fc.weight``        [D, F]    ``blocks/i/mlp/fc_kernel``         [D, F]
``h.i.mlp.c_fc.bias``          [F]       ``blocks/i/mlp/fc_bias``           [F]
``h.i.mlp.c_proj.weight``      [F, D]    ``blocks/i/mlp/proj_kernel``       [F, D]
``h.i.mlp.c_proj.bias``        [D]       ``blocks/i/mlp/proj_bias``         [D]
``ln_f.weight``, ``bias``      [D]       ``ln_f/scale``, ``bias``           [D]
=============================  ========  =================================  ============

The packed attention projection: ``c_attn`` puts q, k and v one after the other along its output axis, each
D wide with the heads contiguous (HF splits the output in three, then views each as [N, H]), so output
column ``s D + n H + h`` is part s (0 q, 1 k, 2 v), head n, dimension h::

    c_attn.weight[d, s D + n H + h] = qkv_kernel[s, n, d, h]      c_attn.bias[s D + n H + h] = qkv_bias[s N H + n H + h]

i.e. ``qkv_kernel.transpose(2, 0, 1, 3).reshape(D, 3 D)``, and the flat bias is in the same (s, n, h) order
already. The output projection reads the heads concatenated (input row ``n H + h``)::

    c_proj.weight[n H + h, d] = out_kernel[n, h, d]               i.e. out_kernel.reshape(D, D)

The head is tied (``tie_word_embeddings``): logits = ``h_final @ wte.T``; ``lm_head.weight`` is not stored
(transformers ties it when it loads), and when a file has it, it must equal ``wte``. Old checkpoints also hold
the causal-mask buffers ``attn.bias`` / ``attn.masked_bias`` ([1, 1, T, T]), which are not parameters and
are ignored.
"""
from __future__ import annotations

import io
import json

import numpy as np

from infra.files import exists, join, read_bytes, read_text
from models.gpt import GPTConfig

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
TORCH_BIN = "pytorch_model.bin"
# the harness's MLP uses the tanh approximation of GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)));
# transformers computes the same function under both names
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
_LAYER = {  # per-layer tensors whose layout is the same on both sides: HF suffix -> (module, leaf)
    "ln_1.weight": ("ln1", "scale"), "ln_1.bias": ("ln1", "bias"),
    "ln_2.weight": ("ln2", "scale"), "ln_2.bias": ("ln2", "bias"),
    "attn.c_attn.bias": ("attn", "qkv_bias"), "attn.c_proj.bias": ("attn", "out_bias"),
    "mlp.c_fc.weight": ("mlp", "fc_kernel"), "mlp.c_fc.bias": ("mlp", "fc_bias"),
    "mlp.c_proj.weight": ("mlp", "proj_kernel"), "mlp.c_proj.bias": ("mlp", "proj_bias"),
}


def mlp_width(model_cfg: GPTConfig) -> int:
    """The MLP's hidden width F (an explicit ``mlp_width`` where the config has one, else ``mlp_ratio`` x D)."""
    return getattr(model_cfg, "mlp_width", 0) or getattr(model_cfg, "mlp_ratio", 4) * model_cfg.d_model


def check_family(model_cfg: GPTConfig) -> None:
    """ValueError unless the model is of the GPT-2 family (LayerNorm, learned positions, biases, tied head), the
    only one ``GPT2LMHeadModel`` computes."""
    family = getattr(model_cfg, "family", "gpt2")
    if family != "gpt2":
        raise ValueError(f"transformers' GPT2LMHeadModel computes the gpt2 model family only; this model is of the "
                         f"{family!r} family")


def hf_config(model_cfg: GPTConfig, bos_id: int, eos_id: int) -> dict:
    """The ``config.json`` of a ``GPT2LMHeadModel`` computing ``model_cfg``'s function. Dropout: the harness
    drops the attention and MLP outputs (``resid_pdrop``), never the embeddings or attention probabilities."""
    check_family(model_cfg)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": model_cfg.vocab_size, "n_positions": model_cfg.ctx, "n_ctx": model_cfg.ctx,
        "n_embd": model_cfg.d_model, "n_layer": model_cfg.n_layers, "n_head": model_cfg.n_heads,
        "n_inner": mlp_width(model_cfg), "activation_function": TANH_GELU[0],
        "resid_pdrop": model_cfg.dropout, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "layer_norm_epsilon": model_cfg.ln_eps, "initializer_range": model_cfg.init_std,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "add_cross_attention": False, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": int(bos_id), "eos_token_id": int(eos_id), "dtype": "float32",
    }


def hf_shape(config: dict) -> tuple[int, int, int, int]:
    """(layers, d_model, heads, context) of a transformers GPT-2 ``config.json``."""
    return (int(config["n_layer"]), int(config["n_embd"]), int(config["n_head"]),
            int(config.get("n_positions", config.get("n_ctx", 0))))


def check_hf_config(config: dict, model_cfg: GPTConfig, where: str = "the checkpoint") -> None:
    """ValueError unless the transformers GPT-2 ``config`` (of ``where``) computes the same function as
    ``model_cfg``'s architecture: same shape, at most its vocabulary, tanh GELU, 4 d MLP, same LayerNorm eps,
    tied head, plain 1/sqrt(H) attention scaling."""
    check_family(model_cfg)
    if config.get("model_type") != "gpt2":
        raise ValueError(f"{where} is not a GPT-2 checkpoint (config.json model_type {config.get('model_type')!r},"
                         " expected 'gpt2')")
    theirs = hf_shape(config)
    ours = (model_cfg.n_layers, model_cfg.d_model, model_cfg.n_heads, model_cfg.ctx)
    if theirs != ours:
        raise ValueError(f"{where} has (layers, d_model, heads, context) = {theirs}, the model preset {ours}: "
                         "choose the preset of that shape (--config.model.name, python -m models lists them)")
    vocab = int(config["vocab_size"])
    if vocab > model_cfg.vocab_size:
        raise ValueError(f"{where} has a vocabulary of {vocab}, larger than the model's {model_cfg.vocab_size}: "
                         f"set --config.model.vocab_size={vocab} (and train on data of that tokenizer)")
    act = config.get("activation_function", TANH_GELU[0])
    if act not in TANH_GELU:
        raise ValueError(f"{where} uses activation_function={act!r}; the harness's MLP computes tanh-approximate "
                         f"GELU, which transformers calls {' or '.join(TANH_GELU)}: other activations are refused")
    inner = config.get("n_inner") or 4 * model_cfg.d_model
    eps = float(config.get("layer_norm_epsilon", 1e-5))
    problems = [f"n_inner={inner} (the harness's MLP is {mlp_width(model_cfg)} wide)"
                if inner != mlp_width(model_cfg) else "",
                f"layer_norm_epsilon={eps} (the harness's is {model_cfg.ln_eps})" if eps != model_cfg.ln_eps else "",
                "tie_word_embeddings=false" if config.get("tie_word_embeddings", True) is False else "",
                "scale_attn_weights=false" if config.get("scale_attn_weights", True) is False else "",
                "scale_attn_by_inverse_layer_idx=true" if config.get("scale_attn_by_inverse_layer_idx") else "",
                "add_cross_attention=true" if config.get("add_cross_attention") else ""]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(f"{where} describes a model the harness does not compute: {', '.join(problems)}")


def to_hf(params: dict) -> dict[str, np.ndarray]:
    """The harness's parameters (a pure dict of arrays, ``nnx.to_pure_dict``) as transformers' GPT-2 state dict
    (float32, ``transformer.`` names, no ``lm_head.weight``: tied). See the module docstring for the layouts."""
    out = {"transformer.wte.weight": params["token_embed"], "transformer.wpe.weight": params["pos_embed"],
           "transformer.ln_f.weight": params["ln_f"]["scale"], "transformer.ln_f.bias": params["ln_f"]["bias"]}
    for i, block in params["blocks"].items():
        name = f"transformer.h.{int(i)}."
        for suffix, (module, leaf) in _LAYER.items():
            out[name + suffix] = block[module][leaf]
        qkv = np.asarray(block["attn"]["qkv_kernel"])  # [3, N, D, H]
        out[name + "attn.c_attn.weight"] = qkv.transpose(2, 0, 1, 3).reshape(qkv.shape[2], -1)
        out[name + "attn.c_proj.weight"] = np.asarray(block["attn"]["out_kernel"]).reshape(-1, qkv.shape[2])
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in out.items()}


def hf_shapes(model_cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """{unprefixed HF name: shape} of a GPT-2 of ``model_cfg``'s architecture (``wte`` with its full vocabulary;
    a checkpoint may have fewer rows)."""
    D, F, T = model_cfg.d_model, mlp_width(model_cfg), model_cfg.ctx
    layer = {"ln_1.weight": (D,), "ln_1.bias": (D,), "ln_2.weight": (D,), "ln_2.bias": (D,),
             "attn.c_attn.weight": (D, 3 * D), "attn.c_attn.bias": (3 * D,), "attn.c_proj.weight": (D, D),
             "attn.c_proj.bias": (D,), "mlp.c_fc.weight": (D, F), "mlp.c_fc.bias": (F,),
             "mlp.c_proj.weight": (F, D), "mlp.c_proj.bias": (D,)}
    shapes = {"wte.weight": (model_cfg.vocab_size, D), "wpe.weight": (T, D), "ln_f.weight": (D,), "ln_f.bias": (D,)}
    shapes.update({f"h.{i}.{k}": s for i in range(model_cfg.n_layers) for k, s in layer.items()})
    return shapes


def _strip(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The state dict with unprefixed names (``h.0.ln_1.weight``), without the causal-mask buffers."""
    return {name.removeprefix("transformer."): np.asarray(value, np.float32) for name, value in tensors.items()
            if not name.endswith(_MASK_BUFFERS)}


def _pad_vocab(wte: np.ndarray, vocab: int) -> np.ndarray:
    """``wte`` [V_hf, D] grown to ``vocab`` rows, each new row the mean of the real ones. A new id's logit is
    then h . mean_v(e_v) = mean_v(h . e_v), the mean of the real logits, so by Jensen (exp(mean) <= mean exp)
    the P new ids hold together at most P / V_hf of the real ids' softmax mass (0.09% for 47 rows on GPT-2's
    50257) whatever the hidden state; zero rows would give them logit 0, far above a trained GPT-2's (which are
    large and negative), and most of the probability."""
    if wte.shape[0] == vocab:
        return wte
    extra = np.broadcast_to(wte.mean(0, keepdims=True), (vocab - wte.shape[0], wte.shape[1]))
    return np.concatenate([wte, extra]).astype(np.float32)


def _check_tensors(t: dict[str, np.ndarray], model_cfg: GPTConfig, where: str) -> None:
    """ValueError naming the missing, surplus or misshapen tensors of an unprefixed state dict."""
    want = hf_shapes(model_cfg)
    missing, surplus = sorted(set(want) - set(t)), sorted(set(t) - set(want) - {"lm_head.weight"})
    if missing or surplus:
        raise ValueError(f"{where} does not hold the tensors of a {model_cfg.n_layers}-layer GPT-2: missing "
                         f"{missing[:6]}, unexpected {surplus[:6]}")
    bad = [f"{k} {tuple(t[k].shape)} (expected {s})" for k, s in want.items()
           if tuple(t[k].shape) != s and not (k == "wte.weight" and t[k].shape[1:] == s[1:] and t[k].shape[0] <= s[0])]
    if bad:
        raise ValueError(f"{where} has tensors of the wrong shape: {', '.join(bad[:4])}")
    head = t.get("lm_head.weight")
    if head is not None and not np.array_equal(head, t["wte.weight"]):
        raise ValueError(f"{where} has an lm_head.weight different from wte.weight; the harness's head is tied")


def from_hf(tensors: dict[str, np.ndarray], model_cfg: GPTConfig, where: str = "the checkpoint") -> dict:
    """A transformers GPT-2 state dict (either naming) as the harness's parameters: a pure dict of float32 numpy
    arrays (``nnx.to_pure_dict``'s structure), the vocabulary padded to ``model_cfg.vocab_size``
    (``_pad_vocab``). ValueError naming the missing, surplus or misshapen tensors."""
    t = _strip(tensors)
    _check_tensors(t, model_cfg, where)
    D, N, H = model_cfg.d_model, model_cfg.n_heads, model_cfg.head_dim
    blocks = {}
    for i in range(model_cfg.n_layers):
        name, block = f"h.{i}.", {"ln1": {}, "ln2": {}, "attn": {}, "mlp": {}}
        for suffix, (module, leaf) in _LAYER.items():
            block[module][leaf] = t[name + suffix]
        block["attn"]["qkv_kernel"] = t[name + "attn.c_attn.weight"].reshape(D, 3, N, H).transpose(1, 2, 0, 3)
        block["attn"]["out_kernel"] = t[name + "attn.c_proj.weight"].reshape(N, H, D)
        blocks[i] = block
    params = {"token_embed": _pad_vocab(t["wte.weight"], model_cfg.vocab_size), "pos_embed": t["wpe.weight"],
              "ln_f": {"scale": t["ln_f.weight"], "bias": t["ln_f.bias"]}, "blocks": blocks}
    return _tree_map(np.ascontiguousarray, params)


def _tree_map(fn, tree):
    return {k: _tree_map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


def is_hf_checkpoint(path: str) -> bool:
    """Whether ``path`` is a transformers checkpoint directory: its ``config.json`` names a ``model_type`` (a
    harness workdir's config.json does not; ``check_hf_config`` then refuses other types than gpt2)."""
    config = join(path, CONFIG)
    if not exists(config):
        return False
    try:
        return "model_type" in json.loads(read_text(config))
    except (ValueError, TypeError):
        return False


def read_hf_checkpoint(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json, state dict as float32 numpy) of a transformers checkpoint dir: ``model.safetensors``
    (read without torch), else ``pytorch_model.bin`` (needs torch). Sharded checkpoints are not read."""
    config = json.loads(read_text(join(path, CONFIG)))
    if exists(join(path, SAFETENSORS)):
        from safetensors.numpy import load

        return config, load(read_bytes(join(path, SAFETENSORS)))
    if exists(join(path, TORCH_BIN)):
        import torch

        state = torch.load(io.BytesIO(read_bytes(join(path, TORCH_BIN))), map_location="cpu", weights_only=True)
        return config, {k: v.float().numpy() for k, v in state.items()}
    raise ValueError(f"{path} has a config.json but neither {SAFETENSORS} nor {TORCH_BIN} (a sharded checkpoint's "
                     f"*.index.json is not read): save it with save_pretrained(..., max_shard_size='100GB')")
