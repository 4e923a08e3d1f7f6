"""Every ```python block of README.md runs as written: the names it takes from the reader's code (listed in the
``<!-- placeholders: ... -->`` comment above it) are bound to a tiny model and a sampled batch by
``tests/readme_fixture.py``; a block that cannot run here says why in a ``<!-- not-run: reason -->`` comment."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the README's snippets run on a tiny transformers model (train extra)")

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(?:^<!-- (placeholders|not-run): ?([^\n]*?) -->\n)?^```python\n(.*?)^```", re.S | re.M)
MAX_NOT_RUN = 2


def readme_blocks() -> list[dict]:
    blocks = []
    text = (ROOT / "README.md").read_text()
    for match in BLOCK.finditer(text):
        kind, value, code = match.groups()
        line = text.count("\n", 0, match.start(3))
        blocks.append(dict(line=line, code=code, names=value.split() if kind == "placeholders" else [],
                           not_run=value.strip() if kind == "not-run" else None))
    return blocks


BLOCKS = readme_blocks()


def test_the_readme_has_its_blocks_and_few_are_not_run():
    assert len(BLOCKS) == (ROOT / "README.md").read_text().count("```python")   # each block was found
    not_run = [block for block in BLOCKS if block["not_run"] is not None]
    assert len(not_run) <= MAX_NOT_RUN and all(len(block["not_run"]) > 10 for block in not_run)
    assert len(BLOCKS) - len(not_run) >= 6


@pytest.mark.parametrize("block", [block for block in BLOCKS if block["not_run"] is None],
                         ids=lambda block: f"line{block['line']}")
def test_readme_block_runs_as_written(block, tmp_path):
    for name in block["names"]:                      # a listed placeholder the block does not use is stale
        assert re.search(rf"\b{re.escape(name)}\b", block["code"]), f"{name} is not used in the block"
    request = json.dumps(dict(code=block["code"], names=block["names"], cwd=str(tmp_path)))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "readme_fixture.py")], input=request,
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, f"README.md line {block['line']}:\n{done.stderr[-3000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ran"]
    if "SentenceGRPOTrainer(" in block["code"]:       # what the TRL snippet says the trainer logs
        for key in ("sentence/clip_fraction", "sentence/ratio_mean", "sentence/entropy_mean"):
            assert key in result["logged"], result["logged"]
        assert "sentence/kl_mean" not in result["logged"]          # TRL's default beta is 0


def test_paths_names_and_make_targets_in_the_readme_exist():
    text = (ROOT / "README.md").read_text()
    for link in re.findall(r"\]\(([^)#\s]+)\)", text):
        assert link.startswith("http") or (ROOT / link).exists(), link
    for path in set(re.findall(r"`([\w./-]+/[\w.-]+\.(?:py|md|sh|toml|txt))`", text)):
        assert (ROOT / path).exists() or (ROOT / "sgrpo_kernels" / path).exists(), path
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"`make ([\w-]+)", text)):
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"make {target}"
    # the files the trainer writes, as the README names them, are the names the code writes
    code = "".join(path.read_text() for folder in ("sgrpo_kernels", "sgrpo_kernels_cli")
                   for path in (ROOT / folder).rglob("*.py"))
    for name in set(re.findall(r"`([\w-]+\.(?:png|jsonl|json))`", text)):
        assert f'"{name}"' in code, name
    demo = re.search(r"^DEMO \?= (\S+)", makefile, re.M).group(1)
    written = {f"{demo}/{folder}/" for folder in re.findall(r"--output-dir \$\(DEMO\)/(\w+)", makefile)}
    assert written == {f"{demo}/sft/", f"{demo}/grpo/", f"{demo}/output/"}, written
    for folder in set(re.findall(rf"`({re.escape(demo)}/\w+/)`", text)):
        assert folder in written, (folder, written)


def _markdown_files() -> list[Path]:
    """Every Markdown file of the repository (not of the environment, the data cache or runs)."""
    skip = {".venv", ".git", "runs", "data", "build", ".pytest_cache"}
    return sorted(path for path in ROOT.rglob("*.md") if not skip & set(path.relative_to(ROOT).parts))


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of the headings of ``path``: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+?)\s*$", path.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_every_link_in_the_docs_resolves():
    """Each relative link (and image) of every Markdown file points at a file or folder that exists, and each
    ``#anchor`` at a heading of its target: links survive files moving between folders."""
    files = _markdown_files()
    assert ROOT / "README.md" in files and ROOT / "experiments" / "README.md" in files
    checked, broken = 0, []
    for path in files:
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)       # code blocks hold no links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            checked += 1
            if not resolved.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
    assert checked > 25
