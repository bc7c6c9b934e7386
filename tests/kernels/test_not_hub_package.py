"""Our top-level ``kernels`` package must never pass for the Hugging Face Hub ``kernels`` package.

transformers probes ``is_kernels_available()`` (find_spec("kernels") + a version check) and, when
True, does ``from kernels import get_kernel, kernelize, ...``, which would break on our package
(docs/architecture.md, "Known traps"). Checks run in a fresh interpreter with the repository root on sys.path, so the
probe finds our package (and its lru_cache starts empty).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import importlib.util, json, sys
spec = importlib.util.find_spec("kernels")
from transformers.utils import import_utils
available = import_utils.is_kernels_available()
exists, version = import_utils._is_package_available("kernels", return_version=True)
import kernels
print(json.dumps({
    "origin": spec.origin if spec else None,
    "available": available,
    "exists": exists,
    "version": version,
    "heavy": sorted(m for m in ("triton", "deepspeed", "kernels.lopsided_ce_triton", "kernels.gac_pool_triton")
                    if m in sys.modules),
    "has_version": hasattr(kernels, "__version__"),
    "hub_api": [n for n in ("get_kernel", "kernelize", "use_kernel_forward_from_hub") if hasattr(kernels, n)],
}))
"""


def _probe() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=100, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(120)
def test_transformers_does_not_take_our_kernels_for_the_hub_package() -> None:
    result = _probe()
    # the probe really saw our package (else the check below proves nothing)
    assert result["origin"] == str(ROOT / "kernels" / "__init__.py")
    assert result["available"] is False
    assert result["has_version"] is False
    assert result["hub_api"] == []
    # Importing the package stays light: transformers may import it just to read a version.
    assert result["heavy"] == []


@pytest.mark.timeout(60)
def test_installed_distribution_version_is_not_a_hub_kernels_version() -> None:
    """Installed (``pip install -e .``), ``kernels`` maps to our distribution ``ifas``, and
    transformers reads *its* version: it must stay outside the Hub package's accepted range."""
    from packaging import version
    from transformers.utils import import_utils

    match = re.search(r'version="([^"]+)"', (ROOT / "setup.py").read_text())
    assert match, "setup.py version not found"
    ours = version.parse(match.group(1))
    low, high = version.parse(import_utils.KERNELS_MIN_VERSION), version.parse(import_utils.KERNELS_MAX_VERSION)
    assert not low <= ours < high, f"ifas {ours} would pass for the Hub kernels package [{low}, {high})"
