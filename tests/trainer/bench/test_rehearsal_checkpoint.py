"""The scale rehearsal's checkpoint is laid out as the release it imitates (llava-1.5-hf) and passes ``--check`` with
the run arguments the rehearsal and the real-width throughput benchmark use (trainer/bench/scale.py); saved here at
a tiny width, with the benchmark's own saver."""
from transformers import CLIPVisionConfig, Qwen2Config

from trainer.bench import scale
from trainer.cli.train import main
from trainer.config import ModelConfig
from trainer.model.build import build_model


def tiny_configs(vocab_size: int = 1024):
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=16)
    text = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return vision, text


def test_the_rehearsal_checkpoint_ships_its_processor_and_passes_the_check(small_shards, tmp_path, monkeypatch):
    monkeypatch.setattr(scale, "rehearsal_configs", tiny_configs)
    checkpoint = tmp_path / "checkpoint"
    info = scale.save_checkpoint(checkpoint, small_shards["domain_a"])
    assert (checkpoint / "preprocessor_config.json").is_file()  # as llava-1.5-7b-hf ships it
    model, _ = build_model(ModelConfig(path=str(checkpoint)))
    assert sum(p.numel() for p in model.parameters()) > info["parameters"]  # the checkpoint's, plus the GAC
    assert model.num_image_tokens > (28 // 14) ** 2  # the 4 patches, plus the GAC tokens
    run_args = scale.rehearsal_run_args(checkpoint, small_shards["domain_a"], tmp_path / "run")
    assert main(["--check", *run_args]) == 0
