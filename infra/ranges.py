"""Valid ranges of settings, written as short rules next to each setting's definition (the config schema in
``configs/base.py``, the flags of the commands), and checked before a command writes anything.

A rule is one of:

    int >= 1           int > 0            int in [0, 7]        -1 or int >= 1
    float >= 0         float > 0          float in [0, 1)      float in (0, 1]      (floats are finite)
    one of a|b|c       bool               str                  nonempty str

``check(name, value, rule)`` raises ValueError naming the setting, the value and the range;
``flag_type(rule)`` is the same check as an ``argparse`` type.
"""
from __future__ import annotations

import argparse
import math
import re

_COMPARISON = re.compile(r"^(-1 or )?(int|float) (>=|>) (-?[\d.e+-]+)$")
_INTERVAL = re.compile(r"^(int|float) in ([\[(])(-?[\d.e+-]+), (-?[\d.e+-]+)([\])])$")


def _number(kind: str, value):
    """``value`` as an int (``kind`` "int": no bools, no fractions) or a finite float, else None."""
    if isinstance(value, bool):
        return None
    if kind == "int":
        return value if isinstance(value, int) else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _within(rule: str, value) -> bool:
    """Whether ``value`` satisfies ``rule`` (module docstring); ValueError for a rule that is not one."""
    if m := _COMPARISON.match(rule):
        minus_one, kind, op, bound = m.groups()
        if minus_one and value == -1 and not isinstance(value, bool):
            return True
        x = _number(kind, value)
        return x is not None and (x >= float(bound) if op == ">=" else x > float(bound))
    if m := _INTERVAL.match(rule):
        kind, left, lo, hi, right = m.groups()
        x = _number(kind, value)
        return x is not None and (x >= float(lo) if left == "[" else x > float(lo)) and (
            x <= float(hi) if right == "]" else x < float(hi))
    if rule.startswith("one of "):
        return value in rule[len("one of "):].split("|")
    if rule in ("bool", "str", "nonempty str"):
        kind = bool if rule == "bool" else str
        return isinstance(value, kind) and (rule != "nonempty str" or bool(value.strip()))
    raise ValueError(f"not a range rule: {rule!r}")


def check(name: str, value, rule: str) -> None:
    """ValueError unless ``value`` of the setting ``name`` satisfies ``rule``."""
    if not _within(rule, value):
        shown = "an empty string" if value == "" else repr(value)
        raise ValueError(f"{name}={shown} is out of range: it must be {_described(rule)}")


def _described(rule: str) -> str:
    if rule.startswith("one of "):
        return "one of " + ", ".join(v or "'' (empty)" for v in rule[len("one of "):].split("|"))
    if rule in ("bool", "str"):
        return {"bool": "True or False", "str": "a string"}[rule]
    if rule == "nonempty str":
        return "a non-empty string"
    if rule.startswith("-1 or "):
        return "-1 or " + _described(rule[len("-1 or "):])
    return ("a finite " if "float" in rule else "an ") + rule.replace("float", "number").replace("int", "integer", 1)


def flag_type(rule: str):
    """An ``argparse`` type that parses a number (or string) and checks it against ``rule``."""
    def parse(text: str):
        kind = "int" if re.search(r"\bint\b", rule) else "float" if "float" in rule else "str"
        try:
            value = {"int": int, "float": float, "str": str}[kind](text)
            check("value", value, rule)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} must be {_described(rule)}") from None
        return value

    parse.__name__ = rule  # argparse names the type in its messages
    return parse
