"""Lint and format: the Python code (ruff), the Snakefiles (snakefmt) and the workflow
(`snakemake --lint`) have no findings. Fix with `ruff format . && ruff check --fix .`
and `snakefmt Snakefile workflow/` (all in .venv/bin)."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

BIN = Path(sys.executable).parent


def run(*cmd):
    return subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize(
    "cmd",
    [
        ("ruff", "check", "."),
        ("ruff", "format", "--check", "."),
        ("snakefmt", "--check", "Snakefile", "workflow/"),
    ],
    ids=["ruff-check", "ruff-format", "snakefmt"],
)
def test_no_findings(cmd):
    res = run(BIN / cmd[0], *cmd[1:])
    assert res.returncode == 0, f"{' '.join(cmd)} found problems:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"


def test_snakemake_lint():
    res = run(sys.executable, "-m", "snakemake", "--lint", "--workflow-profile", "none", "-s", "Snakefile")
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "Lints for" not in out, f"snakemake --lint found problems:\n{out[-6000:]}"
