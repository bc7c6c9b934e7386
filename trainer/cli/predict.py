"""``ifas-predict``: judgment, liveness score and a generated explanation per face image, as JSON
lines (trainer/eval/predict.py).

    ifas-predict --model runs/demo/export --threshold-from runs/demo/calibration.json \
        face1.jpg photos/ data/demo/domain_d --out predictions.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from PIL import UnidentifiedImageError

from trainer.data import ShardSetError
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
    parser.add_argument("--max-new-tokens", type=int, default=48, help="explanation length cap (tokens)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--face-crop",
        action="store_true",
        help="crop the largest face of raw photos first (the shards' detector and crop rule)",
    )
    parser.add_argument("--out", default=None, help="write JSON lines to this file")
    parser.add_argument("--jsonl", action="store_true", help="print JSON lines instead of one readable line per input")
    parser.add_argument("inputs", nargs="+", help="image files, folders or shard sets")
    args = parser.parse_args(argv)
    setup_logging()
    out_file = None
    try:
        for spec in args.inputs:  # fail before loading the model when an input is missing
            if not Path(spec).exists():
                raise FileNotFoundError(f"input {spec} does not exist (give image files, folders or shard sets)")
        if args.threshold_from:
            threshold, source = threshold_from_file(args.threshold_from)
        else:
            threshold = 0.5 if args.threshold is None else args.threshold
            source = "default" if args.threshold is None else "--threshold"
        model, tokenizer = IFASModel.from_pretrained(args.model, dtype=inference_dtype(device()))
        model.to(device()).eval()
        out_file = open(args.out, "w") if args.out else None
        count = 0
        for items in batches(iter_inputs(args.inputs), args.batch_size):
            crops = [crop_face(it.image, model.arch.image_size) if args.face_crop else (it.image, None) for it in items]
            preds = predict_batch(
                model, tokenizer, [c for c, _ in crops], threshold, not args.no_explain, args.max_new_tokens
            )
            for it, (_, box), (score, judgment, text) in zip(items, crops, preds):
                record = {
                    "path": it.path,
                    "judgment": judgment,
                    "score": score,
                    "threshold": threshold,
                    "threshold_source": source,
                    "explanation": text,
                    **it.meta,
                }
                if args.face_crop:
                    record["face_box"] = box  # normalised [x, y, w, h] in the input image; None: no face found
                if out_file is not None:
                    out_file.write(json.dumps(record) + "\n")
                if args.jsonl:
                    print(json.dumps(record), flush=True)
                elif out_file is None:
                    print(
                        f"{record['path']}: {judgment} (score {score:.3f}, threshold {threshold:.3f}) {text}",
                        flush=True,
                    )
                count += 1
        log.info("%d predictions%s", count, f" written to {args.out}" if args.out else "")
    except (ModelLoadError, FileNotFoundError, UnidentifiedImageError, ShardSetError, ValueError, OSError) as exc:
        print(f"ifas-predict: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if out_file is not None:
            out_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
