"""Inspect and convert learned-optimizer weight files.

    python -m optim.weights inspect PATH            # layout, optimizer, parameter count, checksums, tree
    python -m optim.weights convert SRC DST [--layout official|wrapped] [--gen_id ID --step N]

PATH may be a weight file or a directory holding ``theta.state``. Layouts: Celo2 ``theta.state`` has one
("official"); a VeLO file is "official" (the bare tree of learned_optimization's ``HyperV2``), "wrapped"
(learned_optimization's outer-training ``ParameterCheckpoint``: params, gen_id, step) or "legacy" (this
project's files before 2026-11-29, gate Linear under "rnn/~/linear"; read, never written). ``convert``
reads any layout and writes the requested one with the values unchanged (the values checksum stays equal).
Bad input ends with one line and exit code 2.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys

import numpy as np

from infra.files import write_atomic
from optim import theta_io, velo_io
from optim.weight_files import tree_from_bytes


def identify(path) -> dict:
    """{"optimizer", "layout", "theta", "tree" (theta as the file nests it), "file", "bytes"} of the weight file
    at ``path`` (ValueError if its layout is unknown)."""
    file = theta_io.theta_file(path)
    with open(file, "rb") as f:
        buf = f.read()
    tree = tree_from_bytes(buf, str(file), kind="weight")
    out = {"file": str(file), "bytes": buf}
    if isinstance(tree, dict) and set(tree) == {theta_io.TREE_PATH[0]}:
        trained = theta_io.trained_as(path)
        out.update(optimizer="celo2 / celo2-base" if trained is None else f"{trained[0]} ({trained[1]})",
                   layout="official", theta=theta_io.theta_from_tree(tree, str(file)))
        out["tree"] = {theta_io.TREE_PATH[0]: {theta_io.TREE_PATH[1]: out["theta"]}}
        return out
    if isinstance(tree, dict) and ("lstm_init_state" in tree or "params" in tree):
        bare, layout = velo_io.unwrap(tree, str(file))
        sizes = velo_io.velo_sizes(bare, str(file))
        out.update(optimizer=f"velo (param_inits {sizes['param_inits']}, lstm_hidden_size "
                             f"{sizes['lstm_hidden_size']})", layout=layout,
                   theta=velo_io.velo_theta_from_tree(bare, str(file), **sizes))
        out["tree"] = {"params": out["theta"]} if layout == "wrapped" else out["theta"]
        if layout == "wrapped":
            out.update(gen_id=tree.get("gen_id"), step=tree.get("step"))
        return out
    keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
    raise ValueError(f"{file}: unknown weight-file layout (top-level keys {keys}): neither a Celo2 theta.state "
                     "({'ff_mod_stack'}) nor a VeLO file (official, wrapped or legacy layout)")


def _leaves(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", np.asarray(v)


def values_checksum(theta) -> str:
    """sha256 of the arrays in canonical order, as float32: equal for the same weights in any layout."""
    h = hashlib.sha256()
    for name, a in _leaves(theta):
        h.update(name.encode())
        h.update(np.ascontiguousarray(a, np.float32).tobytes())
    return h.hexdigest()[:16]


def inspect(path) -> str:
    info = identify(path)
    leaves = list(_leaves(info["tree"]))
    lines = [f"file        {info['file']} ({len(info['bytes']):,} bytes)",
             f"optimizer   {info['optimizer']}",
             f"layout      {info['layout']}" + (f" (gen_id {info['gen_id']!r}, step {info['step']})"
                                                 if info["layout"] == "wrapped" else ""),
             f"parameters  {sum(a.size for _, a in leaves):,} in {len(leaves)} arrays",
             f"checksums   file sha256 {hashlib.sha256(info['bytes']).hexdigest()[:16]}, values "
             f"{values_checksum(info['theta'])}"]
    width = max(len(n) for n, _ in leaves)
    return "\n".join(lines + [f"  {n:<{width}}  {tuple(a.shape)}  ({math.prod(a.shape):,})" for n, a in leaves])


def convert(src, dst, layout: str = "official", gen_id: str = "", step: int = 0) -> str:
    info = identify(src)
    if info["optimizer"].startswith("velo"):
        buf = velo_io.velo_theta_to_bytes(info["theta"], layout, gen_id, step)
    elif layout != "official":
        raise ValueError(f"Celo2 theta.state has one layout, 'official'; --layout {layout} is for VeLO files")
    else:
        buf = theta_io.theta_to_bytes(info["theta"])
    write_atomic(dst, buf)
    return f"wrote {dst}: {info['layout']} -> {layout}, values {values_checksum(info['theta'])}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m optim.weights", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("inspect", help="describe a weight file").add_argument("path")
    c = sub.add_parser("convert", help="rewrite a weight file in another layout")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--layout", default="official", choices=("official", "wrapped"))
    c.add_argument("--gen_id", default="", help="wrapped layout: the checkpoint's gen_id")
    c.add_argument("--step", type=int, default=0, help="wrapped layout: the checkpoint's step")
    a = p.parse_args(argv)
    try:
        print(inspect(a.path) if a.command == "inspect" else convert(a.src, a.dst, a.layout, a.gen_id, a.step))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
