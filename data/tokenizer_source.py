"""A pretrained tokenizer named at preparation (``--tokenizer``), checked and stored in the data dir.

``--tokenizer`` takes a sentencepiece ``.model``, a Hugging Face ``tokenizer.json`` (any ``.json``), a
``.tiktoken`` ranks file (local paths or URIs), or a tiktoken encoding name (``gpt2``, fetched by tiktoken or
read from its cache). The data dir gets the file's bytes as ``tokenizer.model`` / ``tokenizer.json`` /
``tokenizer.tiktoken`` (an encoding name as its ranks file), so it is self-contained, and meta.json's
``tokenizer`` entry records the kind, the source, the file's sha256 and the options it loads with (the
end-of-text token; for tiktoken the pattern and special tokens). A tokenizer.json without a known end-of-text
token takes the ``eos_token`` of a ``tokenizer_config.json`` beside it, or ``--eot_token``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from data.tokenizer import KIND_FILES, Tokenizer, kind_of, options_of, tokenizer_class
from infra.files import epath, join, read_bytes, read_text, resolve, write_atomic

TIKTOKEN_SOURCE = "tiktoken:"  # meta.json's source of a tiktoken encoding name: "tiktoken:gpt2"


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A pretrained tokenizer read and checked: ``tokenizer`` is loaded from ``blob``, the file to store."""
    source: str  # a resolved path, or "tiktoken:<name>"
    blob: bytes = dataclasses.field(repr=False)
    tokenizer: Tokenizer

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.blob).hexdigest()

    @property
    def file(self) -> str:
        return KIND_FILES[self.tokenizer.kind]

    def identity(self) -> dict[str, Any]:
        """What the prepared tokens depend on: the file and the options it loads with."""
        return {"sha256": self.sha256, **self.tokenizer.options}

    def install(self, directory: str) -> dict[str, Any]:
        """Writes the tokenizer file into ``directory``; meta.json's ``tokenizer`` entry."""
        write_atomic(join(directory, self.file), self.blob)
        return {"file": self.file, "source": self.source, "sha256": self.sha256, **self.tokenizer.entry()}


def is_encoding_name(spec: str) -> bool:
    """Whether ``spec`` names a tiktoken encoding (and is no file)."""
    if os.sep in spec or "/" in spec or os.path.exists(spec):
        return False
    try:
        import tiktoken
    except ImportError:  # (the "data" extra)
        return False
    return spec in tiktoken.list_encoding_names()


def open_pretrained(spec: str | os.PathLike, eot_token: str | None = None) -> Pretrained:
    """The tokenizer ``spec`` names (see the module docstring), loaded and checked; ValueError (one line) for a
    missing file, an unknown kind, a file that does not parse, or a missing end-of-text token."""
    spec = os.fspath(spec)
    options = {"eot_token": eot_token} if eot_token else {}
    if is_encoding_name(spec):
        from data.tokenizer_tiktoken import encoding_source

        blob, found = encoding_source(spec)
        return _checked(f"{TIKTOKEN_SOURCE}{spec}", blob, "tiktoken", {**found, **options})
    kind = kind_of(spec)
    if not epath(spec).is_file():
        raise ValueError(f"tokenizer {spec} does not exist; give a sentencepiece .model, a tokenizer.json, a "
                         ".tiktoken ranks file or a tiktoken encoding name (gpt2)")
    blob = read_bytes(spec)
    configured = _configured_eot(spec) if kind == "hf" and not eot_token else {}
    if configured:
        try:
            return _checked(resolve(spec), blob, kind, configured)
        except ValueError:
            pass  # its eos_token is no special token of the tokenizer: look for a known one
    return _checked(resolve(spec), blob, kind, options)


def _checked(source: str, blob: bytes, kind: str, options: dict[str, Any]) -> Pretrained:
    tok = tokenizer_class(kind).from_bytes(blob, source, **options)
    tok.options = tok.resolved_options()  # recorded: the end-of-text token whether found or given, ...
    return Pretrained(source, blob, tok)


def _configured_eot(path: str) -> dict[str, Any]:
    """``{"eot_token": ...}`` from the ``eos_token`` of a ``tokenizer_config.json`` beside ``path`` (a Hugging Face
    model's files), if there is one; else ``{}`` (the tokenizer's known end-of-text tokens are looked for)."""
    config = join(os.path.dirname(path), "tokenizer_config.json")
    if not epath(config).is_file():
        return {}
    try:
        eos = json.loads(read_text(config)).get("eos_token")
    except (ValueError, AttributeError):
        return {}
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return {"eot_token": eos} if isinstance(eos, str) and eos else {}


def same_tokenizer(spec: str | os.PathLike, eot_token: str | None, entry: dict[str, Any]) -> bool:
    """Whether meta.json's tokenizer ``entry`` is the tokenizer ``spec`` (with ``eot_token``, if given) would
    store: the same encoding name (tiktoken pins its files by their sha256) or the same file bytes."""
    spec = os.fspath(spec)
    if eot_token and options_of(entry).get("eot_token") != eot_token:
        return False
    if entry.get("source") == f"{TIKTOKEN_SOURCE}{spec}":
        return True
    return open_pretrained(spec, eot_token).sha256 == entry.get("sha256")
