"""The repo's ``tokenizers/`` script folder must never shadow the Hugging Face ``tokenizers`` package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tokenizers_folder_has_no_init():
    assert (REPO / "tokenizers").is_dir()
    assert not (REPO / "tokenizers" / "__init__.py").exists(), (
        "tokenizers/__init__.py would turn the script folder into a package that shadows "
        "Hugging Face `tokenizers` when Python runs from the repo root")


def test_import_tokenizers_from_repo_root_resolves_to_site_packages():
    out = subprocess.run(
        [sys.executable, "-c", "import tokenizers, sys; print(tokenizers.__file__); print(tokenizers.Tokenizer)"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.splitlines()[0]).resolve()
    assert "site-packages" in path.parts, path
    assert REPO / "tokenizers" not in path.parents
