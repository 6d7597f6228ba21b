"""Inspect and convert learned-optimizer weight files (docs/weight_formats.md#the-weights-command).

    python -m optim.learned.weights inspect PATH   # layout, optimizer, parameter count, checksums, tree
    python -m optim.learned.weights convert SRC DST [--layout official|wrapped] [--gen_id ID --step N]

PATH may be a weight file or a directory holding ``theta.state``. Layouts: Celo2 ``theta.state`` has one
("official"); a VeLO file is "official" (the bare tree of learned_optimization's ``HyperV2``), "wrapped"
(learned_optimization's outer-training ``ParameterCheckpoint``: params, gen_id, step) or "legacy" (this
project's files before 2026-11-29, gate Linear under "rnn/~/linear"; read, never written). ``convert``
reads any layout and writes the requested one with the values unchanged (the values checksum stays equal).
Which formats exist, and which optimizers use each, comes from the optimizer registry (``optim.registry``).
Bad input ends with one line and exit code 2.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys

import numpy as np

from infra.files import write_atomic
from infra.ranges import flag_type
from optim import registry
from optim.learned.celo2_file import theta_file
from optim.learned.msgpack_file import tree_from_bytes


def identify(path) -> dict:
    """The weight file at ``path`` as its format describes it (``FileFormat.describe``: theta, tree, layout,
    optimizer, details, extra), with "format", "file" and "bytes"; ValueError if no format knows it."""
    file = theta_file(path)
    with open(file, "rb") as f:
        buf = f.read()
    tree = tree_from_bytes(buf, str(file), kind="weight")
    for fmt, names in registry.weight_files().items():
        if fmt.detect(tree):
            info = fmt.describe(tree, path, str(file))
            optimizer = info["optimizer"] or " / ".join(names)
            info["optimizer"] = f"{optimizer} ({info['details']})" if info["details"] else optimizer
            return {**info, "format": fmt, "file": str(file), "bytes": buf}
    keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
    kinds = " nor ".join(fmt.kind for fmt in registry.weight_files())
    raise ValueError(f"{file}: unknown weight-file layout (top-level keys {keys}): neither {kinds}")


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
             f"layout      {info['layout']}" + (f" (gen_id {info['extra']['gen_id']!r}, step "
                                                 f"{info['extra']['step']})" if info["extra"] else ""),
             f"parameters  {sum(a.size for _, a in leaves):,} in {len(leaves)} arrays",
             f"checksums   file sha256 {hashlib.sha256(info['bytes']).hexdigest()[:16]}, values "
             f"{values_checksum(info['theta'])}"]
    width = max(len(n) for n, _ in leaves)
    return "\n".join(lines + [f"  {n:<{width}}  {tuple(a.shape)}  ({math.prod(a.shape):,})" for n, a in leaves])


def convert(src, dst, layout: str = "official", gen_id: str = "", step: int = 0) -> str:
    info = identify(src)
    write_atomic(dst, info["format"].encode(info["theta"], layout, gen_id, step))
    return f"wrote {dst}: {info['layout']} -> {layout}, values {values_checksum(info['theta'])}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m optim.learned.weights", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("inspect", help="describe a weight file").add_argument("path")
    c = sub.add_parser("convert", help="rewrite a weight file in another layout")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--layout", default="official", choices=("official", "wrapped"))
    c.add_argument("--gen_id", default="", help="wrapped layout: the checkpoint's gen_id")
    c.add_argument("--step", type=flag_type("int >= 0"), default=0, help="wrapped layout: the checkpoint's step")
    a = p.parse_args(argv)
    try:
        print(inspect(a.path) if a.command == "inspect" else convert(a.src, a.dst, a.layout, a.gen_id, a.step))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
