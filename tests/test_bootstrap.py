"""scripts/bootstrap.sh refuses, before pip starts, to install torch on a disk too small for it.

A CI run once died after 22 s with pip's bare "[Errno 28] No space left on device"; the script
must name the venv path and the space it needs instead, and leave torch uninstalled.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bootstrap_refuses_when_disk_is_too_small(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    env = {**os.environ, "VENV": str(venv), "PYTHON": sys.executable, "BOOTSTRAP_NEED_GIB": str(10**9)}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "bootstrap.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stderr
    assert str(venv) in done.stderr and f"{10**9} GiB" in done.stderr
    assert not list(venv.glob("lib/python*/site-packages/torch")), "torch was installed anyway"
