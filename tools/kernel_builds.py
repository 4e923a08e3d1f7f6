"""Build the package's Triton kernels with the real Triton compiler for real GPU targets, without a GPU.

The Triton interpreter (``TRITON_INTERPRET=1``, how the tests run kernels on the CPU) proves numerics only: it
accepts code that the compiler rejects. This module closes that gap:

1. :func:`recorded_launches` records every launch of every ``@triton.jit`` kernel of the package as a
   :class:`Launch` (argument types, alignment and integer values, constexprs, ``num_warps``), optionally
   without running the kernel (``execute=False``: a dry run, which also works on ``meta`` tensors).
2. :func:`expand` adds, for each recorded launch, every launch configuration the launcher's own choice
   function can pick (each kernel module's ``launch_choices()``) and a variant whose integer arguments
   need 64 bits (strides past ``2**31``).
3. :func:`build` compiles a launch for a target exactly as a launch on that GPU would: Triton's own binder
   computes the specialisation (pointer types, 16-byte alignment, integers equal to 1 or divisible by 16),
   then ``triton.compile`` builds PTX/cubin (``cuda``) or AMDGCN/hsaco (``hip``).
   ``compiled_code.py`` reads registers, spills, shared memory and the main loop's code off the binary.

Building needs a process without ``TRITON_INTERPRET=1`` (the interpreter replaces ``triton.jit``);
``python -m tools.kernel_builds LAUNCHES.json`` builds a recorded set in worker processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import inspect
import json
import os
import pkgutil
import re
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import compiled_code

TARGETS = {"sm80": ("cuda", 80, 32), "sm90": ("cuda", 90, 32), "gfx942": ("hip", "gfx942", 64)}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")
WIDE = 2**32     # added to an integer argument: it then needs int64 and keeps its divisibility by 16


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------------------------
# Finding the kernels


def _kernel_modules() -> list[str]:
    """Names of the package's modules that define a kernel (a line starting with ``@triton.jit``)."""
    import sgrpo_kernels
    names = []
    for module in pkgutil.walk_packages(sgrpo_kernels.__path__, "sgrpo_kernels."):
        spec = importlib.util.find_spec(module.name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        with open(spec.origin, encoding="utf-8") as source:
            if re.search(r"^@triton\.jit", source.read(), re.MULTILINE):
                names.append(module.name)
    return sorted(names)


def package_kernels() -> dict[str, object]:
    """Every ``@triton.jit`` function defined in the package, by ``"module:name"`` (kernels and jit helpers)."""
    from triton.runtime.jit import KernelInterface
    kernels = {}
    for name in _kernel_modules():
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            if isinstance(value, KernelInterface) and getattr(value.fn, "__module__", None) == name:
                kernels[f"{name}:{attribute}"] = value
    return kernels


def launch_choices() -> dict[str, list[dict]]:
    """``"module:kernel" -> [launch configuration, ...]`` from each kernel module's ``launch_choices()``."""
    choices = {}
    for name in _kernel_modules():
        module = importlib.import_module(name)
        if hasattr(module, "launch_choices"):
            for kernel, configs in module.launch_choices().items():
                choices[f"{name}:{kernel}"] = configs
    return choices


# ---------------------------------------------------------------------------------------------------------------
# Launch records


def describe(value):
    """A JSON-able description of a kernel argument that keeps what Triton specialises on."""
    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype).removeprefix("torch."), value.data_ptr() % 16 == 0]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", value]
    if value is None:
        return ["none"]
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}: {value!r}")


_signature = functools.cache(inspect.signature)     # a recorded run launches the same few kernels thousands of times


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel`` is ``"module:name"``; ``arguments`` are ``(parameter, description)`` pairs in
    signature order; ``options`` are ``(name, value)`` pairs such as ``num_warps``."""

    kernel: str
    arguments: tuple
    options: tuple

    @classmethod
    def of(cls, kernel: str, fn, args, kwargs) -> Launch:
        options = {name: kwargs.pop(name) for name in list(kwargs) if name in LAUNCH_OPTIONS}
        bound = _signature(fn).bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = tuple((name, tuple(describe(value))) for name, value in bound.arguments.items())
        return cls(kernel, arguments, tuple(sorted(options.items())))

    def replace(self, values: dict) -> Launch:
        """The same launch with some arguments (given as plain values) or options replaced."""
        arguments = tuple((name, tuple(describe(values[name])) if name in values else description)
                          for name, description in self.arguments)
        options = dict(self.options) | {name: value for name, value in values.items() if name in LAUNCH_OPTIONS}
        return Launch(self.kernel, arguments, tuple(sorted(options.items())))

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "arguments": [[name, list(d)] for name, d in self.arguments],
                "options": dict(self.options)}

    @classmethod
    def from_json(cls, data: dict) -> Launch:
        return cls(data["kernel"], tuple((name, tuple(d)) for name, d in data["arguments"]),
                   tuple(sorted(data["options"].items())))

    def label(self, pointers: bool = True) -> str:
        """Short text: the kernel's pointer dtypes (only the first with ``pointers=False``), its constexpr-like
        (upper-case) arguments and its launch options."""
        parts = []
        for name, description in self.arguments:
            if description[0] == "tensor" and (pointers or not parts):
                parts.append(f"{name.removesuffix('_ptr')}={description[1]}")
            elif name.isupper():
                parts.append(f"{name}={description[1] if len(description) > 1 else None}")
        parts += [f"{name}={value}" for name, value in self.options]
        return f"{self.kernel.split(':')[1]}({', '.join(parts)})" if pointers else ", ".join(parts)


@contextmanager
def recorded_launches(*, execute: bool = True):
    """Record every launch of the package's kernels into the yielded set of :class:`Launch`.

    ``execute=False`` skips the kernels themselves (outputs stay unwritten): enough to learn what a call of
    the public API launches, fast, and possible on ``meta`` tensors or without a GPU.
    """
    launches: set[Launch] = set()
    patched = []
    for name, kernel in package_kernels().items():
        previous = vars(kernel).get("run")     # a recorder already in place (nested recording)
        original = kernel.run

        def run(*args, grid, warmup, _name=name, _kernel=kernel, _original=original, **kwargs):
            launches.add(Launch.of(_name, _kernel.fn, args, dict(kwargs)))
            if execute:
                return _original(*args, grid=grid, warmup=warmup, **kwargs)
            return None

        kernel.run = run      # KernelInterface.__getitem__ calls self.run: the instance attribute wins
        patched.append((kernel, previous))
    try:
        yield launches
    finally:
        for kernel, previous in patched:
            if previous is None:
                del kernel.run
            else:
                kernel.run = previous


def expand(launches: Iterable[Launch]) -> set[Launch]:
    """The launches, plus for each kind of launch (kernel, pointer dtypes, flags) one representative with every
    launch configuration its launcher can choose and one with 64-bit integer arguments."""
    choices = launch_choices()
    launches = set(launches)
    representatives = {}
    for launch in sorted(launches, key=_sort_key):
        representatives.setdefault(_kind(launch, choices.get(launch.kernel, ())), launch)
    expanded = set(launches)
    for launch in representatives.values():
        expanded.update(launch.replace(config) for config in choices.get(launch.kernel, ()))
        expanded.add(widened(launch))
    return expanded


def _kind(launch: Launch, configs: list[dict]) -> tuple:
    """What a launch is apart from its integer values, pointer alignment and launch configuration."""
    chosen = {name for config in configs for name in config}
    arguments = tuple((name, description[:2] if description[0] == "tensor" else description[0])
                      if description[0] in ("tensor", "int") else (name, description)
                      for name, description in launch.arguments if name not in chosen)
    return launch.kernel, arguments, tuple(item for item in launch.options if item[0] not in chosen)


def widened(launch: Launch) -> Launch:
    """The launch with every integer argument other than 1 moved past ``2**31`` (same divisibility by 16)."""
    values = {name: description[1] + (WIDE if description[1] >= 0 else -WIDE)
              for name, description in launch.arguments
              if description[0] == "int" and description[1] != 1 and not name.isupper()}
    return launch.replace(values) if values else launch


def save_launches(launches: Iterable[Launch], path: str) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump([launch.to_json() for launch in sorted(launches, key=_sort_key)], file)


def load_launches(path: str) -> list[Launch]:
    with open(path, encoding="utf-8") as file:
        return [Launch.from_json(item) for item in json.load(file)]


def _sort_key(launch: Launch):
    return (launch.kernel, json.dumps(launch.to_json(), sort_keys=True))


# ---------------------------------------------------------------------------------------------------------------
# Building


class _MockTensor:
    """What Triton's binder reads of a tensor argument: its dtype and the alignment of its address."""

    def __init__(self, dtype: torch.dtype, aligned: bool):
        self.dtype = dtype
        self._address = 0 if aligned else 4

    def data_ptr(self) -> int:
        return self._address


def _value(description):
    kind = description[0]
    if kind == "tensor":
        return _MockTensor(getattr(torch, description[1]), description[2])
    if kind == "none":
        return None
    return description[1]


@functools.lru_cache(maxsize=None)
def _target(name: str):
    from triton.backends.compiler import GPUTarget
    return GPUTarget(*TARGETS[name])


@functools.lru_cache(maxsize=None)
def _binder(kernel_name: str, target_name: str):
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    module, attribute = kernel_name.split(":")
    kernel = getattr(importlib.import_module(module), attribute)
    backend = make_backend(_target(target_name))
    return kernel, backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def specialisation(launch: Launch, target_name: str):
    """``(kernel, source, options)``: the ``ASTSource`` and compile options a real launch on the target would use."""
    from triton import knobs
    from triton.compiler import ASTSource
    if _interpreting():
        raise RuntimeError("building kernels needs a process without TRITON_INTERPRET=1 (the interpreter "
                           "replaces triton.jit); run `python -m tools.kernel_builds` instead")
    kernel, backend, binder = _binder(launch.kernel, target_name)
    arguments = {name: _value(description) for name, description in launch.arguments}
    kwargs = dict(launch.options)
    # the options JITFunction.run adds before binding
    kwargs["debug"] = kernel.debug or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound, specialization, options = binder(**arguments, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return kernel, ASTSource(kernel, signature, constexprs, attrs), options


def build(launch: Launch, target_name: str):
    """Compile ``launch`` for ``target_name`` (a key of ``TARGETS``); returns Triton's ``CompiledKernel``."""
    import triton
    _, source, options = specialisation(launch, target_name)
    return triton.compile(source, target=_target(target_name), options=options.__dict__)


def _build_one(job) -> dict:
    """Worker: build one (launch, target); never raises, reports the error instead."""
    launch_json, target_name, with_resources = job
    launch = Launch.from_json(launch_json)
    result = {"kernel": launch.kernel, "label": launch.label(), "target": target_name, "launch": launch_json}
    start = time.perf_counter()
    try:
        compiled = build(launch, target_name)
        if with_resources:
            result["resources"] = compiled_code.resource_usage(compiled)
            loop = compiled_code.hot_loop(compiled)
            result["loop"] = None if loop is None else dataclasses.asdict(loop)
            result["fp64_widenings"] = compiled_code.scalar_widenings(compiled)
        result["ok"] = True
    except Exception as error:   # noqa: BLE001 - every failure is reported with its kernel and target
        result["ok"] = False
        result["error"] = f"{type(error).__name__}: {error}"
    result["seconds"] = time.perf_counter() - start
    return result


def _specialisation_key(launch: Launch, target_name: str):
    _, source, options = specialisation(launch, target_name)
    return (launch.kernel, target_name, source.hash(), options.hash())


def build_all(launches: Iterable[Launch], targets: Iterable[str], *, jobs: int = 2, with_resources: bool = False,
              progress: bool = False) -> list[dict]:
    """Build every distinct specialisation of ``launches`` for each target, in ``jobs`` worker processes.

    Launches that Triton would compile to the same binary (same source hash and options) are built once.
    Returns one result dict per build: ``kernel``, ``label``, ``target``, ``ok``, ``error``, ``seconds``,
    with ``with_resources`` also ``resources``, ``loop`` and ``fp64_widenings`` (see ``compiled_code.py``),
    ``launch`` (the first launch of that binary) and ``launches`` (all).
    """
    unique: dict[tuple, list[Launch]] = {}
    for launch in sorted(set(launches), key=_sort_key):
        for target_name in targets:
            unique.setdefault(_specialisation_key(launch, target_name), []).append(launch)
    work = [(same[0].to_json(), key[1], with_resources) for key, same in unique.items()]
    if jobs <= 1:
        results = map(_build_one, work)
    else:
        pool = ProcessPoolExecutor(max_workers=jobs)
        results = pool.map(_build_one, work, chunksize=4)
    if progress:
        from tqdm import tqdm
        results = tqdm(results, total=len(work), desc="building kernels", unit="build")
    try:
        results = list(results)
    finally:
        if jobs > 1:
            pool.shutdown()
    for result, same in zip(results, unique.values()):
        result["launches"] = [launch.to_json() for launch in same]
    return results


def unbuilt_kernels(built_kernels: Iterable[str]) -> list[str]:
    """Package jit functions that are neither a built kernel nor called (directly or not) by one."""
    kernels = package_kernels()
    reached = set(built_kernels) & kernels.keys()
    sources = {name: inspect.getsource(kernel.fn) for name, kernel in kernels.items()}
    changed = True
    while changed:
        changed = False
        for name in kernels.keys() - reached:
            function = name.split(":")[1]
            if any(kernels[caller].fn.__globals__.get(function) is kernels[name]
                   and re.search(rf"\b{function}\s*\(", sources[caller]) for caller in reached):
                reached.add(name)
                changed = True
    return sorted(kernels.keys() - reached)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.kernel_builds",
        description="Build recorded launches of the package's Triton kernels for real GPU targets (no GPU needed).")
    parser.add_argument("launches", help="JSON file of recorded launches (see recorded_launches / save_launches)")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--resources", action="store_true", help="also read registers, spills, shared memory")
    parser.add_argument("--results", help="write every build result to this JSON file")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    args = parser.parse_args(argv)
    if _interpreting():
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    launches = load_launches(args.launches)
    start = time.perf_counter()
    results = build_all(launches, args.targets, jobs=args.jobs, with_resources=args.resources,
                        progress=args.progress)
    failures = [result for result in results if not result["ok"]]
    unbuilt = unbuilt_kernels(result["kernel"] for result in results if result["ok"])
    if args.results:
        with open(args.results, "w", encoding="utf-8") as file:
            json.dump({"results": results, "unbuilt": unbuilt}, file)
    print(f"{len(launches)} launches -> {len(results)} builds for {', '.join(args.targets)} in "
          f"{time.perf_counter() - start:.0f} s: {len(results) - len(failures)} built, {len(failures)} failed")
    for failure in failures:
        print(f"FAILED {failure['target']} {failure['label']}\n    {failure['error'][:2000]}")
    for name in unbuilt:
        print(f"NEVER BUILT {name}: no recorded launch reaches it")
    return 1 if failures or unbuilt else 0


if __name__ == "__main__":
    sys.exit(main())
