"""The repository's layout does not leak into Python's import namespace.

The checkout's root is on sys.path under `python -m pytest` and in a REPL started there, and
benchmarks/ is when a script in it runs. A module or package there named like an installed one
shadows it: a `kernels` package at the root broke `import transformers` once transformers 5.25
began importing Hugging Face's `kernels` library.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Optional imports of our dependencies that may not be installed here but are on a user's machine.
OPTIONALLY_IMPORTED = {"kernels", "flash_attn", "optimum", "gptqmodel", "auto_gptq", "vllm", "llama_cpp", "onnx"}


def _importable_names(folder: Path) -> set[str]:
    """Names `import NAME` resolves inside `folder`: modules and regular packages (namespace
    folders lose to an installed package, so they cannot shadow one)."""
    names = {p.stem for p in folder.glob("*.py")}
    names |= {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    return names


@pytest.mark.parametrize("folder", [ROOT, ROOT / "benchmarks"], ids=["root", "benchmarks"])
def test_no_module_in_the_checkout_shadows_an_installed_one(folder):
    installed = set(importlib.metadata.packages_distributions()) - {"compressor"}
    clashes = sorted(_importable_names(folder) & (installed | OPTIONALLY_IMPORTED | set(sys.stdlib_module_names)))
    assert not clashes, f"{folder.relative_to(ROOT.parent)} shadows installed modules: {clashes}"


def test_transformers_imports_from_the_checkout_root():
    code = "import transformers; from transformers import LlamaForCausalLM; import compressor.kernels.build"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_wheel_installs_everything_under_compressor_with_the_kernel_sources(tmp_path):
    """A non-editable install must carry the C/CUDA sources that compressor.kernels.build compiles."""
    source = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "pyproject.toml", "README.md", "compressor", "evaluation", "kernels"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    if not tracked:
        pytest.skip("not a git checkout")
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((ROOT / name).read_bytes())
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("compressor-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"compressor"}
    sources = sorted(p.name for p in (ROOT / "kernels").iterdir() if p.suffix in (".c", ".cu", ".h"))
    assert sources and all(f"compressor/kernels/csrc/{s}" in names for s in sources)
    assert "compressor/kernels/build.py" in names and "compressor/evaluation/perplexity.py" in names
    # every tracked module of the package (a subpackage missing from pyproject's list would vanish)
    modules = [n for n in tracked if n.startswith("compressor/") and n.endswith(".py")]
    assert modules and not [m for m in modules if m not in names]


# The layers of ARCHITECTURE.md, checked on the source: package -> the compressor packages it may import.
# A package not listed here may import anything below the orchestration layer (pipeline, cli, ...).
MAY_IMPORT = {
    "algorithms": set(),
    "errors": set(),
    "packing": {"algorithms"},
    "artifacts": {"errors", "packing"},
    "kernels": {"packing"},
    "export": {"algorithms", "architectures", "artifacts", "engine", "errors", "lazy", "packing"},
    "runtime": {"algorithms", "architectures", "artifacts", "errors", "kernels", "lazy", "packing"},
}
ORCHESTRATION = {"pipeline", "blockwise", "cli", "sweep", "hub", "describe"}


def _package_imports() -> dict[str, set[str]]:
    """compressor package/module -> the compressor packages/modules it imports (lazy imports count)."""
    import ast

    edges: dict[str, set[str]] = {}
    for path in (ROOT / "compressor").rglob("*.py"):
        a = path.relative_to(ROOT / "compressor").with_suffix("").parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [n.name for n in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module == "compressor":  # from compressor import runtime
                names = [f"compressor.{n.name}" for n in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                names = []
            for name in names:
                parts = name.split(".")
                is_module = len(parts) > 1 and ((ROOT / "compressor" / parts[1]).is_dir() or (ROOT / "compressor" / f"{parts[1]}.py").is_file())
                if parts[0] == "compressor" and is_module and parts[1] != a:
                    edges.setdefault(a, set()).add(parts[1])
    return edges


def test_packages_import_only_their_layers():
    edges = _package_imports()
    wrong = {a: sorted(edges.get(a, set()) - allowed) for a, allowed in MAY_IMPORT.items() if edges.get(a, set()) - allowed}
    assert not wrong, f"imports across layers (see ARCHITECTURE.md): {wrong}"
    upward = {a: sorted(bs & ORCHESTRATION) for a, bs in edges.items() if a not in ORCHESTRATION and bs & ORCHESTRATION}
    assert not upward, f"only the orchestration modules import pipeline/blockwise/cli/sweep: {upward}"
    # The recipe composes the stage table (compressor.stages) and the sections' options models:
    # only the orchestration imports it, so no algorithm, stage or loader depends on the schema.
    schema_users = sorted(a for a, bs in edges.items() if "recipe" in bs and a not in ORCHESTRATION)
    assert not schema_users, f"only the orchestration modules import compressor.recipe: {schema_users}"


def test_no_import_cycles_between_packages():
    edges = _package_imports()
    reach = {a: set(bs) for a, bs in edges.items()}
    changed = True
    while changed:
        changed = False
        for a in reach:
            more = set().union(*(reach.get(b, set()) for b in reach[a])) - reach[a]
            if more:
                reach[a] |= more
                changed = True
    cycles = sorted({tuple(sorted((a, b))) for a in reach for b in reach[a] if a in reach.get(b, set())})
    assert not cycles, f"package import cycles: {cycles}"
