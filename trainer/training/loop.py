"""The DeepSpeed ZeRO-3 training loop: ``train`` (one run), ``train_step`` (one optimizer step).

One step = ``train.grad_accum`` micro-batches per rank. Before the step, the judgment and
interpretation token counts of the whole global batch are summed over ranks, so the lopsided
loss is normalised globally and its gradient does not depend on the split of the batch.
The command around it is ``ifas-train`` (trainer/cli/train.py).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from shards.scf import captioner_prompt
from trainer.config import RunConfig
from trainer.data import (
    SKIP_REASONS,
    Augment,
    ImageTransform,
    SampleMaker,
    ShardStream,
    Source,
    StreamLayout,
    StreamState,
    make_loader,
    resolve_shards,
)
from trainer.data.batching import WORKER_START_METHOD
from trainer.dist import (
    WorldInfo,
    all_reduce_sum,
    device,
    gather_objects,
    init_distributed,
    world_info_from_env,
)
from trainer.eval.periodic import PeriodicEvaluator
from trainer.logs import MetricsWriter, log_system_scalars, setup_logging
from trainer.model.ifas import IFASModel
from trainer.model.loss import loss_alpha
from trainer.process import keep_host_heap_small
from trainer.run_dir import RunDir, tag_for
from trainer.sample import INTERPRETATION, JUDGMENT
from trainer.sample.prompt import PromptBuilder
from trainer.training.checkpoint import Checkpointer
from trainer.training.engine import build_engine
from trainer.training.inputs import held_out_dev
from trainer.training.stop import StopRequest
from trainer.training.timing import PhaseTimer, phase

log = logging.getLogger("ifas.train")

BATCH_TENSORS = ("input_ids", "attention_mask", "pixel_values", "score_positions", "labels", "label_groups")
# the collate's positions (trainer/sample/positions.py): carried where the batch has them, so the step needs no sync
BATCH_POSITIONS = ("image_positions", "supervised_rows")


class TrainingHalted(RuntimeError):
    """The run stopped itself (e.g. too many non-finite steps in a row) after saving."""


def model_inputs(batch: dict[str, Any], dev: torch.device) -> dict[str, torch.Tensor]:
    return {n: batch[n].to(dev, non_blocking=True) for n in BATCH_TENSORS + BATCH_POSITIONS if n in batch}


def train_step(
    engine,
    micro_batches: list[dict[str, Any]],
    dev: torch.device,
    alpha: float | None,
    world: int,
    timer: PhaseTimer | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches; returns [loss, judgment, interpretation]
    summed over them (this rank's share of the global-batch loss, detached, on the device) and this
    rank's [judgment, interpretation] token counts (on the host). ``timer`` (the benchmark's) records the
    phases."""
    groups = [mb["label_groups"] for mb in micro_batches]
    counts = torch.stack([sum((g == JUDGMENT).sum() for g in groups), sum((g == INTERPRETATION).sum() for g in groups)])
    with phase(timer, "comm_counts"):  # one small collective per step, kept on the device (no host sync)
        n_judgment, n_interp = all_reduce_sum(counts.to(dev, torch.float64, non_blocking=True))
    scale = world * len(micro_batches)
    parts = torch.zeros(3, dtype=torch.float64, device=dev)
    for mb in micro_batches:
        with phase(timer, "forward"):
            out = engine(**model_inputs(mb, dev), alpha=alpha, n_judgment=n_judgment, n_interpretation=n_interp)
        # DeepSpeed averages gradients over ranks and micro-steps; the loss is already a global
        # mean, so scale back up to make the update exactly its gradient.
        with phase(timer, "backward"):
            engine.backward(out.loss.total * scale)
        with phase(timer, "optimizer_step"):
            engine.step()
        parts += torch.stack(list(out.loss)).detach().double()
    return parts, counts


class LogWindow:
    """Sums over the steps since the last log line. The sums live in one float64 tensor on the
    device, so adding a step costs no host sync and logging costs one all-reduce."""

    FIELDS = (
        "loss",
        "part_judgment",
        "part_interpretation",
        "samples",
        "tokens",
        "judgment_tokens",
        "interpretation_tokens",
    )

    def __init__(self, dev: torch.device) -> None:
        self.sums = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=dev)
        self.reset()

    def reset(self) -> None:
        self.sums.zero_()
        self.steps = 0  # steps whose update was applied (skipped steps add no loss)
        self.seconds = 0.0
        self.wait_s = 0.0

    def add_step(self, loss_parts: torch.Tensor, samples: int, tokens: int, token_counts: torch.Tensor) -> None:
        """loss_parts: [loss, judgment, interpretation] on the device; token_counts: host [n_j, n_i]."""
        n_judgment, n_interp = token_counts.tolist()  # host tensor: no device sync
        self.sums[:3] += loss_parts
        self.sums[3] += samples
        self.sums[4] += tokens
        self.sums[5] += n_judgment
        self.sums[6] += n_interp
        self.steps += 1

    def totals(self) -> dict[str, float]:
        """The sums over every rank (collective)."""
        return dict(zip(self.FIELDS, all_reduce_sum(self.sums.clone()).cpu().tolist()))


def unweighted_parts(totals: dict[str, float], alpha: float | None) -> tuple[float, float]:
    """Judgment and interpretation parts of the summed loss as plain mean token CEs, so runs with
    another alpha (or the plain loss) compare."""
    part_j, part_i = totals["part_judgment"], totals["part_interpretation"]
    n_j, n_i = totals["judgment_tokens"], totals["interpretation_tokens"]
    if alpha is None:  # plain: each part is sum(CE) / (n_j + n_i) per step
        return (part_j * (n_j + n_i) / n_j if n_j else 0.0), (part_i * (n_j + n_i) / n_i if n_i else 0.0)
    return (part_j / alpha if alpha > 0 else 0.0), (part_i / (1 - alpha) if alpha < 1 else 0.0)


def save_then_evaluate(cfg: RunConfig, done: int, last_step: int, save: Callable[[int], None],
                       evaluator: PeriodicEvaluator | None, engine, checkpointer: Checkpointer) -> None:
    """After step ``done`` (SFT and GRPO alike): the periodic checkpoint, then the periodic held-out evaluation
    (collective: every rank runs it), whose best step's checkpoint is saved and kept out of keep_last pruning."""
    saved = done % cfg.train.save_every == 0 or done == last_step
    if saved:
        save(done)
    if evaluator is not None and done != cfg.train.max_steps and evaluator.maybe_run(engine, done) is not None:
        if evaluator.last_was_best:
            checkpointer.protected = {tag_for(done)}
            if not saved:
                save(done)


def _draws(cfg: RunConfig) -> list[tuple[str, str, float, str | None]]:
    """(name, shard-set path, weight, label) of the streams a mixed or balanced run draws from; [] = one set."""
    if not (cfg.data.mixed or cfg.data.balance):
        return []
    out = []
    for i, s in enumerate(cfg.data.train_sources()):
        name = f"{i}_{Path(s.path).name}"
        if cfg.data.balance:
            out += [(f"{name}_live", s.path, s.weight / 2, "live"), (f"{name}_spoof", s.path, s.weight / 2, "spoof")]
        else:
            out.append((name, s.path, s.weight, None))
    return out


def source_names(cfg: RunConfig) -> list[str]:
    """Names of the streams a mixed or balanced run draws from (TensorBoard data/source/<name>)."""
    return [name for name, *_ in _draws(cfg)]


def source_fractions(names: list[str], state: StreamState) -> dict[str, float]:
    """Share of the samples drawn so far from each source stream, over all ranks (collective)."""
    counts = state.source_counts() or [0] * len(names)
    totals = all_reduce_sum(torch.tensor([float(c) for c in counts], dtype=torch.float64)).tolist()
    return {name: c / max(sum(totals), 1.0) for name, c in zip(names, totals)}


def skipped_counts(state: StreamState) -> dict[str, int]:
    """Bad samples skipped so far, summed over ranks, per reason (collective)."""
    local = state.skipped_total()
    totals = all_reduce_sum(torch.tensor([float(local.get(r, 0)) for r in SKIP_REASONS], dtype=torch.float64))
    return {r: int(v) for r, v in zip(SKIP_REASONS, totals.tolist())}


def training_batches(
    cfg: RunConfig, train_urls: list[str], model: IFASModel, tokenizer, info: WorldInfo, state: StreamState,
    start_method: str = WORKER_START_METHOD,
):
    """(prompt builder, image transform, generator of this rank's training batches from ``state``: its ``close()``
    ends the loader workers); ``start_method``: how the workers start (trainer.data.batching)."""
    arch = model.arch
    caption_prompt = None
    if cfg.data.task == "caption":  # the prompt the exported captioner will be given (shards/scf.py)
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(RunDir(cfg.train.output_dir).processor))
        caption_prompt = captioner_prompt(processor, cfg.data.caption_prompt)
    builder = PromptBuilder(
        tokenizer, model.num_image_tokens, cfg.data.max_length, cfg.data.answer_style, caption_prompt,
        image_span=arch.image_span)
    transform = ImageTransform.for_model(arch)
    held_out = held_out_dev(cfg, train_urls)
    sources = [Source(tuple(resolve_shards([path])), weight, label) for _, path, weight, label in _draws(cfg)]
    if held_out and info.is_main:
        log.info("training skips %s of %d training shard(s): eval.dev_shards holds them out to fix the threshold",
                 f"the split={held_out.split!r} samples" if held_out.split else "every sample", len(held_out.shards))
    samples = SampleMaker(builder, transform, caption_source=cfg.data.caption_source, held_out=held_out,
                          augment=Augment(cfg.data.augment) if cfg.data.augment.enabled else None,
                          seed=cfg.train.seed)
    stream = ShardStream(train_urls, samples, StreamLayout(info.rank, info.world_size, cfg.data.num_workers),
                         batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed,
                         shuffle_buffer=cfg.data.shuffle_buffer, resume=state, sources=sources or None)
    if state.origin is not None:  # collective: every rank reports its share of the old epoch's rest
        left = gather_objects([stream.transition_length(r) for r in range(max(cfg.data.num_workers, 1))], info)
        if info.is_main:
            log.info("new layout: the samples the old ranks had not reached in their epoch come first, per rank and "
                     "loader worker: %s", json.dumps(left))
    return builder, transform, iter(make_loader(stream, tokenizer.pad_token_id, start_method))


def train(cfg: RunConfig, train_urls: list[str], eval_urls: list[str], tokenizer) -> dict[str, Any]:
    from tqdm import tqdm

    keep_host_heap_small()
    run = RunDir(cfg.train.output_dir)
    info = world_info_from_env()
    checkpointer = Checkpointer(run.checkpoints, cfg.train.keep_last, info.is_main)
    layout = {"world_size": info.world_size, "num_workers": cfg.data.num_workers}
    if cfg.train.resume:  # a checkpoint of another world size is converted before any collective is open
        checkpointer.prepare(layout, info)
    info = init_distributed(cfg.train.collective_timeout_s)
    setup_logging(info.rank, force=True)
    dev = device()
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    stop_request = StopRequest()

    saved_layout = checkpointer.saved_layout() if cfg.train.resume else None
    elastic = saved_layout is not None and saved_layout != layout  # resumed by another world size / workers
    model, tokenizer, engine, optimizer = build_engine(
        cfg, tokenizer, info, dev, load_universal=cfg.train.resume and checkpointer.needs_universal(layout))
    if info.is_main:
        run.preempted.unlink(missing_ok=True)

    start_step, stream_state = 0, StreamState()
    client = checkpointer.load(engine, layout) if cfg.train.resume else None
    if client is not None:
        start_step = client["step"]
        old = client["data"]
        if elastic:  # the old ranks' streams finish their epoch through a transition (trainer/data/stream.py)
            stream_state = StreamState.after_layout_change(old["streams"], old["num_workers"],
                                                           client["config"]["data"]["shuffle_buffer"], info.rank)
        else:
            stream_state = StreamState.from_state_dict(old["streams"][info.rank])
        log.info("resumed from step %d%s", start_step, f" (checkpoint of {old['world_size']} rank(s) x "
                 f"{max(old['num_workers'], 1)} worker(s))" if elastic else "")

    builder, transform, batches = training_batches(cfg, train_urls, model, tokenizer, info, stream_state)
    names = source_names(cfg)

    def save(step: int) -> None:
        client_state = {
            "step": step,
            "config": cfg.to_dict(),
            "data": {
                "world_size": info.world_size,
                "num_workers": cfg.data.num_workers,
                "streams": gather_objects(stream_state.state_dict(), info),
            },
        }
        checkpointer.save(engine, step, client_state, layout)

    writer = MetricsWriter(run.tensorboard if info.is_main else None)
    evaluator = (
        PeriodicEvaluator(
            cfg, {"held-out": eval_urls}, builder, transform, info, tokenizer.pad_token_id, writer, run.root,
            tokenizer=tokenizer,
        )
        if eval_urls
        else None
    )
    keys_log = None
    if cfg.train.log_sample_keys:
        run.sample_keys.mkdir(parents=True, exist_ok=True)
        keys_log = open(run.sample_keys / f"rank{info.rank}.jsonl", "a")
    alpha = loss_alpha(cfg.loss.mode, cfg.loss.alpha)  # None: the plain LM loss of the ablation
    gas, world = cfg.train.grad_accum, info.world_size
    history: list[dict[str, Any]] = []
    window = LogWindow(dev)
    skipped_steps, skipped_in_a_row = 0, 0
    bar = tqdm(total=cfg.train.max_steps, initial=start_step, disable=not info.is_main, desc="train", unit="step")
    engine.train()
    last_step = min(cfg.train.stop_at_step or cfg.train.max_steps, cfg.train.max_steps)
    done = start_step
    for step in range(start_step, last_step):
        if stop_request.requested():
            log.warning("stop requested by a signal: saving a checkpoint at step %d and exiting", done)
            save(done)
            if info.is_main:
                run.preempted.write_text(f"{done}\n")
            batches.close()
            return {"history": history, "preempted": True}
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(gas)]
        t_data = time.perf_counter()
        lr_used = [g["lr"] for g in optimizer.param_groups]  # the rates this step trains with
        step_parts, step_tokens = train_step(engine, micro, dev, alpha, world)
        for mb in micro:
            stream_state.update(mb["stream_pos"])
        done = step + 1
        # DeepSpeed skips an update whose gradient norm is not finite (the norm is all-reduced, so
        # every rank agrees); the flag is already on the host.
        if engine.optimizer.overflow:
            skipped_steps += 1
            skipped_in_a_row += 1
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", done, skipped_in_a_row)
            if skipped_in_a_row >= cfg.train.max_bad_steps:
                save(done)
                raise TrainingHalted(
                    f"{skipped_in_a_row} steps in a row had a non-finite loss or gradient (up to step {done}); "
                    f"saved a checkpoint. Lower optim.lr, check the data, or raise train.max_bad_steps"
                )
        else:
            skipped_in_a_row = 0
            tokens = sum(int(mb["attention_mask"].sum()) for mb in micro)  # CPU tensors: no device sync
            window.add_step(step_parts, gas * cfg.train.micro_batch_size, tokens, step_tokens)
        if keys_log is not None:
            keys_log.write(json.dumps({"step": done, "keys": [k for mb in micro for k in mb["keys"]]}) + "\n")
            keys_log.flush()
        window.seconds += time.perf_counter() - t0
        window.wait_s += t_data - t0
        bar.update(1)
        if done % cfg.train.log_every == 0 or done == last_step:
            totals = window.totals()
            n = max(window.steps, 1)
            ce_judgment, ce_interp = unweighted_parts(totals, alpha)
            rec = {
                "step": done,
                "loss": totals["loss"] / n,
                "loss_judgment": ce_judgment / n,
                "loss_interpretation": ce_interp / n,
                "lr": lr_used[0],
                "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "samples_per_s": totals["samples"] / window.seconds,
                "tokens_per_s": totals["tokens"] / window.seconds,
                "data_wait_frac": window.wait_s / window.seconds,
                "skipped_steps": skipped_steps,
                "skipped_samples": skipped_counts(stream_state),
                **({"source_fractions": source_fractions(names, stream_state)} if names else {}),
            }
            history.append(rec)
            lrs = {g.get("name", "group"): lr for g, lr in zip(optimizer.param_groups, lr_used)}
            log_system_scalars(writer, done, info, dev, lrs=lrs)  # memory per rank (collective), lr per group
            writer.train_window(rec, done)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", judg=f"{rec['loss_judgment']:.3f}")
            window.reset()
        save_then_evaluate(cfg, done, last_step, save, evaluator, engine, checkpointer)
    bar.close()
    stop_request.close()
    batches.close()  # the loader workers end here, not at the process's end
    if keys_log is not None:
        keys_log.close()

    result: dict[str, Any] = {"history": history}
    if evaluator is not None and cfg.eval.at_end and done == cfg.train.max_steps:
        result["eval"] = evaluator.run(engine, done, final=True)["held-out"]
    writer.close()
    if info.is_main:
        run.train_result.write_text(
            json.dumps({"history": history, "eval": result["eval"].as_dict() if "eval" in result else None}, indent=2)
        )
    return result
