"""The fused LM-head loss in real training: 2 ZeRO-3 ranks on CPU, a LLaVA checkpoint with tied
embeddings (as Qwen2-0.5B ties them) built partitioned, bf16, activation checkpointing in the vision
tower and the LLM; against the same runs with the unfused loss (logits + cross entropy)."""
from __future__ import annotations

import pytest

from tests.helpers import train_history
from tests.trainer.model.test_pretrained import save_llava
from tests.trainer.training.test_train_e2e import run_train


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fused_loss_equals_unfused_with_tied_embeddings_bf16_and_checkpointing(small_shards, demo_tokenizer,
                                                                              tmp_path):
    llava = save_llava(tmp_path / "llava", demo_tokenizer, tied=True)
    assert llava.lm_head.weight is llava.model.language_model.embed_tokens.weight
    common = [f"model.llava_path={tmp_path / 'llava'}", "model.projector_merge=1", "train.precision=bf16",
              "model.gradient_checkpointing=[vision,llm]", "train.max_steps=2", "eval.at_end=false",
              "optim.lr=1e-3"]
    losses = {}
    for fused in (True, False):
        out = tmp_path / f"fused_{fused}"
        proc = run_train(small_shards, out, *common, f"model.fused_kernels={str(fused).lower()}")
        assert "use_reentrant" not in proc.stderr  # checkpointing ran without complaints
        losses[fused] = train_history(out)
    assert sorted(losses[True]) == [1, 2]
    for step, unfused in losses[False].items():
        # bf16 weights and activations: the two losses differ only by rounding (fp32 accumulation in both)
        assert losses[True][step] == pytest.approx(unfused, rel=2e-2), step
    assert losses[True][2] != losses[True][1]  # it trained
