"""The fused LM-head loss under a real 2-rank DeepSpeed ZeRO-3 run (CPU, gloo) vs the reference loss.

The test starts two ranks of this same file (``python tests/kernels/test_zero3.py --worker DIR``).
Each rank trains a tiny LM (embedding, two layers, nn.Linear head with bias) for a few steps with
ZeRO-3 and torch AdamW, once with the reference loss (full logits through the head +
kernels.weighted_ce_reference) and once with kernels.FusedLMHeadLoss; per-step losses and
the consolidated updated weights must agree to 1e-5.

Each micro-step also counts how often the head's weight is gathered, with ZeRO told to keep nothing
gathered beyond its next use. In the first micro-step, before ZeRO has traced the order of the modules,
each use gathers it: forward and backward (2) with the judgment logits read from the fused loss's
gathered head (``probe``), 3 with a head call of their own (the design ``probe`` replaced). Once
traced, the head stays gathered from the loss's forward to its backward: 1 per micro-step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

import kernels

ROOT = Path(__file__).resolve().parents[2]
VOCAB, HIDDEN, BATCH, SEQ, WORLD = 61, 16, 2, 12, 2
GRAD_ACCUM, MICRO_STEPS = 2, 6  # 3 optimizer steps; accumulation makes DeepSpeed scale the loss
# fused: gradients computed in forward; fused_recompute: computed in backward (weight re-gathered);
# fused_own_probe: the judgment logits from a head call of their own, not the fused loss's probe
VARIANTS = ("reference", "fused", "fused_recompute", "fused_own_probe")
FIRST_HEAD_GATHERS = {"reference": 2, "fused": 2, "fused_recompute": 2, "fused_own_probe": 3}  # then 1 each
JUDGMENT_COLUMNS = (3, 5)
ALPHA = 0.7


class TinyLM(nn.Module):
    def __init__(self, fused: bool, own_probe: bool = False) -> None:
        super().__init__()
        self.own_probe = own_probe
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh())
        self.head = nn.Linear(HIDDEN, VOCAB)
        self.fused_loss = None
        if fused:
            self.fused_loss = kernels.FusedLMHeadLoss(self.head, backend="torch", chunk_size=5)

    def forward(self, tokens, targets, weights, groups):
        hidden = self.layers(self.embed(tokens))
        columns = torch.tensor(JUDGMENT_COLUMNS)
        if self.fused_loss is not None:
            if self.own_probe:
                with torch.no_grad():  # read out, as scores are
                    self.head(hidden[:, 0])[:, columns]
                return self.fused_loss(hidden, targets, weights, groups).loss
            return self.fused_loss(hidden, targets, weights, groups, probe=(hidden[:, 0], columns)).loss

        logits = self.head(hidden)
        return kernels.weighted_ce_reference(
            logits.reshape(-1, VOCAB), targets.reshape(-1), weights.reshape(-1), groups.reshape(-1)
        )


def make_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens, targets, groups of one rank's micro-batch: prompt (0), judgment (1), caption (2), pad (0)."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    groups = torch.zeros(BATCH, SEQ, dtype=torch.long)
    for b in range(BATCH):
        start = int(torch.randint(2, 5, (1,), generator=gen))
        n_caption = int(torch.randint(0, SEQ - start - 1, (1,), generator=gen))
        groups[b, start] = 1
        groups[b, start + 1 : start + 1 + n_caption] = 2
    if step == 1 and rank == 1:
        groups[:] = 0  # a micro-batch with no supervised token at all on one rank
    targets[groups == 0] = -100
    return tokens, targets, groups


def count_frees() -> Counter:
    """Frees of a gathered ZeRO-3 parameter by ``ds_id``, from now on: one per gather, as every gather
    is released within its micro-step when ZeRO keeps nothing gathered between uses."""
    from deepspeed.runtime.zero import partition_parameters

    frees: Counter = Counter()
    free = partition_parameters.free_param

    def counting_free(param):
        frees[param.ds_id] += 1
        return free(param)

    partition_parameters.free_param = counting_free
    return frees


def worker(out_dir: Path) -> None:
    import deepspeed

    from trainer.model.loss import group_counts, lopsided_token_weights

    rank = int(os.environ["RANK"])
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no 28 s g++ build on CPU
    deepspeed.init_distributed(dist_backend="gloo")
    config = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": GRAD_ACCUM,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True}},
        # threshold 0: even tiny parameters are partitioned, so the head really is a shard; reuse distance 0:
        # a parameter stays gathered only into a use that immediately follows (the gathers counted)
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0},
        "steps_per_print": 10**9,
    }
    frees = count_frees()
    for variant in VARIANTS:
        torch.manual_seed(0)
        model = TinyLM(fused=variant != "reference", own_probe=variant == "fused_own_probe")
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        assert model.head.weight.numel() == 0, "the head weight should be a ZeRO-3 shard outside forward"
        losses, grads, head_gathers = [], [], []
        for step in range(MICRO_STEPS):
            frees_before = frees[model.head.weight.ds_id]
            # weights normalised over the global batch (all ranks), as the trainer does
            all_groups = torch.cat([make_batch(step, r)[2].reshape(-1) for r in range(WORLD)])
            n_j, n_i = group_counts(all_groups)
            tokens, targets, groups = make_batch(step, rank)
            weights = lopsided_token_weights(groups, ALPHA, n_j, n_i)
            parts = engine(tokens, targets, weights, groups)
            loss = parts.total
            if variant == "fused_recompute":
                # A gradient into a part makes the op recompute in backward, where it needs the
                # weight again: ZeRO-3 must have re-gathered it.
                loss = loss + 0.0 * parts.judgment
            engine.backward(loss)
            # Adam hides a wrongly scaled gradient: compare the (accumulated) gradients themselves.
            grads.append({n: deepspeed.utils.safe_get_full_grad(p).clone() for n, p in model.named_parameters()})
            engine.step()
            head_gathers.append(frees[model.head.weight.ds_id] - frees_before)
            losses.append([float(p) for p in parts])
        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params):
            state = {name: p.detach().clone() for name, p in model.named_parameters()}
        record = {"losses": losses, "grads": grads, "state": state, "head_gathers": head_gathers}
        torch.save(record, out_dir / f"{variant}_rank{rank}.pt")
        engine.destroy()


@pytest.mark.slow
@pytest.mark.timeout(170)
def test_fused_loss_under_zero3_matches_reference(tmp_path: Path) -> None:
    from trainer.dist import free_port  # here, not at the top: the ranks run this file as a script

    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(WORLD),
            LOCAL_WORLD_SIZE=str(WORLD),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        )
        env.pop("TRITON_INTERPRET", None)
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", str(tmp_path)],
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    try:
        for proc, _ in procs:
            proc.wait(timeout=150)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
            log.close()
    for rank, (proc, _) in enumerate(procs):
        assert proc.returncode == 0, (tmp_path / f"rank{rank}.log").read_text()[-4000:]

    for rank, variant in ((r, v) for r in range(WORLD) for v in VARIANTS):
        gathers = torch.load(tmp_path / f"{variant}_rank{rank}.pt")["head_gathers"]
        expected = [FIRST_HEAD_GATHERS[variant]] + [1] * (MICRO_STEPS - 1)
        assert gathers == expected, f"{variant}: head gathers per micro-step"
    for rank, variant in ((r, v) for r in range(WORLD) for v in VARIANTS[1:]):
        ref = torch.load(tmp_path / f"reference_rank{rank}.pt")
        fused = torch.load(tmp_path / f"{variant}_rank{rank}.pt")
        torch.testing.assert_close(torch.tensor(fused["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-6)
        for step, (g_ref, g_fused) in enumerate(zip(ref["grads"], fused["grads"])):
            for name, value in g_ref.items():
                torch.testing.assert_close(
                    g_fused[name], value, rtol=1e-5, atol=1e-7, msg=f"{variant}: grad {name} step {step}"
                )
        assert ref["state"].keys() == fused["state"].keys()
        for name, value in ref["state"].items():
            assert value.numel() > 0
            torch.testing.assert_close(fused["state"][name], value, rtol=1e-5, atol=1e-5, msg=f"{variant}: {name}")
    # the run really trained the head (else equal weights would prove nothing)
    torch.manual_seed(0)
    init = TinyLM(fused=False).head.weight
    assert (ref["state"]["head.weight"] - init).abs().max() > 1e-3


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    from trainer.dist import finish_process, shutdown_distributed

    worker(Path(sys.argv[2]))
    shutdown_distributed()
    sys.exit(finish_process(0))  # past gloo's teardown abort at interpreter exit (trainer/dist.py)
