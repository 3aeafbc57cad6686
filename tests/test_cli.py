"""Environment variables and the command line (``python -m moegemm``), the cache's ``clear`` above all:
it must delete only what moegemm wrote. CPU only."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_python

from moegemm import __version__, env
from moegemm.jit import compiler

PACKAGE = REPO / "moegemm"
CLI = "import sys; from moegemm.__main__ import main; sys.exit(main())"


def moegemm_cli(*args: str) -> subprocess.CompletedProcess:
    return run_python(CLI, *args)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("MOEGEMM_CACHE_DIR", str(root))
    return root


def make_cache(root: Path) -> None:
    """A cache as moegemm writes it: marker, a kernel entry and the host helper."""
    compiler.cache_subdir("kernels")
    entry = root / "kernels" / "old_0123" / "kernel.cubin"
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"x" * 1000)
    compiler.cache_subdir("host")
    (root / "host" / "launch_0123.so").write_bytes(b"y")


# ---- environment variables -----------------------------------------------------------------------------


def test_every_variable_has_one_readme_row():
    readme = (REPO / "README.md").read_text()
    rows = collections.Counter(re.findall(r"^\|\s*`(MOEGEMM_[A-Z0-9_]+)`\s*\|", readme, re.M))
    declared = {v.name for v in env.VARIABLES}
    assert {name: rows[name] for name in declared if rows[name] != 1} == {}, "rows per variable in README.md"
    assert set(rows) - declared == set(), "README.md documents variables env.VARIABLES lacks"


def _package_sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "env.py")


def test_only_env_module_reads_moegemm_variables():
    direct = re.compile(r"""(?:environ\s*(?:\.get\s*\(|\[)|getenv\s*\()\s*[rbf]?["']MOEGEMM_""")
    readers = [f"{p.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}"
               for p in _package_sources() for text in [p.read_text()] for m in direct.finditer(text)]
    assert readers == [], "read MOEGEMM_ variables through moegemm.env"


def test_every_variable_used_is_declared():
    used = {name for p in _package_sources() for name in re.findall(r"""["'](MOEGEMM_[A-Z0-9_]+)["']""",
                                                                     p.read_text())}
    assert used - {v.name for v in env.VARIABLES} == set()


@pytest.mark.parametrize("value", ["", "   "])
def test_blank_variable_means_its_default(monkeypatch, value):
    monkeypatch.setenv("MOEGEMM_CACHE_DIR", value)
    assert compiler.cache_dir() == Path("~/.cache/moegemm").expanduser()
    monkeypatch.setenv("MOEGEMM_USE_NVRTC", value)
    assert not compiler.use_nvrtc()


# ---- the cache and `cache clear` -----------------------------------------------------------------------


def test_a_new_cache_carries_its_marker(cache):
    assert not cache.exists()
    compiler.cache_subdir("kernels")
    assert (cache / compiler.CACHE_MARKER).is_file()


def test_cache_clear_removes_what_moegemm_wrote_and_keeps_the_rest(cache):
    make_cache(cache)
    (cache / "notes.txt").write_text("mine")
    result = moegemm_cli("cache", "clear")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in cache.iterdir()) == ["notes.txt"]
    assert f"removed {cache / 'kernels'}" in result.stdout and "MiB" in result.stdout


def test_cache_clear_removes_a_cache_of_its_own_entirely(cache):
    make_cache(cache)
    result = moegemm_cli("cache", "clear")
    assert result.returncode == 0, result.stderr
    assert not cache.exists()
    assert f"removed {cache}\n" in result.stdout


def test_cache_clear_refuses_a_directory_moegemm_did_not_create(cache):
    cache.mkdir()
    (cache / "thesis.tex").write_text("precious")
    (cache / "kernels").mkdir()
    result = moegemm_cli("cache", "clear")
    assert result.returncode == 2
    assert compiler.CACHE_MARKER in result.stderr and "Traceback" not in result.stderr
    assert (cache / "thesis.tex").read_text() == "precious" and (cache / "kernels").is_dir()


def test_cache_clear_of_a_missing_cache_says_so(cache):
    result = moegemm_cli("cache", "clear")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("nothing to remove") and "removed" not in result.stdout


def test_cache_clear_with_an_empty_variable_uses_the_default(tmp_path, monkeypatch):
    """Not the current directory: a blank value once made `cache clear` empty it."""
    home = tmp_path / "home"
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MOEGEMM_CACHE_DIR", "")
    result = run_python(CLI, "cache", "clear", cwd=work)
    assert result.returncode == 0, result.stderr
    assert f"nothing to remove: {home / '.cache' / 'moegemm'} does not exist" in result.stdout
    assert (work / "keep.txt").exists()


@pytest.mark.parametrize("root", ["", "  ", "/", "~"])
def test_clear_cache_refuses_empty_root_and_home(tmp_path, monkeypatch, root):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / compiler.CACHE_MARKER).write_text("")  # even a marked home directory stays
    with pytest.raises(compiler.CacheClearRefused, match="cache directory"):
        compiler.clear_cache(root)
    assert (tmp_path / compiler.CACHE_MARKER).exists()


# ---- the command line ----------------------------------------------------------------------------------


def test_cli_info(cache):
    result = moegemm_cli("info")
    assert result.returncode == 0, result.stderr
    assert "cache" in result.stdout and str(cache) in result.stdout


def test_cli_version():
    result = moegemm_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"moegemm {__version__}"


def test_cli_exits_quietly_on_a_closed_pipe(cache):
    """`python -m moegemm info | head -1`: the reader is gone before the output is written (`true`
    reads nothing and exits while Python still imports torch)."""
    pipeline = f'{sys.executable} -c "{CLI}" info | true; echo "status ${{PIPESTATUS[0]}}"'
    result = subprocess.run(["bash", "-c", pipeline], capture_output=True, text=True, cwd=REPO, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert result.stdout.strip() == "status 0"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: bench would run")
def test_cli_bench_without_gpu_fails_plainly(cache):
    result = moegemm_cli("bench")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "GPU" in lines[0], result.stderr


_IMPORT_WITHOUT_CUDA = """
import torch
calls = []
real = torch.cuda._lazy_init
torch.cuda._lazy_init = lambda: calls.append("_lazy_init") or real()
import moegemm
assert not torch.cuda.is_initialized(), "CUDA initialised"
assert calls == [], calls
"""


def test_import_does_not_initialise_cuda():
    result = run_python(_IMPORT_WITHOUT_CUDA)
    assert result.returncode == 0, result.stderr
