"""Arithmetic in text, evaluated without ``eval``: parse with ``ast`` and walk only numeric nodes."""

from __future__ import annotations

import ast
import math
import operator
import re

# Unicode and full-width operators that appear in English and Chinese solutions.
_NORMALISE = str.maketrans({"×": "*", "÷": "/", "−": "-", "–": "-", "＝": "=", "＋": "+", "－": "-", "＊": "*",
                            "／": "/", "（": "(", "）": ")", "·": "*"})
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPONENT = 64
MAX_LENGTH = 200
_EQUATION = re.compile(r"[\d.\s+\-*/×÷−–＋－＊／()（）^·]+(?:[=＝][\d.\s+\-*/×÷−–＋－＊／()（）^·]+)+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def normalise(expression: str) -> str:
    return expression.translate(_NORMALISE).replace("^", "**").strip()


def safe_eval(expression: str) -> float | None:
    """The value of an arithmetic expression (numbers, + - * / // % **, parentheses), or None.

    Anything else (names, calls, attributes, huge exponents, division by zero) gives None; nothing is
    ever executed.
    """
    text = normalise(expression)
    if not text or len(text) > MAX_LENGTH:
        return None
    try:
        tree = ast.parse(text, mode="eval")
        value = _evaluate(tree.body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None
    return float(value) if value is not None and math.isfinite(value) else None


def _evaluate(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError("exponent too large")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    raise ValueError(f"not arithmetic: {type(node).__name__}")


def _decimals(text: str) -> int:
    numbers = _NUMBER.findall(text)
    return len(numbers[-1].partition(".")[2]) if numbers else 0


def equations(sentence: str) -> list[list[str]]:
    """The arithmetic equations of a sentence (``a = b`` or ``a = b = c``), each as its sides' texts."""
    found = []
    for match in _EQUATION.finditer(sentence):
        sides = [side.strip().rstrip(".").strip() for side in re.split(r"[=＝]", match.group())]
        if len(sides) >= 2 and all(_NUMBER.search(side) for side in sides):
            found.append(sides)
    return found


def equation_holds(sides: list[str]) -> bool | None:
    """True if every side has the same value (up to the rounding of the written result), None if a side
    is not arithmetic (e.g. contains a variable)."""
    values = [safe_eval(side) for side in sides]
    if any(value is None for value in values):
        return None
    tolerance = max(0.5 * 10.0 ** -_decimals(sides[-1]), 1e-9 * max(abs(value) for value in values))
    return all(abs(value - values[-1]) <= tolerance + 1e-12 for value in values)
