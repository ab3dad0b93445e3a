"""The documentation builds with no warning (MkDocs --strict: a broken link, a docstring that names a
parameter the signature lacks, a generated page that fails all stop the build)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_docs_build_without_warnings(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "PhiModel" in api and "register_model" in api
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "eqprop compare" in cli and "--resume" in cli
    config = (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
    assert "cpu_kernel_threads" in config
    assert "ep-2h" in (tmp_path / "site" / "reproduction" / "index.html").read_text()
