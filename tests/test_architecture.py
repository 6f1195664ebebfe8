"""docs/architecture.md and the import-layer contracts that `make lint` checks (``[tool.importlinter]`` in
pyproject.toml) say the same thing, and the code keeps them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def _contracts() -> list[dict]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_the_architecture_doc_lists_every_checked_contract():
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    for contract in _contracts():
        assert f"**{contract['name']}**" in doc, contract["name"]
        if contract["type"] == "layers":
            assert " → ".join(f"`{layer}`" for layer in contract["layers"]) in doc, contract["name"]
        else:
            for module in (*contract["source_modules"], *contract["forbidden_modules"]):
                assert f"`{module}`" in doc, (contract["name"], module)


def test_the_code_keeps_the_import_layers():
    """What `make lint` runs: every contract kept (a broken one prints the offending import chain)."""
    proc = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                                                 "lint_imports_command(['--no-cache'])"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"Contracts: {len(_contracts())} kept, 0 broken" in proc.stdout


#: Libraries whose import is slow or that are optional extras: the only reasons for a function-level import.
HEAVY = {"torch", "torchvision", "diffusers", "transformers", "accelerate", "ray", "cv2", "pyarrow", "segment_anything",
         "torchmetrics", "torch_fidelity", "webdataset", "wids", "datasets", "huggingface_hub", "safetensors",
         "bitsandbytes", "wandb", "mlflow", "requests", "rich", "PIL", "fsspec", "s3fs", "gcsfs", "boto3", "tqdm",
         "tensorboard", "psutil", "numpy", "scipy"}
PACKAGES = ("cnc", "triplets", "pipelines", "cnc_model", "jobs")


def _import_graph():
    """``(modules, top-level internal imports, top-level external packages, function-level imports)`` of the code."""
    import ast

    modules = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    internal, external, lazy = {}, {}, []
    for mod, path in modules.items():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        parts = mod.split(".")
        internal[mod], external[mod] = {".".join(parts[:i]) for i in range(1, len(parts))}, set()

        def visit(node, in_function: bool, type_checking: bool, mod=mod, lines=lines, path=path):
            for child in ast.iter_child_nodes(node):
                fn = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                tc = type_checking or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
                if isinstance(child, (ast.Import, ast.ImportFrom)) and not tc:
                    if isinstance(child, ast.Import):
                        targets = [a.name for a in child.names]
                    elif child.module and child.level == 0:  # `from pkg import sub` imports pkg.sub when a module
                        targets = [f"{child.module}.{a.name}" if f"{child.module}.{a.name}" in modules else child.module
                                   for a in child.names]
                    else:
                        targets = []
                    for target in targets:
                        if fn:
                            lazy.append((path, child.lineno, target, "# lazy:" in lines[child.lineno - 1]))
                        elif target.split(".")[0] in PACKAGES:
                            internal[mod].add(next(m for m in (target, target.rsplit(".", 1)[0]) if m in modules))
                        else:
                            external[mod].add(target.split(".")[0])
                visit(child, fn, tc)

        visit(ast.parse(source), False, False)
    return modules, internal, external, lazy


def test_function_level_imports_only_for_heavy_or_optional_libraries():
    """A function-level import is for a library in HEAVY, or a module of ours that imports one at import time; else
    it belongs at the top of the module (a ``# lazy: <why>`` comment on the line states another reason)."""
    modules, internal, external, lazy = _import_graph()

    def heavy(mod: str) -> bool:
        """Whether importing ``mod`` imports a HEAVY library (through our top-level imports)."""
        seen, todo = set(), [mod]
        while todo:
            m = todo.pop()
            if m in seen:
                continue
            seen.add(m)
            if external[m] & HEAVY:
                return True
            todo += internal[m]
        return False

    offenders = []
    for path, line, target, marked in lazy:
        top = target.split(".")[0]
        if marked:
            continue
        mod = next((m for m in (target, target.rsplit(".", 1)[0]) if m in modules), None)
        if (top in PACKAGES and mod is not None and not heavy(mod)) or (top not in PACKAGES and top not in HEAVY):
            offenders.append(f"{path.relative_to(REPO)}:{line}: {target}")
    assert offenders == []


def test_the_cli_starts_without_heavy_libraries():
    """`cnc --help` stays fast: importing the CLI (every area's commands) loads none of HEAVY."""
    code = ("import sys, cnc.cli; heavy = " + repr(sorted(HEAVY)) +
            "; print(sorted(m for m in heavy if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
