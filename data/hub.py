"""Corpora on the Hugging Face hub: ``hf://datasets/<org>/<name>[@<revision>][/<path in the repo>]``.

Such a corpus is a directory of the dataset repository's snapshot in the local hub cache (``HF_HUB_CACHE``,
default ``~/.cache/huggingface/hub``: ``datasets--<org>--<name>/snapshots/<commit>/...``, the branch's commit
in ``refs/<revision>``), read as any local directory of parquet or jsonl files (``data.corpus``). It is
found with huggingface_hub's ``snapshot_download`` restricted to the path (``allow_patterns``): with the hub
reachable, the files the cache lacks are downloaded into it first (each once, resumable); offline
(``HF_HUB_OFFLINE=1``, or the hub unreachable) the cached snapshot is used as it is. FineWeb's 10B-token sample
is ``hf://datasets/HuggingFaceFW/fineweb/sample/10BT`` (about 30 GB of parquet).
"""
from __future__ import annotations

import os
import re

PREFIX = "hf://datasets/"
_NAME = re.compile(r"^hf://datasets/(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[^/]+))?(?:/(?P<path>.*))?$")


def is_hub_corpus(corpus: str) -> bool:
    return str(corpus).startswith("hf://")


def parse(corpus: str) -> tuple[str, str | None, str]:
    """(repo id, revision or None, path in the repo without slashes at its ends) of a hub corpus name."""
    m = _NAME.match(str(corpus).rstrip("/"))
    if m is None:
        raise ValueError(f"corpus {corpus!r} is not hf://datasets/<org>/<name>[@<revision>][/<path in the repo>] "
                         "(e.g. hf://datasets/HuggingFaceFW/fineweb/sample/10BT)")
    return m["repo"], m["revision"], (m["path"] or "").strip("/")


def local_dir(corpus: str) -> str:
    """The local directory of the hub corpus ``corpus`` (see the module docstring); ValueError with the fix
    when the hub is out of reach and the cache lacks it."""
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError as e:
        raise ValueError(f'corpus {corpus}: hf:// corpora need huggingface_hub ({e}): pip install -e ".[data]"')
    repo, revision, path = parse(corpus)
    patterns = [f"{path}/*", path] if path else None  # (fnmatch: * matches / too)
    offline = constants.HF_HUB_OFFLINE
    try:
        snapshot = huggingface_hub.snapshot_download(repo, repo_type="dataset", revision=revision,
                                                     allow_patterns=patterns, local_files_only=offline)
    except Exception as e:  # noqa: BLE001 - the hub's errors have many types (connection, auth, not found)
        where = "is not in the local Hugging Face cache" if offline else "could not be fetched from the hub"
        raise ValueError(
            f"corpus {corpus} {where} ({type(e).__name__}: {str(e).splitlines()[0].split('. ')[0][:200]}; cache "
            f"{constants.HF_HUB_CACHE}). Fix: with the network, run `hf download {repo} --repo-type dataset"
            f"{f' --include {path}/*' if path else ''}`{' (or unset HF_HUB_OFFLINE)' if offline else ''}, "
            "or copy that cache here") from e
    found = os.path.join(snapshot, path)
    if not os.path.exists(found):
        raise ValueError(f"corpus {corpus}: {path!r} is not in the dataset's snapshot {snapshot} (cache "
                         f"{constants.HF_HUB_CACHE}{', offline' if offline else ''}); check the path in the repo")
    return found
