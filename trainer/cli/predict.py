"""``ifas-predict``: judgment, liveness score and a generated explanation per face image, as JSON
lines (trainer/eval/predict.py). Every readable input is predicted; each unreadable one (a missing path,
a file that is no image, a damaged shard or sample) gets its own record ``{"path", "error"}`` and the
counts go to stderr. Exit status 1 only when nothing could be predicted, or with --strict when anything
was unreadable; 2 for a bad model, threshold file or option.

    ifas-predict --model runs/demo/export --threshold-from runs/demo/calibration.json \
        face1.jpg photos/ data/demo/domain_d --out predictions.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from trainer.config import size_arg
from trainer.data import ShardSetError
from trainer.data.provenance import synthetic_only_note
from trainer.dist import device
from trainer.eval.predict import batches, crop_face, iter_inputs, predict_batch
from trainer.eval.scoring import threshold_from_file
from trainer.logs import setup_logging
from trainer.model.arch import ModelLoadError
from trainer.model.export import inference_dtype
from trainer.model.ifas import IFASModel

log = logging.getLogger("ifas.predict")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ifas-predict", description="Is this photo of a real person?")
    parser.add_argument("--model", required=True, help="exported model directory (ifas-export / <run>/export)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float, default=None, help="score >= threshold means live (default 0.5)")
    group.add_argument(
        "--threshold-from",
        default=None,
        help="read the calibrated threshold from ifas-eval's calibration.json or eval_metrics.json",
    )
    parser.add_argument("--no-explain", action="store_true", help="score only, no generated explanation")
    parser.add_argument("--max-new-tokens", type=size_arg(1), default=48, help="explanation length cap (tokens)")
    parser.add_argument("--batch-size", type=size_arg(1), default=16)
    parser.add_argument(
        "--face-crop",
        action="store_true",
        help="crop the largest face of raw photos first (the shards' detector and crop rule)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when any input is unreadable (default: only when none predicts)"
    )
    parser.add_argument("--out", default=None, help="write JSON lines to this file")
    parser.add_argument("--jsonl", action="store_true", help="print JSON lines instead of one readable line per input")
    parser.add_argument("inputs", nargs="+", help="image files, folders or shard sets")
    args = parser.parse_args(argv)
    setup_logging()
    out_file = None
    try:
        if not any(Path(spec).exists() for spec in args.inputs):  # fail before loading the model
            missing = "; ".join(f"{spec} does not exist" for spec in args.inputs)
            raise FileNotFoundError(f"no input exists: {missing} (give image files, folders or shard sets)")
        if args.threshold_from:
            threshold, source = threshold_from_file(args.threshold_from)
        else:
            threshold = 0.5 if args.threshold is None else args.threshold
            source = "default" if args.threshold is None else "--threshold"
        model, tokenizer = IFASModel.from_pretrained(args.model, dtype=inference_dtype(device()))
        model.to(device()).eval()
        note = synthetic_only_note(args.model)
        if note:
            print(f"ifas-predict: warning: {note}", file=sys.stderr)
        out_file = open(args.out, "w") if args.out else None
        counts = {"predicted": 0, "unreadable": 0}
        for items in batches(iter_inputs(args.inputs), args.batch_size):
            good = [it for it in items if it.image is not None]
            crops = [crop_face(it.image, model.arch.image_size) if args.face_crop else (it.image, None) for it in good]
            preds = iter(predict_batch(
                model, tokenizer, [c for c, _ in crops], threshold, not args.no_explain, args.max_new_tokens
            ) if good else [])
            boxes = iter(box for _, box in crops)
            for it in items:
                if it.image is None:
                    _emit(args, out_file, {"path": it.path, "error": it.error}, f"{it.path}: unreadable: {it.error}")
                    counts["unreadable"] += 1
                    continue
                score, judgment, text = next(preds)
                record = {
                    "path": it.path,
                    "judgment": judgment,
                    "score": score,
                    "threshold": threshold,
                    "threshold_source": source,
                    "explanation": text,
                    **it.meta,
                }
                if note:
                    record["model_training_data"] = "synthetic_only"
                box = next(boxes)
                if args.face_crop:
                    record["face_box"] = box  # normalised [x, y, w, h] in the input image; None: no face found
                _emit(args, out_file, record,
                      f"{it.path}: {judgment} (score {score:.3f}, threshold {threshold:.3f}) {text}")
                counts["predicted"] += 1
        print(f"ifas-predict: {counts['predicted']} predicted, {counts['unreadable']} unreadable"
              + (f" (records in {args.out})" if args.out else ""), file=sys.stderr)
    except (ModelLoadError, FileNotFoundError, ShardSetError, ValueError, OSError) as exc:
        print(f"ifas-predict: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if out_file is not None:
            out_file.close()
    if counts["predicted"] == 0:
        print("ifas-predict: error: no input could be predicted (every one is unreadable)", file=sys.stderr)
        return 1
    return 1 if args.strict and counts["unreadable"] else 0


def _emit(args: argparse.Namespace, out_file, record: dict, line: str) -> None:
    """One record to --out (JSON lines), and to stdout as JSON (--jsonl) or a readable line (without --out)."""
    if out_file is not None:
        out_file.write(json.dumps(record) + "\n")
    if args.jsonl:
        print(json.dumps(record), flush=True)
    elif out_file is None:
        print(line, flush=True)

if __name__ == "__main__":
    sys.exit(main())
