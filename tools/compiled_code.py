"""Read facts off a built Triton kernel (``triton.compile`` output): resources, and what its main loop executes.

Everything here reads the compiled artefact — PTX, the cubin and its SASS (through the ``cuobjdump`` that
Triton ships) for ``cuda`` targets, the AMDGCN assembly for ``hip`` — so the facts are properties of the code
a GPU would run, the same on every machine that builds it, and testable without a GPU:

* :func:`resource_usage`: registers per thread, spills, stack/scratch, shared memory, ``num_warps``;
* :func:`hot_loop`: the loop that loads and computes the most exponentials (the vocabulary loop of passes A and C):
  instructions, exponentials, divisions or reciprocals, and global loads by width, per loop iteration;
* :func:`scalar_widenings`: fp32 → fp64 conversions (in an fp64 kernel: an argument that arrived as fp32).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass


def _nvidia_tool(name: str) -> str:
    from triton.backends.nvidia import compiler as nvidia
    return os.path.join(os.path.dirname(nvidia.__file__), "bin", name)


def _cuobjdump(compiled, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as file:
        file.write(compiled.asm["cubin"])
    try:
        return subprocess.run([_nvidia_tool("cuobjdump"), flag, file.name], check=True, capture_output=True,
                              text=True).stdout
    finally:
        os.unlink(file.name)


def is_cuda(compiled) -> bool:
    return "cubin" in compiled.asm


def sass(compiled) -> str:
    """The SASS of a ``cuda`` build (``cuobjdump -sass``)."""
    return _cuobjdump(compiled, "-sass")


def resource_usage(compiled) -> dict:
    """Registers, spills, shared memory and ``num_warps`` of a built kernel, read from the binary.

    cuda: ``cuobjdump -res-usage`` (registers, stack frame) and the SASS (``STL``/``LDL``: local-memory
    stores and loads, which in these kernels are register spills). hip: the AMDGPU metadata of the
    AMDGCN code object (``.vgpr_count``, ``.sgpr_count``, ``.vgpr_spill_count``, ``.sgpr_spill_count``).
    """
    metadata = compiled.metadata
    usage = {"num_warps": metadata.num_warps, "shared_bytes": metadata.shared}
    if is_cuda(compiled):
        fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", _cuobjdump(compiled, "-res-usage")))
        code = sass(compiled)
        usage |= {"registers": int(fields["REG"]), "sgprs": None, "stack_bytes": int(fields["STACK"]),
                  "spill_stores": len(re.findall(r"\bSTL\b", code)), "spill_loads": len(re.findall(r"\bLDL\b", code))}
    else:
        code = compiled.asm["amdgcn"]

        def field(name):
            return int(re.search(rf"\.{name}:\s+(\d+)", code).group(1))
        usage |= {"registers": field("vgpr_count"), "sgprs": field("sgpr_count"),
                  "stack_bytes": field("private_segment_fixed_size"),
                  "spill_stores": field("vgpr_spill_count") + field("sgpr_spill_count"), "spill_loads": None}
    return usage


@dataclass
class LoopCode:
    """What one iteration of a loop executes (instruction counts, per thread)."""

    instructions: int
    exps: int             # MUFU.EX2 (sm) / v_exp_f32 (gfx)
    divisions: int        # reciprocals, division sequences and calls (fp32 "/" lowers to one of these)
    wide_loads: int       # 128-bit global loads
    narrow_loads: int     # narrower global loads
    fp64_ops: int         # double-precision arithmetic


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_GCN_INSTRUCTION = re.compile(r"^\s+([a-z][a-z0-9_]*)\b(.*)$")


def _sass_loops(code: str) -> list[list[tuple[str, str]]]:
    lines = [(int(match.group(1), 16), match.group(3), match.group(4)) for match in _SASS_LINE.finditer(code)]
    loops = []
    for address, opcode, operands in lines:
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode.startswith("BRA") else None
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            loops.append([(op, rest) for a, op, rest in lines if start <= a <= address])
    return loops


def _gcn_loops(code: str) -> list[list[tuple[str, str]]]:
    lines = code.splitlines()
    labels = {line.split(":")[0]: index for index, line in enumerate(lines) if re.match(r"^\.LBB\w+:", line)}
    loops = []
    for index, line in enumerate(lines):
        match = _GCN_INSTRUCTION.match(line)
        if match and match.group(1).startswith(("s_cbranch", "s_branch")):
            label = match.group(2).strip()
            if labels.get(label, index) < index:
                body = [_GCN_INSTRUCTION.match(text) for text in lines[labels[label]:index + 1]]
                loops.append([(m.group(1), m.group(2)) for m in body if m])
    return loops


def _count(body, pattern: str) -> int:
    return sum(1 for opcode, _ in body if re.fullmatch(pattern, opcode))


def hot_loop(compiled) -> LoopCode | None:
    """The loading loop with the most exponentials (ties: most 128-bit loads, then the longest), or ``None``."""
    if is_cuda(compiled):
        loops, exp, division = _sass_loops(sass(compiled)), r"MUFU\.EX2", r"MUFU\.RCP(64H)?|CALL\..*"
        wide, narrow, fp64 = r"LDG\.E\.128.*", r"LDG\.E(?!\.128).*", r"D(ADD|MUL|FMA)(\..*)?"
    else:
        loops, exp, division = _gcn_loops(compiled.asm["amdgcn"]), r"v_exp_f32.*", r"v_(rcp|div)_\w+|s_swappc\w*"
        wide = r"(global|buffer)_load_dwordx4"
        narrow = r"(global|buffer)_load_(ubyte|sbyte|ushort|sshort|short_d16\w*|dword|dwordx2|dwordx3)"
        fp64 = r"v_(add|mul|fma)_f64.*"
    loops = [body for body in loops if _count(body, wide) + _count(body, narrow)]
    if not loops:
        return None
    # the vocabulary loop: most exponentials; of a main loop and a masked remainder, the one with wide loads
    body = max(loops, key=lambda body: (_count(body, exp), _count(body, wide), len(body)))
    return LoopCode(instructions=len(body), exps=_count(body, exp), divisions=_count(body, division),
                    wide_loads=_count(body, wide), narrow_loads=_count(body, narrow), fp64_ops=_count(body, fp64))


def scalar_widenings(compiled) -> int:
    """fp32 → fp64 conversions in the code: ``cvt.f64.f32`` in the PTX, ``v_cvt_f64_f32`` in the AMDGCN."""
    if is_cuda(compiled):
        return len(re.findall(r"\bcvt\.f64\.f32\b", compiled.asm["ptx"]))
    return len(re.findall(r"\bv_cvt_f64_f32", compiled.asm["amdgcn"]))
