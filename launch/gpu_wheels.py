"""Wheels for checking this project on a GPU machine that has no network (launch/gpu_check.sh).

    python launch/gpu_wheels.py download [DIR]     # make gpu-wheels: DIR (default .whl/) gets the wheels
    python launch/gpu_wheels.py verify SITE [DIR]  # after `pip install --target SITE DIR/*.whl`: nothing missing?

Such a machine (an image built for GPU work, Python 3.12, manylinux x86-64) already holds torch,
triton, transformers, tensorboard, einops, scikit-learn and pytest, with what they need, and lacks the
rest of requirements.txt. The wheels are exactly that rest: the pinned packages and their
dependencies, at the versions installed in this venv (make install), minus what those packages
bring, minus opencv-python-headless (video decoding for `ifas-shards build` only, 50 MB; the
check never decodes a video). DeepSpeed is published as a source archive only; it is built here
into a pure-Python wheel without its C++/CUDA ops (the trainer uses none: docs/architecture.md).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
TARGET_PYTHON = "3.12"
# pip matches manylinux tags exactly: the glibc versions wheels are published for.
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35, 39)] + ["manylinux2014_x86_64"]
PRESENT = ("torch", "triton", "transformers", "tensorboard", "einops", "scikit-learn", "pytest")
NOT_CARRIED = {"opencv-python-headless": "video decoding for ifas-shards build only (50 MB)"}
SOURCE_ONLY = ("deepspeed",)  # built here with DS_BUILD_OPS=0
MAX_BYTES = 60 * 10**6


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def target_environment() -> dict[str, str]:
    env = default_environment()
    env.update(python_version=TARGET_PYTHON, python_full_version=f"{TARGET_PYTHON}.0", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", implementation_name="cpython",
               platform_python_implementation="CPython", extra="")
    return env


def requirements_of(dist: md.Distribution) -> list[Requirement]:
    """What ``dist`` needs on the target machine (markers evaluated for it; extras left out)."""
    env = target_environment()
    reqs = [Requirement(r) for r in dist.requires or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def closure(names: list[str]) -> dict[str, str]:
    """{canonical name: installed version} of ``names`` and everything they need, from this venv."""
    found: dict[str, str] = {}
    todo = [canonical(n) for n in names]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise SystemExit(f"gpu_wheels: {name} is not installed in this Python ({sys.prefix}); here: make install; "
                             "on the GPU machine: it should be one of the packages such a machine has") from None
        found[name] = dist.version
        todo.extend(canonical(r.name) for r in requirements_of(dist))
    return found


def pinned_roots() -> list[str]:
    """The packages of requirements.txt and requirements-dev.txt (pinned lines; ruff is not needed there)."""
    names = []
    for f in ("requirements.txt", "requirements-dev.txt"):
        for line in (ROOT / f).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-"):
                names.append(canonical(Requirement(line).name))
    return [n for n in names if n not in ("ruff", *NOT_CARRIED)]


def plan() -> dict[str, str]:
    """{name: version} of the wheels to carry."""
    present = closure(list(PRESENT))
    needed = closure(pinned_roots())
    return {n: v for n, v in sorted(needed.items()) if n not in present and n not in NOT_CARRIED}


def download(out: Path) -> int:
    wheels = plan()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    binary = [f"{n}=={v}" for n, v in wheels.items() if n not in SOURCE_ONLY]
    tags = ["--python-version", TARGET_PYTHON, "--implementation", "cp"]
    tags += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", *tags, "-d", str(out), *binary],
                   check=True)
    for name in SOURCE_ONLY:
        if name in wheels:
            env = dict(os.environ, DS_BUILD_OPS="0")  # a pure-Python DeepSpeed: ops would JIT-build if ever used
            subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                            f"{name}=={wheels[name]}"], check=True, env=env)
    files = sorted(out.glob("*.whl"))
    size = sum(f.stat().st_size for f in files)
    for f in files:
        print(f"{f.stat().st_size / 1e6:7.2f} MB  {f.name}")
    print(f"{len(files)} wheels, {size / 1e6:.1f} MB in {out} (limit {MAX_BYTES / 1e6:.0f} MB)")
    got = {canonical(f.name.split("-")[0]) for f in files}
    if got != set(wheels):
        print(f"gpu_wheels: missing {sorted(set(wheels) - got)}", file=sys.stderr)
        return 1
    return 0 if size <= MAX_BYTES else 1


def verify(site: Path, wheel_dir: Path) -> list[str]:
    """Problems of a ``pip install --target site`` of ``wheel_dir``: a wheel not installed, or a
    requirement that neither the installed wheels nor the packages such a machine has (PRESENT and
    what they need) satisfy. Reads metadata only: the wheels may be for another Python."""
    installed = {canonical(d.metadata["Name"]): d for d in md.distributions(path=[str(site)])}
    present = closure(list(PRESENT))
    problems = [f"{f.name} was not installed" for f in sorted(wheel_dir.glob("*.whl"))
                if canonical(f.name.split("-")[0]) not in installed]
    for name, dist in sorted(installed.items()):
        for req in requirements_of(dist):
            dep = canonical(req.name)
            if dep in installed:
                if not req.specifier.contains(installed[dep].version, prereleases=True):
                    problems.append(f"{name} needs {req}, the wheels have {installed[dep].version}")
            elif dep not in present:
                problems.append(f"{name} needs {req}: no wheel, and not among the packages such a machine has")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="write the wheels into DIR (default .whl)")
    d.add_argument("dir", nargs="?", default=str(ROOT / ".whl"))
    v = sub.add_parser("verify", help="check a --target install of the wheels")
    v.add_argument("site")
    v.add_argument("dir", nargs="?", default=str(ROOT / ".whl"))
    args = ap.parse_args(argv)
    if args.cmd == "download":
        return download(Path(args.dir))
    problems = verify(Path(args.site), Path(args.dir))
    for p in problems:
        print(f"gpu_wheels: {p}", file=sys.stderr)
    print(f"gpu_wheels: {args.site}: {'complete' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
