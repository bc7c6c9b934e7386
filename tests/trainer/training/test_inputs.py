"""What --check catches before any weight is loaded: the sequence budget of data.max_length, from
the checkpoint's configs alone (a LLaVA checkpoint shaped like llava-interleave's SigLIP-384/14,
saved here with the real classes)."""
from __future__ import annotations

import pytest

from tests.helpers import save_image_processor


@pytest.fixture(scope="module")
def siglip_llava(tmp_path_factory, demo_tokenizer):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                image_size=384, patch_size=14)  # 27 x 27 patches, as SigLIP-so400m-384
    text = Qwen2Config(vocab_size=len(demo_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1)
    out = tmp_path_factory.mktemp("llava_siglip")
    LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                              image_token_index=demo_tokenizer.convert_tokens_to_ids("<image>"),
                                              vision_feature_select_strategy="full")  # no class token to drop
                                  ).save_pretrained(out)
    demo_tokenizer.save_pretrained(out)
    save_image_processor(out, vision.image_size, siglip=True)
    return out


def test_check_refuses_a_max_length_the_image_tokens_do_not_fit(siglip_llava, small_shards, capsys):
    from trainer.cli.train import main

    common = ["--check", f"model.llava_path={siglip_llava}", f"data.train_shards=[{small_shards['domain_a']}]"]
    assert main([*common, "data.max_length=256"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ifas-train: error:")]
    image_tokens = 27 * 27 + 4 + 3  # projector tokens + GAC prefix queries + one per vision layer
    assert len(err) == 1 and f"data.max_length=256 is too short: {image_tokens} image tokens" in err[0]
    needed = int(err[0].split("set data.max_length to at least ")[1].split(",")[0])
    assert needed > image_tokens
    assert main([*common, f"data.max_length={needed}"]) == 0


def test_the_shipped_real_run_configs_fit_their_checkpoints_image_tokens():
    from trainer.config import load_config

    for name in ("ocim_cim_to_o", "ocim_oci_to_m", "ocim_ocm_to_i", "ocim_oim_to_c", "one_to_eleven"):
        cfg = load_config(f"launch/configs/{name}.yaml", [])
        # llava-interleave-qwen-0.5b: SigLIP-so400m-384/14 (27 layers): 729 + 4 + 27 image tokens
        assert cfg.data.max_length >= 760 + 64, name
