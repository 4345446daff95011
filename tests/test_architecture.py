"""The layout's promises (docs/architecture.md): imports point down only, nothing in the package
needs the repository around it, and the tree is clean under the project's formatter and linter."""

import ast
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest
from absl.testing import absltest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vgg_jax"

# Each part of the package and its level: a module may import its own part and lower levels only.
LEVELS = {
    "vgg_jax.configs": 0,
    "vgg_jax.conventions": 0,
    "vgg_jax.metrics": 0,
    "vgg_jax.modes": 0,
    "vgg_jax.host": 0,
    "vgg_jax.models": 1,
    "vgg_jax.sharding": 1,
    "vgg_jax.preemption": 1,
    "vgg_jax.checkpoint": 1,
    "vgg_jax.compile_cache": 1,
    "vgg_jax.conv_lowering": 1,
    "vgg_jax.xla_options": 1,
    "vgg_jax.writers": 1,
    "vgg_jax.data": 2,
    "vgg_jax.weights": 3,
    "vgg_jax.processes": 3,
    "vgg_jax.evaluation": 4,
    "vgg_jax.training": 5,
    "vgg_jax.features": 6,
    "vgg_jax.study": 6,
    "vgg_jax.checks": 7,
    "vgg_jax.tools": 8,
}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def part_of(module: str) -> str:
    """The longest ``LEVELS`` key that ``module`` is or is inside of."""
    matches = [p for p in LEVELS if module == p or module.startswith(p + ".")]
    if not matches:
        raise AssertionError(f"{module} belongs to no part; add it to LEVELS and the docs.")
    return max(matches, key=len)


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions, absolute names."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else None
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = (package or module_name(path)).split(".")
                base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


class ImportGraphTest(absltest.TestCase):
    def test_every_module_imports_down_only(self):
        upward = []
        for path in sorted(PACKAGE.rglob("*.py")):
            if path == PACKAGE / "__init__.py":
                continue  # the package's docstring
            here = part_of(module_name(path))
            for target in imported_modules(path):
                if target.split(".")[0] in ("experiments", "tests", "launch"):
                    upward.append(f"{module_name(path)} imports {target} (outside the package)")
                if not target.startswith("vgg_jax.") or target == "vgg_jax":
                    continue
                try:
                    there = part_of(target)
                except AssertionError:
                    continue  # ``from vgg_jax.x import name``: the name is not a module
                if there != here and LEVELS[there] > LEVELS[here]:
                    upward.append(f"{module_name(path)} ({here}) imports {target} ({there})")
        self.assertEmpty(upward)

    def test_every_imported_package_module_exists(self):
        """Catches an import left at a module's old path (function-level ones run only late)."""
        missing = []
        for path in sorted(PACKAGE.rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vgg_jax"):
                    base = ROOT.joinpath(*node.module.split("."))
                    if not (base.with_suffix(".py").exists() or base.is_dir()):
                        missing.append(f"{module_name(path)}: from {node.module}")
                    elif node.module == "vgg_jax":
                        for alias in node.names:
                            module = ROOT / "vgg_jax" / alias.name
                            if not (module.with_suffix(".py").exists() or module.is_dir()):
                                missing.append(f"{module_name(path)}: vgg_jax.{alias.name}")
        self.assertEmpty(missing)

    def test_checker_sees_function_level_and_relative_imports(self):
        with tempfile.TemporaryDirectory(dir=PACKAGE / "data") as scratch:
            probe = pathlib.Path(scratch) / "probe.py"
            probe.write_text("def f():\n    from vgg_jax.tools import cli\n")
            self.assertIn("vgg_jax.tools.cli", imported_modules(probe))
            self.assertEqual(part_of(module_name(probe)), "vgg_jax.data")


@pytest.mark.slow
class StandsAloneTest(absltest.TestCase):
    def test_every_module_imports_from_outside_the_repository(self):
        modules = sorted(
            module_name(p) for p in PACKAGE.rglob("*.py") if not p.name.startswith("__main__")
        )
        script = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
        env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
        with tempfile.TemporaryDirectory() as elsewhere:
            result = subprocess.run(
                [sys.executable, "-c", script, *modules],
                cwd=elsewhere,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])


class LintTest(absltest.TestCase):
    """CI runs the suite, so the suite runs the linter and the formatter's check."""

    def run_ruff(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ruff", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def test_ruff_check_is_clean(self):
        result = self.run_ruff("check", "--no-cache", ".")
        self.assertEqual(result.returncode, 0, result.stdout[-3000:])

    def test_ruff_format_is_clean(self):
        result = self.run_ruff("format", "--check", "--no-cache", ".")
        self.assertEqual(result.returncode, 0, result.stdout[-3000:])


if __name__ == "__main__":
    absltest.main()
