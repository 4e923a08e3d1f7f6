"""Covering arrays: a few option combinations that together hold every combination of the values of any
``strength`` options (all pairs at strength 2, all triples at 3), instead of the full product of all options.

A test whose code paths are each decided by at most ``strength`` of its options reaches every path with a
covering array of that strength; a failure that needs a particular combination of more options than that is what
it gives up (see where each test uses it for why that cannot change which kernel runs)."""

from __future__ import annotations

import functools
import itertools

import numpy as np


def covering_array(factors: dict, strength: int, crossed: tuple = ()) -> list[dict]:
    """Rows ``{name: value}`` of the full product of ``factors`` (``{name: [values]}``), picked greedily (each
    time the row that holds the most combinations not yet held) until every combination of the values of any
    ``strength`` factors is held, and every combination of the factors named in ``crossed`` (their full
    product). Deterministic: the same arguments give the same rows."""
    names = list(factors)
    groups = set(itertools.combinations(range(len(names)), min(strength, len(names))))
    if crossed:
        groups.add(tuple(sorted(names.index(name) for name in crossed)))
    rows = _covering_rows(tuple(len(factors[name]) for name in names), tuple(sorted(groups)))
    return [{name: factors[name][index] for name, index in zip(names, row)} for row in rows]


@functools.cache
def _covering_rows(sizes: tuple, groups: tuple) -> list[tuple]:
    candidates = np.array(list(itertools.product(*(range(size) for size in sizes))), dtype=np.int64)
    # one column per (group of factors, combination of their values): which candidates hold it
    columns, offset = [], 0
    for group in groups:
        index = np.zeros(len(candidates), dtype=np.int64)
        for factor in group:
            index = index * sizes[factor] + candidates[:, factor]
        columns.append(offset + index)
        offset += int(np.prod([sizes[factor] for factor in group]))
    holds = np.zeros((len(candidates), offset), dtype=bool)
    for column in columns:
        holds[np.arange(len(candidates)), column] = True
    uncovered = np.ones(offset, dtype=bool)
    chosen = []
    while uncovered.any():
        best = int(np.argmax(holds[:, uncovered].sum(axis=1)))
        chosen.append(tuple(int(value) for value in candidates[best]))
        uncovered &= ~holds[best]
    return chosen


def holds_every_combination(rows: list[dict], factors: dict, group: tuple) -> bool:
    """Whether ``rows`` hold every combination of the values of the factors named in ``group``."""
    held = {tuple(repr(row[name]) for name in group) for row in rows}
    return len(held) == int(np.prod([len(factors[name]) for name in group]))
