"""The benchmark's arithmetic and report (no timing is asserted)."""

from trainer.bench.report import scaling_table, section


def fake_result(ws, step, bare, mem):
    rank = {"step_s": step, "bare_step_s": bare, "data_wait_frac": 0.01,
            "phases_s": {"forward": 0.1, "backward": 0.2, "optimizer_step": 0.05, "comm_counts": 0.001},
            "loader_samples_per_s": 400.0, "consumed_samples_per_s": 16 / step,
            "zero3_bytes": {"total": mem}, "flops_per_sample": 1e9, "matmul_peak_flops": 1e11}
    return {"world_size": ws, "micro_batch_size": 16, "grad_accum": 1, "steps": 5, "params": 1_500_000,
            "device": "cpu", "step_s": step, "bare_step_s": bare, "samples_per_s": ws * 16 / step,
            "tokens_per_s": 1000.0, "per_rank": [rank] * ws, "efficiency_ratio": step / bare,
            "data_headroom": 400.0 / (16 / step), "data_wait_frac": 0.01,
            "achieved_flops_per_rank": 16 / step * 1e9, "mfu_vs_matmul_peak": 16 / step * 1e9 / 1e11}


def test_section_reports_targets_and_ratios(tmp_path):
    text = section([fake_result(1, 0.2, 0.19, 100), fake_result(2, 0.3, 0.2, 50)], "python -m trainer.bench",
                    "launch/configs/demo.yaml")
    assert "| trainer step <= 1.10x bare | 1 | 1.05x | pass |" in text
    assert "| trainer step <= 1.10x bare | 2 | 1.50x | FAIL |" in text
    assert "| ZeRO-3 bytes per rank at ws 2 <= 0.55x ws 1 | 2 | 0.50x | pass |" in text
    assert "not measured (no GPU in this run)" in text


def test_scaling_on_paper_arithmetic():
    table = scaling_table(0.2, 1e9)
    # 2B params x 18 bytes over 8 GPUs = 4.5e9 bytes = 4.2 GiB per GPU
    assert "| 2B | 8 | 4.2 GiB |" in table
    assert "| 8B | 64 | 2.1 GiB |" in table  # 8e9 x 18 / 64 = 2.25e9 bytes
    # compute: 6 * 2e9 * 16384 tokens / (989e12 * 0.45) = 0.44 s
    assert "| 0.44 s |" in table


def test_scale_rehearsal_section_judges_the_ratio_and_shows_a_run_that_died():
    from trainer.bench.scale import section as scale_section

    checkpoint = {"parameters": 572_530_304, "largest_tensor": 136_134_656, "bytes": 1 << 30}
    run = {"first_step_s": 60.0, "wall_s": 200.0}
    bf16 = {**run, "precision": "bf16"}  # recorded before the runs said their gradient dtype: bf16 gradients
    fp32_grads = {**bf16, "grad_dtype": "fp32"}
    results = {
        "before": {"checkpoint": checkpoint, "runs": [{"world_size": 1, "peak_rss_mb": 19000.0, **run},
                                                      {"world_size": 2, "error": "killed by the OOM killer"}]},
        "bf16": {"checkpoint": checkpoint, "runs": [{"world_size": 1, "peak_rss_mb": 10000.0, **bf16},
                                                    {"world_size": 2, "peak_rss_mb": 5500.0, **bf16}]},
        "after": {"checkpoint": checkpoint, "runs": [{"world_size": 1, "peak_rss_mb": 10500.0, **fp32_grads},
                                                     {"world_size": 2, "peak_rss_mb": 5800.0, **fp32_grads}]},
    }
    text = scale_section(results, "python -m trainer.bench --scale")
    # no precision: fp32 parameters and gradients
    assert "| before | fp32 / fp32 | 2 | did not finish: killed by the OOM killer |" in text
    assert "| bf16 | bf16 / bf16 | 2 |" in text and "| 0.55 (pass) |" in text
    assert "bf16: 4.39 GiB measured" in text  # (10000 - 5500) / 1024
    # the states predicted in the dtypes each run's ranks held
    assert "(16 bytes per parameter: bf16 parameters, bf16 gradients; halved)" in text
    assert "(18 bytes per parameter: bf16 parameters, fp32 gradients; halved)" in text


def test_a_real_width_section_names_its_model_and_dtype_without_the_demo_notes():
    big = [{**fake_result(ws, 20.0, 18.5, 100 / ws), "params": 590_000_000, "dtype": "bfloat16",
            "threads_per_rank": 2 // ws} for ws in (1, 2)]
    text = section(big, "python -m trainer.bench --model rehearsal", "the rehearsal", paper=False)
    assert "Model: I-FAS of the rehearsal (590.00M parameters)" in text
    assert "world size 1: 2 thread(s) per rank, world size 2: 1 thread(s) per rank" in text
    assert "fp32 master weights" in text  # the bf16 bare step's recipe
    assert "| trainer step <= 1.10x bare | 1 | 1.08x | pass |" in text
    assert "Why the trainer/bare target fails here" not in text  # the tiny model's explanation
    assert "Scaling on paper" not in text
