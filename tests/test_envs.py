"""The software environments hold what the code imports.

`snakemake --use-conda` runs each rule's script in the conda environment its `conda:`
names (envs/*.yaml); `pip install .` installs what pyproject.toml lists. Neither can be
tried here (conda's channels are out of reach), so this is a contract, checked
statically: for every rule with `conda:`, follow the imports of the script it runs
through our package (with `ast`: every import in a module counts, also inside a
function, since a function may run) and check that each third-party import is provided
by that env file; and that pyproject.toml lists every third-party import of the
package. Pins agree between requirements.txt, pyproject.toml and the env files.

A second test installs the project with `pip install .` into a fresh virtual
environment, from the same pins, and runs `snakemake -n` on the example from there.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import REPO

SRC = REPO / "src"
PACKAGE = "wsiseg"

#: import name -> the distributions (PyPI names) that must be installed for it to work
PROVIDERS = {
    "skimage": {"scikit-image"},
    "PIL": {"pillow"},
    "yaml": {"pyyaml"},
    "openslide": {"openslide-python", "openslide-bin"},  # the binding and the library it loads
    "tifffile": {"tifffile", "imagecodecs"},  # tifffile decodes JPEG/JPEG 2000 tiles with imagecodecs
    "sklearn": {"scikit-learn"},
    "cv2": {"opencv-python-headless"},
}
#: distributions that are not Python imports of their own (installed for another one)
NOT_IMPORTED = {"openslide-bin", "imagecodecs", "pip", "python"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def providers(import_name: str) -> set:
    return {norm(p) for p in PROVIDERS.get(import_name, {import_name})}


# --------------------------------------------------------------- imports, statically
def module_file(module: str) -> Path | None:
    """The source file of one of our modules (``wsiseg.x.y``), or None if it is not ours."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        return None
    base = SRC.joinpath(*module.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def dynamic_imports(module: str) -> list:
    """Modules imported by name at run time (importlib): the model formats of wsiseg.models."""
    if module == f"{PACKAGE}.models":
        from wsiseg.models import FORMATS

        return [f"{PACKAGE}.models.{f.module}" for f in FORMATS.values()]
    return []


def imports_of(path: Path, module: str | None) -> tuple[set, set]:
    """(our modules, top-level third-party/stdlib names) imported anywhere in a file."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    ours, others = set(), set()

    def add(name: str) -> None:
        top = name.split(".")[0]
        if top == PACKAGE:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b and a.b.c
                if module_file(".".join(parts[:i])):
                    ours.add(".".join(parts[:i]))
        else:
            others.add(top)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package
                pkg = (module if is_pkg else module.rsplit(".", 1)[0]).split(".")
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            else:
                base = node.module
            add(base)
            for a in node.names:  # from pkg import submodule
                if module_file(f"{base}.{a.name}"):
                    add(f"{base}.{a.name}")
    return ours, others


def third_party_imports(entry: Path) -> dict:
    """Third-party top-level import names reachable from a script -> one module that imports it."""
    seen, found = set(), {}
    todo = [(entry, None)]
    while todo:
        path, module = todo.pop()
        ours, others = imports_of(path, module)
        for name in others:
            if name not in sys.stdlib_module_names and name not in ("snakemake", "__future__"):
                found.setdefault(name, module or path.name)
        for m in ours:
            for mod in [m, *dynamic_imports(m)]:
                if mod not in seen:
                    seen.add(mod)
                    todo.append((module_file(mod), mod))
    return found


# ------------------------------------------------------------------ rules and envs
def rules_with_conda() -> list:
    """(rule, env file, script) for every rule of the workflow that names a conda env."""
    out = []
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        blocks = re.split(r"^(?=(?:rule|checkpoint) \w+:)", smk.read_text(), flags=re.M)
        for b in blocks:
            m = re.match(r"(?:rule|checkpoint) (\w+):", b)
            if not m:
                continue
            conda = re.search(r"^\s+conda:\s*\n\s+\"([^\"]+)\"", b, re.M)
            script = re.search(r"^\s+script:\s*\n\s+\"([^\"]+)\"", b, re.M)
            assert not re.search(r"^\s+(shell|run):", b, re.M), f"rule {m[1]}: check its shell/run code by hand"
            if conda:
                assert script, f"rule {m[1]} names a conda env but runs no script this test can follow"
                out.append((m[1], (smk.parent / conda[1]).resolve(), (smk.parent / script[1]).resolve()))
    return out


def parse_req(line: str) -> tuple[str, str]:
    m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*(.*)$", line)
    return norm(m[1]), m[2].strip()


def env_packages(path: Path) -> dict:
    """Distribution -> version spec of a conda env file (conda and pip sections)."""
    env = yaml.safe_load(path.read_text())
    pkgs = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for p in dep.get("pip", []):
                name, spec = parse_req(p)
                pkgs[name] = spec
        else:
            name, _, ver = dep.partition("=")
            pkgs[norm(name)] = ("==" + ver.lstrip("=")) if ver else ""
    return pkgs


def requirement_pins() -> dict:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, spec = parse_req(line)
            pins[name] = spec
    return pins


RULES = rules_with_conda()


def test_every_rule_that_runs_code_names_its_env():
    names = {r for r, _, _ in RULES}
    assert {"segment", "plan", "stats", "stitch", "aggregate", "evaluate", "train"} <= names, names
    for rule, env, script in RULES:
        assert env.is_file(), f"rule {rule}: conda env {env} does not exist"
        assert script.is_file(), f"rule {rule}: script {script} does not exist"


def missing_from_env(script: Path, env: Path) -> dict:
    """Imports of ``script`` (through our package) that ``env`` does not provide -> (module, missing packages)."""
    have = set(env_packages(env))
    return {
        name: (via, sorted(providers(name) - have))
        for name, via in third_party_imports(script).items()
        if providers(name) - have
    }


@pytest.mark.parametrize("rule,env,script", RULES, ids=[r for r, _, _ in RULES])
def test_rule_env_provides_what_its_script_imports(rule, env, script):
    missing = missing_from_env(script, env)
    assert not missing, (
        f"rule {rule} runs {script.relative_to(REPO)} in {env.relative_to(REPO)}, which lacks "
        + "; ".join(f"{', '.join(pk)} (for 'import {n}' in {via})" for n, (via, pk) in sorted(missing.items()))
    )


def test_env_pins_agree_with_requirements():
    pins = requirement_pins()
    for env in sorted((REPO / "envs").glob("*.yaml")):
        for name, spec in env_packages(env).items():
            if name in ("python", "pip"):
                continue
            assert name in pins, f"{env.name}: {name} is not pinned in requirements.txt"
            assert spec == pins[name], f"{env.name}: {name}{spec}, but requirements.txt pins {name}{pins[name]}"


def test_pyproject_lists_every_runtime_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    listed = {parse_req(d)[0] for d in project["dependencies"]}
    needed = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        for name in imports_of(path, module)[1]:
            if name not in sys.stdlib_module_names and name != "__future__":
                needed.setdefault(name, module)
    missing = {n: via for n, via in needed.items() if providers(n) - listed}
    assert not missing, "pyproject.toml [project] dependencies lack: " + "; ".join(
        f"{', '.join(sorted(providers(n) - listed))} (for 'import {n}' in {via})" for n, via in sorted(missing.items())
    )
    pins = requirement_pins()
    for name in listed:
        assert name in pins, f"pyproject.toml depends on {name}, which requirements.txt does not pin"


def test_the_contract_sees_a_missing_package(tmp_path):
    """The check fails where it should: the segment rule's script in the CPU stages' env (no torch),
    the plan rule's env without scikit-image, a module reached only through a function-level import."""
    segment = next(s for r, _, s in RULES if r == "segment")
    assert missing_from_env(segment, REPO / "envs" / "wsi.yaml")["torch"][1] == ["torch"]
    env = yaml.safe_load((REPO / "envs" / "torch.yaml").read_text())
    pip = next(d for d in env["dependencies"] if isinstance(d, dict))["pip"]
    pip[:] = [p for p in pip if not p.startswith("scikit-image")]
    (tmp_path / "env.yaml").write_text(yaml.safe_dump(env))
    plan = next(s for r, _, s in RULES if r == "plan")
    assert missing_from_env(plan, tmp_path / "env.yaml")["skimage"][1] == ["scikit-image"]
    script = tmp_path / "script.py"
    script.write_text("def later():\n    from wsiseg import segment\n")
    assert "torch" in third_party_imports(script)


# ------------------------------------------------------ pip install . in a fresh venv
@pytest.mark.skipif(sys.platform != "linux", reason="the venv test uses Linux paths")
def test_pip_install_dot_runs_the_workflow_dry(tmp_path):
    """`pip install .` (with the pinned versions as constraints) gives a Python in which the
    package imports and `snakemake -n` plans the example: nothing is missing from pyproject."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    pins = tmp_path / "constraints.txt"
    pins.write_text((REPO / "requirements.txt").read_text())
    # torch first on its own, as scripts/setup_env.sh does: the pinned CPU build where it is on disk
    torch_pin = next(line for line in pins.read_text().splitlines() if line.startswith("torch=="))
    # a copy of what the package build reads, so that the build leaves nothing in the clone
    project = tmp_path / "project"
    shutil.copytree(SRC, project / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    for cmd in (
        [py, "-m", "pip", "install", "-q", torch_pin],
        [py, "-m", "pip", "install", "-q", "-c", pins, str(project)],
    ):
        res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
        assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    mods = sorted(
        ".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        for p in (SRC / PACKAGE).rglob("*.py")
    )
    res = subprocess.run(
        [str(py), "-c", f"import importlib, sys; [importlib.import_module(m) for m in {mods!r}]"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode == 0, f"a module of the installed package does not import:\n{res.stderr[-3000:]}"
    sheet = tmp_path / "slides.tsv"
    sheet.write_text((REPO / "config" / "slides.tsv").read_text())  # the example slide, made by the workflow
    res = subprocess.run(
        [str(venv / "bin" / "snakemake"), "-n", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path / "wd")]
        + ["--workflow-profile", "none", "--cores", "1", "--configfile", str(REPO / "config" / "config.yaml")]
        + [
            "--config",
            f"slides={sheet}",
            f"model={{name: nuclei-unet, weights: {REPO / 'models' / 'nuclei-unet.pt'}}}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode == 0, f"snakemake -n failed in the fresh venv:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert "example_slide" in res.stdout and "triage" in res.stdout
