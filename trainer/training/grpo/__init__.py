"""The GRPO stage after supervised fine-tuning (``train.stage=grpo``, docs/architecture.md "GRPO stage"):
rewards.py scores sampled answers, rollout.py samples them under ZeRO-3, objective.py is the clipped
policy-ratio loss with a KL to the reference, step.py one optimizer step, loop.py the run."""
