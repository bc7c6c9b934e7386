"""``ifas-shards``: generate synthetic shard sets, verify shard sets, print their statistics.

    ifas-shards synth --out data/synth [--samples-per-domain 1000] [--seed 0] [--domains domain_a ...]
    ifas-shards verify data/synth/domain_a data/synth/domain_b
    ifas-shards stats data/synth/*
    ifas-shards build oulu_npu /data/Oulu_NPU --out data/shards/oulu_npu [--frames 10] [--face auto]
    ifas-shards caption data/shards/oulu_npu/train --out data/shards_cap/oulu_npu/train \
        --captioner /models/llava
    torchrun --nproc_per_node 8 -m shards.cli caption ...   (data-parallel: shards/caption_parallel.py)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

from shards.errors import ShardsError
from shards.io import open_image, parse_size, setup_logging, sha256_file
from shards.manifest import COUNT_FIELDS, MANIFEST_NAME, ManifestError, read_manifest
from shards.schema import SchemaError, image_member, validate_meta

log = logging.getLogger("shards.cli")


def _check_sample(sample: dict, url: str) -> tuple[str, dict | None, list[str]]:
    """Decode one raw webdataset sample; return (key, meta or None, problems)."""
    key = sample.get("__key__", "?")
    problems = []
    image = None
    try:
        _, image = image_member(sample, key)
    except SchemaError as e:
        problems.append(f"{url}: {e}")
    if "json" not in sample:
        problems.append(f"{url}: sample {key} has no .json member")
    meta = None
    if "json" in sample:
        try:
            meta = validate_meta(json.loads(sample["json"]), key)
        except (UnicodeDecodeError, json.JSONDecodeError, SchemaError) as e:
            problems.append(f"{url}: sample {key}: bad json ({e})")
            meta = None
    if image is not None:
        try:
            open_image(image)
        except Exception as e:  # PIL raises many types for corrupt data
            problems.append(f"{url}: sample {key}: image does not decode ({e})")
    return key, meta, problems


def file_problems(shard_dir: Path, manifest: dict) -> list[str]:
    """What the files alone show against the manifest (no tar is read): unfinished temporary files, tars
    the manifest does not list, listed shards that are missing or of another size. ``stats`` reports
    these; ``verify`` adds checksums and reads every sample."""
    problems = [f"{stray}: unfinished temporary file" for stray in sorted(shard_dir.glob("*.tmp"))]
    listed = {s["file"] for s in manifest["shards"]}
    problems += [f"{tar}: tar file not listed in {shard_dir / MANIFEST_NAME}"
                 for tar in sorted(shard_dir.glob("*.tar")) if tar.name not in listed]
    for entry in manifest["shards"]:
        path = shard_dir / entry["file"]
        if not path.is_file():
            problems.append(f"{path}: listed in the manifest but missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
    return problems


def verify_shard_set(shard_dir: Path) -> tuple[list[str], dict]:
    """Check a shard set against its manifest; return (problems, summary). Every problem names a file."""
    import webdataset as wds

    try:
        manifest = read_manifest(shard_dir)
    except (FileNotFoundError, ManifestError) as e:
        return [str(e)], {}
    problems = file_problems(shard_dir, manifest)
    keys: set[str] = set()
    counts = {f: Counter() for f in COUNT_FIELDS}
    for entry in manifest["shards"]:
        path = shard_dir / entry["file"]
        log.info("verifying %s", path)
        if not path.is_file():
            continue
        if sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
        n = 0
        try:
            for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
                key, meta, sample_problems = _check_sample(sample, str(path))
                problems += sample_problems
                n += 1
                if key in keys:
                    problems.append(f"{path}: duplicate key {key}")
                keys.add(key)
                for field, c in counts.items():
                    if meta is not None and field in meta:
                        c[str(meta[field])] += 1
        except Exception as e:  # tarfile/webdataset raise various errors on truncated archives
            problems.append(f"{path}: unreadable after {n} samples ({type(e).__name__}: {e})")
        if n != entry["num_samples"]:
            problems.append(f"{path}: {n} samples read, manifest says {entry['num_samples']}")
    for field, expected in manifest["counts"].items():
        if field in counts and dict(counts[field]) != expected:
            found = dict(sorted(counts[field].items()))
            problems.append(f"{shard_dir / MANIFEST_NAME}: counts[{field!r}] {expected} but shards hold {found}")
    summary = {"name": manifest["name"], "num_samples": len(keys), "shards": len(manifest["shards"])}
    return problems, summary


def _cmd_verify(args: argparse.Namespace) -> int:
    failed = 0
    for d in args.dirs:
        problems, summary = verify_shard_set(Path(d))
        if problems:
            failed += 1
            print(f"FAIL {d}")
            for p in problems:
                print(f"  {p}")
        else:
            print(f"OK   {d}: {summary['name']}, {summary['num_samples']} samples in {summary['shards']} shards")
    return 1 if failed else 0


def _cmd_stats(args: argparse.Namespace) -> int:
    total: dict[str, Counter] = {}
    rc = 0
    for d in args.dirs:
        try:
            m = read_manifest(d)
        except (FileNotFoundError, ManifestError) as e:
            print(f"FAIL {e}")
            rc = 1
            continue
        print(f"{d}: {m['name']}, {m['num_samples']} samples in {len(m['shards'])} shards")
        damage = file_problems(Path(d), m)
        if damage:  # the counts below are the manifest's, not what the damaged files still hold
            rc = 1
            print(f"  DAMAGED: {len(damage)} problem(s) the counts below do not reflect; "
                  f"run `ifas-shards verify {d}` to read every sample")
            for p in damage:
                print(f"    {p}")
        for field, counts in m["counts"].items():
            print(f"  {field:8s} " + ", ".join(f"{k}={v}" for k, v in counts.items()))
            total.setdefault(field, Counter()).update(counts)
    if len(args.dirs) > 1 and total:
        print("total:")
        for field, counts in total.items():
            print(f"  {field:8s} " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return rc


def _cmd_synth(args: argparse.Namespace) -> int:
    from shards.synth import generate_demo

    dirs = generate_demo(
        args.out,
        samples_per_domain=args.samples_per_domain,
        seed=args.seed,
        image_size=args.image_size,
        domains=args.domains,
        samples_per_shard=args.samples_per_shard,
        frames_per_video=args.frames_per_video,
        overwrite=args.overwrite,
        workers=args.workers,
    )
    for d in dirs:
        print(d)
    return 0


def _size_arg(text: str) -> int:
    """argparse type for byte sizes (shards.io.parse_size: 256MB = 256 * 10**6, 256MiB = 256 * 2**20)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _count_arg(text: str) -> int:
    """argparse type for counts (0 or more)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0, 1, 2, ...)")
    return int(text)


def _cmd_build(args: argparse.Namespace) -> int:
    from shards.adapters import AdapterError, get_adapter
    from shards.build import BuildOptions, build_dataset, format_report

    options = {
        k: v
        for k, v in {
            "list": args.list,
            "live_label": args.live_label,
            "split": args.split,
            "dataset": args.dataset_name,
        }.items()
        if v is not None
    }
    try:
        adapter = get_adapter(args.dataset, args.root, **options)
    except AdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    opts = BuildOptions(
        frames=args.frames,
        image_frames=args.image_frames,
        first_frames=args.first_frames,
        face=args.face,
        margin=args.margin,
        size=args.size,
        center_fallback=args.center_fallback,
        jpeg_quality=args.jpeg_quality,
        max_samples=args.samples_per_shard,
        max_bytes=args.shard_bytes,
        splits=args.splits,
    )
    result = build_dataset(adapter, args.out, opts, overwrite=args.overwrite, stop_after_shards=args.stop_after_shards)
    print(format_report(result, args.out))
    return 0 if all(m is not None for m in result.values()) else 3


def build_parser() -> argparse.ArgumentParser:
    from shards.synth import ALL_DOMAINS

    ap = argparse.ArgumentParser(prog="ifas-shards", description=__doc__.split("\n")[0])
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    # the deepspeed launcher puts --local_rank=K before the subcommand (`caption` reads LOCAL_RANK from the env)
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="generate the synthetic FAS shard sets (one directory per domain)")
    s.add_argument("--out", required=True, help="output directory; gets one sub-directory per domain")
    s.add_argument("--samples-per-domain", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=128)
    s.add_argument("--domains", nargs="+", default=list(ALL_DOMAINS), choices=ALL_DOMAINS)
    s.add_argument("--samples-per-shard", type=int, default=500)
    s.add_argument("--frames-per-video", type=int, default=2)
    s.add_argument("--workers", type=int, default=1, help="processes rendering samples (output is identical)")
    s.add_argument("--overwrite", action="store_true", help="replace existing shard sets in the output")
    s.set_defaults(func=_cmd_synth)

    v = sub.add_parser("verify", help="read every shard back and check it against its manifest")
    v.add_argument("dirs", nargs="+")
    v.set_defaults(func=_cmd_verify)

    st = sub.add_parser("stats", help="print label/attack counts from manifests, and damage the files show "
                        "(missing, resized, unlisted or unfinished shards; verify reads every sample)")
    st.add_argument("dirs", nargs="+")
    st.set_defaults(func=_cmd_stats)

    from shards.adapters import ADAPTERS
    from shards.faces import FACE_MODES

    layouts = "\n".join(f"  {name}: {adapter.layout}" + (f"\n    face locations: {adapter.face_locations}"
                                                         if adapter.face_locations else "")
                         for name, adapter in ADAPTERS.items())
    b = sub.add_parser(
        "build",
        help="turn one dataset folder into shard sets <out>/<split>/ (see docs/datasets.md)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"expected layouts (details and commands: docs/datasets.md):\n{layouts}",
    )
    b.add_argument("dataset", choices=list(ADAPTERS), help="adapter: a public dataset, 'list' or 'folder'")
    b.add_argument("root", help="the dataset folder as distributed")
    b.add_argument("--out", required=True, help="output folder; gets one shard set per split")
    b.add_argument("--list", help="list adapter: file of `relative/path <label>` lines")
    b.add_argument("--live-label", help="list adapter (required): the label value that means live")
    b.add_argument("--split", help="list adapter: split name for its samples (default all)")
    b.add_argument("--dataset-name", help="list/folder adapters: the dataset name written into samples")
    b.add_argument("--splits", nargs="+", help="build only these splits (default: all the adapter finds)")
    b.add_argument("--frames", type=int, default=10, help="frames per video, evenly spaced")
    b.add_argument("--image-frames", type=int, default=0, help="images kept per frame folder, evenly spaced (0: all)")
    b.add_argument(
        "--first-frames",
        type=_count_arg,
        default=0,
        help="sample only among each video's (or frame folder's) first N frames, e.g. SiW protocol 1: "
        "--first-frames 60 --frames 60 (0: the whole video)",
    )
    b.add_argument(
        "--face",
        default="auto",
        choices=FACE_MODES,
        help="auto: the release's face locations (OULU-NPU eyes, Replay-Attack/SiW .face, CelebA-Spoof boxes) "
        "where it ships them, else the bundled LBP detector; release: the same, refused for a dataset without "
        "them; detect: the detector only; bbox: release locations only; center/full: no detection",
    )
    b.add_argument("--margin", type=float, default=0.25, help="margin around the face box, per side, in box sizes")
    b.add_argument("--size", type=int, default=224, help="output crop size (pixels)")
    b.add_argument(
        "--center-fallback", action="store_true", help="centre crop frames without a detected face (else skipped)"
    )
    b.add_argument("--jpeg-quality", type=int, default=95)
    b.add_argument("--samples-per-shard", type=int, default=1000)
    b.add_argument("--shard-bytes", type=_size_arg, default=256 << 20, help="target shard size, e.g. 256MB")
    b.add_argument("--stop-after-shards", type=int, help="write at most N new shards, then stop (rerun resumes)")
    b.add_argument("--overwrite", action="store_true", help="discard an existing or interrupted build in --out")
    b.set_defaults(func=_cmd_build)

    from shards.caption_parallel import add_caption_args, main_caption

    c = sub.add_parser("caption", help="SCF: caption a shard set with a local captioner, filter, write new shards")
    add_caption_args(c)
    c.set_defaults(func=main_caption)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return args.func(args)
    except ShardsError as e:  # a problem with the command's inputs or options: one line, argparse's status
        print(f"ifas-shards: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
