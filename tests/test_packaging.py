"""The design card's folders import under one root after a NON-editable install into a fresh venv,
the console script works, and the core does not import the heavy optional packages."""
from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_install_imports_all_packages(tmp_path):
    src = tmp_path / "src"  # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "tests",
                                                            ".pytest_cache", ".hypothesis", "test-artifacts"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                    str(wheels), str(src)], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("mmstack-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--quiet", str(wheel)], check=True, cwd=tmp_path)
    code = ("import mmstack, mmstack.vision, mmstack.generation, mmstack.apps, mmstack.assets, mmstack.llm, "
            "mmstack.kernels, mmstack.io; import os; print(os.path.dirname(mmstack.vision.__file__))")
    out = subprocess.run([str(py), "-c", code], check=True, cwd=tmp_path, capture_output=True, text=True).stdout
    assert str(env_dir) in out, f"mmstack.vision came from {out.strip()}, not the venv"
    helped = subprocess.run([str(env_dir / "bin" / "mmstack"), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert helped.returncode == 0 and "convert" in helped.stdout


def test_core_does_not_import_heavy_optional_packages():
    code = ("import sys, mmstack, mmstack.api, mmstack.loading, mmstack.decoding, mmstack.vision, mmstack.generation, "
            "mmstack.apps, mmstack.cli; mmstack.load; "
            "bad = [m for m in ('gradio', 'diffusers', 'peft', 'bitsandbytes') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_exit_codes_and_one_line_errors(tmp_path):
    cli = [sys.executable, "-m", "mmstack.cli"]
    assert subprocess.run(cli + ["describe"], capture_output=True, cwd=REPO).returncode == 2  # usage: no image
    r = subprocess.run(cli + ["info", str(tmp_path / "missing")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "no such model folder" in r.stderr and "Traceback" not in r.stderr
