"""The direction types of the paper (Sec. 4) and the one parser of their spec ``--methods fgs,fgv,hc-d:1-9``.

FGS and FGV (Eq. 6), HC-D-k and HC-S-k (Eq. 7, k = the rank of the hot class, 1 = most similar). Every
module that reads or writes a methods spec (the CLI, generation, the Table 1 protocol, the reports, the
PyTorch dataset) parses it here; `Method.name` is the name written to ``metadata.csv``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from hcgen.errors import BadInput

__all__ = ["Method", "PAPER_METHODS", "parse_methods", "method_names", "parse_scales"]

PAPER_METHODS = "fgs,fgv,hc-d:1-9,hc-s:1-9"


@dataclass(frozen=True)
class Method:
    """One direction type: kind in {fgs, fgv, hc-d, hc-s}; k = hot class rank for hot/cold (1 = most similar)."""

    kind: str
    k: int = 0

    @property
    def name(self) -> str:
        return self.kind.upper() if not self.k else f"{self.kind.upper()}-{self.k}"


def parse_methods(spec: str) -> list[Method]:
    """'fgs,fgv,hc-d:1-9,hc-s:1,3' -> methods. Ranges a-b and lists are allowed after ':'."""
    methods: list[Method] = []
    tokens = [t.strip().lower() for t in spec.split(",") if t.strip()]
    current: Optional[str] = None
    for token in tokens:
        if ":" in token:
            current, _, ks = token.partition(":")
        elif token in ("fgs", "fgv"):
            methods.append(Method(token))
            current = None
            continue
        elif current and re.fullmatch(r"\d+(-\d+)?", token):
            ks = token
        else:
            raise BadInput(f"unknown method {token!r}; use fgs, fgv, hc-d:K or hc-s:K (K like 1-9 or 1,3)")
        if current not in ("hc-d", "hc-s"):
            raise BadInput(f"unknown method {current!r}; hot/cold methods are hc-d:K and hc-s:K")
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", ks)
        if not m:
            raise BadInput(f"bad k range {ks!r} in {token!r}; write e.g. hc-d:1-9")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo < 1 or hi < lo:
            raise BadInput(f"bad k range {ks!r}: k starts at 1 (the most similar class)")
        methods.extend(Method(current, k) for k in range(lo, hi + 1))
    if not methods:
        raise BadInput("no methods given; e.g. --methods fgs,fgv,hc-d:1-9,hc-s:1-9")
    if len(set(methods)) != len(methods):
        raise BadInput(f"methods repeat in {spec!r}")
    return methods


def method_names(methods) -> list[str]:
    """Record method names (``["FGS", "HC-D-9"]``) from a spec string or from names given as they are."""
    if isinstance(methods, str):
        return [m.name for m in parse_methods(methods)]
    return [str(m) for m in methods]


def parse_scales(spec: str) -> list[float]:
    """'1.05,1.10' -> hard-positive factors (each > 1); '' -> none."""
    if not spec.strip():
        return []
    try:
        scales = [float(s) for s in spec.split(",")]
    except ValueError:
        raise BadInput(f"--scales must be numbers like 1.05,1.10, got {spec!r}") from None
    if any(not np.isfinite(s) or s <= 1 for s in scales):
        raise BadInput(f"hard-positive scales must be > 1 (paper: 1.05,1.10), got {spec!r}")
    return scales
