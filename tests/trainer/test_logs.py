"""trainer.logs: the one TensorBoard writer, its tags read back by TensorBoard's own event reader."""

import pytest
import torch

from tests.helpers import tensorboard_events
from trainer.dist import WorldInfo
from trainer.logs import MetricsWriter, Tags, log_system_scalars


def test_log_system_scalars(tmp_path):
    writer = MetricsWriter(tmp_path)
    scalars = log_system_scalars(writer, 7, WorldInfo(0, 0, 1), torch.device("cpu"), data_wait_s=0.5, step_time_s=2.0,
                                 skipped={"bad_image": 3, "bad_json": 1}, lrs={"vision": 1e-4, "llm": 2e-4})
    writer.close()
    assert scalars["data/wait_frac"] == 0.25 and scalars["data/skipped/bad_image"] == 3.0
    assert scalars["memory/rss_mb/rank0"] > 10
    acc = tensorboard_events(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert {"memory/rss_mb/rank0", "memory/peak_rss_mb/rank0", "data/wait_s/rank0", "data/wait_frac",
            "data/skipped/bad_image", "data/skipped/bad_json", "lr/vision", "lr/llm"} <= tags
    assert acc.Scalars("lr/llm")[0].step == 7 and acc.Scalars("lr/llm")[0].value == pytest.approx(2e-4)


def test_train_window_writes_fields_and_skips_under_one_tag_scheme(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.train_window({"step": 25, "loss": 1.5, "lr": 3e-4, "grad_norm": float("nan"),
                         "skipped_samples": {"bad_image": 2, "corrupt_tar": 0}}, 25)
    writer.close()
    acc = tensorboard_events(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert tags == {Tags.train("loss"), Tags.train("lr"), Tags.skipped("bad_image"), Tags.skipped("corrupt_tar")}
    assert Tags.skipped("bad_image") == "data/skipped/bad_image"  # the same tag log_system_scalars writes
    assert acc.Scalars("train/loss")[0].step == 25 and acc.Scalars("data/skipped/bad_image")[0].value == 2


def test_inactive_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(None)  # a rank other than 0
    writer.scalars({"train/loss": 1.0}, 1)
    writer.image("x", torch.zeros(2, 2, 3).numpy(), 1)
    writer.text("x", "t", 1)
    writer.close()
    assert not writer.active and not any(tmp_path.iterdir())
