"""The public API: names, metrics, module form, fused-linear form, dtypes."""

import pytest
import torch
from cases import random_case

import sgrpo_kernels as sk
from sgrpo_kernels import reference
from sgrpo_kernels.config import LossConfig


def test_public_names():
    assert set(sk.__all__) == {"sentence_grpo_loss", "fused_linear_sentence_grpo_loss", "token_logprobs",
                               "fused_linear_token_logprobs", "group_sentence_advantages", "SentenceGRPOLoss",
                               "Segmenter", "Segmentation"}


@pytest.mark.parametrize("beta", [0.0, 0.2])
def test_metrics(beta):
    case = random_case(batch=4, length=10, num_slots=5, seed=2, old_spread=0.5)
    loss, metrics = sk.sentence_grpo_loss(*case.values(), beta=beta, return_metrics=True)
    expected_keys = {"clip_fraction", "ratio_mean", "entropy_mean", "num_sentences", "num_tokens"}
    assert set(metrics) == expected_keys | ({"kl_mean"} if beta else set())
    assert all(not value.requires_grad and value.dim() == 0 for value in metrics.values())
    assert metrics["num_tokens"].item() == int((case["segment_ids"] >= 0).sum())
    existing = {(row, segment) for row, ids in enumerate(case["segment_ids"].tolist()) for segment in ids
                if segment >= 0}
    assert metrics["num_sentences"].item() == len(existing)
    assert 0.0 < metrics["clip_fraction"].item() < 1.0     # old_spread 0.5 clips some sentences, not all
    assert metrics["ratio_mean"].item() > 0 and metrics["entropy_mean"].item() > 0
    torch.testing.assert_close(loss, sk.sentence_grpo_loss(*case.values(), beta=beta))


def test_module_equals_function():
    case = random_case(seed=9)
    module = sk.SentenceGRPOLoss(beta=0.1, reduction="token_mean", ratio_level="mean")
    torch.testing.assert_close(module(*case.values()),
                               sk.sentence_grpo_loss(*case.values(), beta=0.1, reduction="token_mean",
                                                     ratio_level="mean"), rtol=0, atol=0)
    assert "token_mean" in repr(module)


def test_fused_linear_equals_materialised_logits_with_gradients():
    generator = torch.Generator().manual_seed(0)
    case = random_case(batch=2, length=6, vocab=11, num_slots=4, seed=4)
    hidden = torch.randn(2, 6, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, generator=generator, dtype=torch.float64, requires_grad=True)
    rest = [case[k] for k in ("completion_ids", "segment_ids", "advantages", "old_logps", "ref_logps")]
    loss = sk.fused_linear_sentence_grpo_loss(hidden, weight, *rest, bias=bias, beta=0.1)
    loss.backward()
    grads = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    expected = reference.sentence_grpo_loss(hidden @ weight.T + bias, *rest, LossConfig(beta=0.1))
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-14, atol=0)
    for grad, t in zip(grads, (hidden, weight, bias)):
        torch.testing.assert_close(grad, t.grad, rtol=1e-12, atol=1e-15)
        assert torch.count_nonzero(grad) > 0
    module_loss = sk.SentenceGRPOLoss(beta=0.1)(hidden=hidden, weight=weight, bias=bias, completion_ids=rest[0],
                                                segment_ids=rest[1], advantages=rest[2], old_logps=rest[3],
                                                ref_logps=rest[4])
    torch.testing.assert_close(module_loss, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_token_logprobs_return_float32(dtype):
    logits = torch.randn(3, 4, 9).to(dtype).requires_grad_()
    ids = torch.randint(0, 9, (3, 4))
    logp, entropy = sk.token_logprobs(logits, ids, return_entropy=True, temperature=0.8)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32 and logp.shape == (3, 4)
    gold = torch.log_softmax(logits.double() / 0.8, -1).gather(-1, ids[..., None])[..., 0]
    tolerance = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(logp.double(), gold, rtol=tolerance, atol=tolerance)
    logp.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == dtype
    hidden, weight = torch.randn(2, 3, 4), torch.randn(9, 4)
    ids = torch.randint(0, 9, (2, 3))
    torch.testing.assert_close(sk.fused_linear_token_logprobs(hidden, weight, ids),
                               sk.token_logprobs(hidden @ weight.T, ids))


def test_bf16_logits_give_float32_loss_close_to_gold():
    case = random_case(batch=3, length=8, vocab=64, seed=6, dtype=torch.bfloat16)
    loss = sk.sentence_grpo_loss(*case.values(), beta=0.1)
    gold_case = dict(case, logits=case["logits"].detach().double(), old_logps=case["old_logps"].double(),
                     ref_logps=case["ref_logps"].double(), advantages=case["advantages"].double())
    gold = sk.sentence_grpo_loss(*gold_case.values(), beta=0.1)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - gold.item()) < 0.05 * max(abs(gold.item()), 1e-3)


def test_auto_backend_runs_and_equals_reference():
    case = random_case(seed=10)
    torch.testing.assert_close(sk.sentence_grpo_loss(*case.values(), backend="auto"),
                               sk.sentence_grpo_loss(*case.values(), backend="reference"), rtol=1e-12, atol=0)


def test_one_version_from_the_package_metadata():
    import importlib.metadata
    import pathlib
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    pyproject = pathlib.Path(__file__).parents[1] / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]
    assert sk.__version__ == importlib.metadata.version("sgrpo-kernels") == declared


# The packages whose import graph must have no circle (together: the command line spans both; tests/test_cli.py holds
# its three layers to their one-way arrows).
CIRCLE_FREE_PACKAGES = ("sgrpo_kernels", "sgrpo_kernels_cli")


def package_imports(root, packages) -> dict[str, dict[str, int]]:
    """The import graph of ``packages`` (directories under ``root``): each module's dotted name → the modules of
    those packages it imports, each with the line of the import, at module level, inside functions or anywhere
    else. ``from package import name`` points at the submodule ``package.name`` when there is one, else at
    ``package`` itself (its ``__init__``); relative imports are resolved against the importing module."""
    import ast

    files = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges = graph[module] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target not in files and "." in target:     # import a.b.c of a module a.b: the module
                    target = target.rpartition(".")[0]
                if target in files and target != module:
                    edges.setdefault(target, node.lineno)
    return graph


def import_circles(graph: dict[str, dict]) -> list[list[str]]:
    """The circles of an import graph: its strongly connected components of two or more modules (sorted)."""
    order, lowest, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(module):
        order[module] = lowest[module] = len(order)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in order:
                visit(target)
                lowest[module] = min(lowest[module], lowest[target])
            elif target in on_stack:
                lowest[module] = min(lowest[module], order[target])
        if lowest[module] == order[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                circles.append(sorted(component))

    for module in graph:
        if module not in order:
            visit(module)
    return circles


def test_the_package_has_no_import_circle():
    """Every import of every module of the package (module-level and inside functions) points one way: a circle,
    even one that a function-level import keeps from failing at import time, fails here with its arrows."""
    import pathlib

    root = pathlib.Path(sk.__file__).resolve().parents[1]
    graph = package_imports(root, CIRCLE_FREE_PACKAGES)
    assert "sgrpo_kernels.ops.driver" in graph["sgrpo_kernels.ops.custom_ops"]     # the scan sees the imports
    assert "sgrpo_kernels.ops.library" in graph["sgrpo_kernels.ops.driver"]
    circles = import_circles(graph)
    arrows = [f"{module} -> {target} (line {line})" for circle in circles for module in circle
              for target, line in graph[module].items() if target in circle]
    assert not circles, "import circles:\n" + "\n".join(arrows)


def design_layers() -> list[tuple[str, list[str]]]:
    """docs/design.md's "Import layers" table: ``(layer, [dotted module prefixes])``, lowest layer first."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text()
    table = text.split("### Import layers", 1)[1].split("\n\n|", 1)[1].split("\n\n", 1)[0]
    layers = []
    for row in table.splitlines()[2:]:
        layer, modules = [cell.strip() for cell in row.strip("|").split("|")[:2]]
        names = [name.split(" ")[0] for name in re.findall(r"`([\w.]+)`", modules)]
        layers.append((layer, [name if name.startswith("sgrpo_kernels") else f"sgrpo_kernels.{name}"
                               for name in names]))
    return layers


def layer_of(module: str, layers) -> int | None:
    """The index of the layer whose longest prefix names ``module`` (``None``: no layer names it)."""
    best = None
    for index, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    return None if best is None else best[0]


def test_every_import_points_down_the_layers_of_the_design():
    """Each module of the package lies in a layer of docs/design.md ("Import layers"), and each of its imports
    (module-level or inside a function) reaches its own layer or a lower one: the reference and the kernels never
    import the public functions, the trainers never the command line, the rewards never the trainer."""
    import pathlib

    layers = design_layers()
    assert [layer.split(" ")[0] for layer, _ in layers] == [str(index) for index in range(len(layers))]
    root = pathlib.Path(sk.__file__).resolve().parents[1]
    graph = package_imports(root, CIRCLE_FREE_PACKAGES)
    unplaced = sorted(module for module in graph if layer_of(module, layers) is None)
    assert not unplaced, f"modules in no layer of docs/design.md: {unplaced}"
    upward = [f"{module} (layer {layer_of(module, layers)}) -> {target} (layer {layer_of(target, layers)}), line {line}"
              for module, targets in graph.items() for target, line in targets.items()
              if layer_of(target, layers) > layer_of(module, layers)]
    assert not upward, "imports up the layers:\n" + "\n".join(upward)
    assert layer_of("sgrpo_kernels.reference", layers) == layer_of("sgrpo_kernels.ops.driver", layers) == 1
    assert layer_of("sgrpo_kernels.loss", layers) == 2 and layer_of("sgrpo_kernels.cli.front", layers) == 5


def test_no_module_below_the_public_functions_imports_the_reference():
    """reference.py is the oracle the tests compare every backend with: nothing under ops/ or integrations/ imports
    it, so the pieces the backends share (ops/sentence_math.py) are an independent statement."""
    import pathlib

    graph = package_imports(pathlib.Path(sk.__file__).resolve().parents[1], CIRCLE_FREE_PACKAGES)
    importers = sorted(module for module, targets in graph.items() if "sgrpo_kernels.reference" in targets)
    assert importers and not [module for module in importers
                              if module.startswith(("sgrpo_kernels.ops", "sgrpo_kernels.integrations"))], importers


def test_the_import_scan_finds_a_circle_closed_inside_a_function(tmp_path):
    """The scan resolves relative and ``from package import module`` imports, and counts a function-level import."""
    package = tmp_path / "toy"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from . import low\n")
    (package / "low.py").write_text("import os\n\ndef late():\n    from .sub import high\n    return high\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "high.py").write_text("from ..low import late\nfrom toy import sub\n")
    graph = package_imports(tmp_path, ("toy",))
    assert graph == {"toy": {"toy.low": 1}, "toy.low": {"toy.sub.high": 4}, "toy.sub": {},
                     "toy.sub.high": {"toy.low": 1, "toy.sub": 2}}
    assert import_circles(graph) == [["toy.low", "toy.sub.high"]]
    (package / "low.py").write_text("import os\n")
    assert import_circles(package_imports(tmp_path, ("toy",))) == []
