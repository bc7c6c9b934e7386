"""The composed model: tiny preset, LLaVA / vision+LLM checkpoint directories, save/load, split invariance."""
import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tests.helpers import save_image_processor
from trainer.config import ModelConfig
from trainer.data import collate
from trainer.model.build import build_model
from trainer.model.ifas import IFASModel
from trainer.sample import INTERPRETATION, JUDGMENT
from trainer.sample.prompt import PromptBuilder
from trainer.sample.tokenizer import TokenizerError, build_demo_tokenizer, load_tokenizer

INPUTS = ("input_ids", "attention_mask", "pixel_values", "score_positions", "labels", "label_groups")


def make_batch(model, tok, n, seed=0, image_size=None):
    g = torch.Generator().manual_seed(seed)
    builder = PromptBuilder(tok, model.num_image_tokens, 160)
    size = image_size or model.arch.image_size
    captions = ["screen moire and glare", "natural skin", "halftone dots on paper with faded colours", "mask seams"]
    samples = []
    for i in range(n):
        enc = builder.encode(i % 2 == 0, captions[i % 4] * (1 + i % 3))
        samples.append({"input_ids": enc.input_ids, "labels": enc.labels, "label_groups": enc.label_groups,
                        "score_position": enc.score_position, "pixel_values": torch.randn(3, size, size, generator=g),
                        "live": int(i % 2 == 0), "key": f"k{i}", "meta": {}})
    return collate(samples, tok.pad_token_id)


def forward(model, batch, **kw):
    return model(**{k: batch[k] for k in INPUTS}, **kw)


@pytest.fixture(scope="module")
def tiny(demo_tokenizer):
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny"), demo_tokenizer)


def test_save_and_load_gives_same_scores(tiny, tmp_path):
    model, tok = tiny
    batch = make_batch(model, tok, 3)
    model.eval()
    before = forward(model, batch)
    model.save_pretrained(tmp_path / "m", tok)
    loaded, tok2 = IFASModel.from_pretrained(tmp_path / "m")
    loaded.eval()
    after = forward(loaded, batch)
    torch.testing.assert_close(after.scores, before.scores, rtol=0, atol=0)
    torch.testing.assert_close(after.loss.total, before.loss.total, rtol=0, atol=0)
    assert tok2.get_vocab() == tok.get_vocab()


def test_score_is_yes_no_softmax_at_answer_start(tiny):
    model, tok = tiny
    model.eval()
    batch = make_batch(model, tok, 2)
    out = forward(model, batch)
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["pixel_values"])[0]
        hidden = model.llm.base_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
        logits = model.llm.lm_head(hidden)
    for b in range(2):
        row = logits[b, batch["score_positions"][b]]
        expected = torch.softmax(row[[model.arch.yes_token_id, model.arch.no_token_id]], -1)[0]
        assert out.scores[b].item() == pytest.approx(expected.item(), abs=1e-5)


def test_split_invariance_of_the_gradient(tiny):
    """A global batch of 4 as 1x4, 2 ranks x 2 (averaged like DeepSpeed) and 2 micro-steps x 2."""
    model, tok = tiny
    model.train()
    batch = make_batch(model, tok, 4)

    def sub(idx):
        return {k: (v[idx] if torch.is_tensor(v) else [v[i] for i in idx]) for k, v in batch.items()}

    n_j = float((batch["label_groups"] == JUDGMENT).sum())
    n_i = float((batch["label_groups"] == INTERPRETATION).sum())

    def grads(pieces, scale):
        model.zero_grad()
        total = 0.0
        for idx in pieces:
            out = forward(model, sub(idx), n_judgment=n_j, n_interpretation=n_i)
            (out.loss.total * scale / len(pieces)).backward()  # DeepSpeed averages the pieces
            total += out.loss.total.item()
        return total, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()

    whole, g_whole = grads([[0, 1, 2, 3]], 1)
    ranks, g_ranks = grads([[0, 1], [2, 3]], 2)
    micro, g_micro = grads([[0, 2], [1, 3]], 2)
    assert ranks == pytest.approx(whole, abs=1e-5) and micro == pytest.approx(whole, abs=1e-5)
    torch.testing.assert_close(g_ranks, g_whole, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g_micro, g_whole, atol=1e-5, rtol=1e-4)


def test_siglip_encoder_pools_by_mean(demo_tokenizer):
    model, tok = build_model(ModelConfig(preset="tiny-siglip"), demo_tokenizer)
    assert model.arch.pooling == "mean" and not model.arch.has_class_token
    assert model.num_image_tokens == 64 + model.gac.num_tokens  # every SigLIP token is a patch
    out = forward(model, make_batch(model, tok, 2))
    assert torch.isfinite(out.loss.total)


def assert_same_weights(ours, theirs):
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == ref.keys() and len(ref) > 0
    for key, value in ref.items():
        torch.testing.assert_close(mine[key], value, rtol=0, atol=0, msg=key)


def _tiny_vision_text(vocab):
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    text = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    return vision, text


def test_build_from_llava_checkpoint_dir(demo_tokenizer, tmp_path):
    vision, text = _tiny_vision_text(len(demo_tokenizer))
    torch.manual_seed(1)
    llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                      image_token_index=demo_tokenizer.convert_tokens_to_ids("<image>")))
    llava.save_pretrained(tmp_path / "llava")
    demo_tokenizer.save_pretrained(tmp_path / "llava")
    save_image_processor(tmp_path / "llava", vision.image_size)
    model, tok = build_model(ModelConfig(path=str(tmp_path / "llava")))
    assert_same_weights(model.vision, llava.model.vision_tower)
    assert_same_weights(model.projector, llava.model.multi_modal_projector)
    assert_same_weights(model.llm.model, llava.model.language_model)
    assert_same_weights(model.llm.lm_head, llava.lm_head)
    assert model.arch.vision_feature_layer == llava.config.vision_feature_layer
    out = forward(model, make_batch(model, tok, 2))
    assert torch.isfinite(out.loss.total) and out.scores.shape == (2,)


def test_build_from_vision_and_llm_dirs(demo_tokenizer, tmp_path):
    vision_cfg, text_cfg = _tiny_vision_text(len(demo_tokenizer))
    torch.manual_seed(2)
    vision, llm = CLIPVisionModel(vision_cfg), Qwen2ForCausalLM(text_cfg)
    vision.save_pretrained(tmp_path / "vision")
    llm.save_pretrained(tmp_path / "llm")
    demo_tokenizer.save_pretrained(tmp_path / "llm")
    model, tok = build_model(ModelConfig(vision_path=str(tmp_path / "vision"), llm_path=str(tmp_path / "llm")))
    assert_same_weights(model.vision, vision)
    assert_same_weights(model.llm, llm)
    out = forward(model, make_batch(model, tok, 2))
    assert torch.isfinite(out.loss.total)


def test_tokenizer_with_multi_token_yes_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.train_from_iterator(["a b c"], trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>").save_pretrained(tmp_path / "tok")
    with pytest.raises(TokenizerError, match="'Yes' as 3 tokens"):
        load_tokenizer(tmp_path / "tok")


def test_demo_tokenizer_has_single_token_judgments():
    tok = build_demo_tokenizer(["a photo of a face"] * 10)
    assert len(tok.encode("Yes", add_special_tokens=False)) == 1
    assert len(tok.encode("No", add_special_tokens=False)) == 1


def test_projector_merges_square_neighbourhoods():
    from trainer.model.projector import Projector

    proj = Projector(vision_dim=1, text_dim=4, merge=2)
    proj.act = torch.nn.Identity()
    with torch.no_grad():
        for lin in (proj.linear_1, proj.linear_2):
            lin.weight.copy_(torch.eye(4))
            lin.bias.zero_()
    grid = torch.arange(16.0).view(1, 16, 1)  # a 4x4 grid of patch indices, row-major
    out = proj(grid)
    assert out.shape == (1, 4, 4)
    assert out[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_merged_tiny_model_uses_fewer_image_tokens(demo_tokenizer):
    model, tok = build_model(ModelConfig(preset="tiny", projector_merge=2), demo_tokenizer)
    assert model.num_image_tokens == 16 + model.gac.num_tokens
    out = forward(model, make_batch(model, tok, 2))
    assert torch.isfinite(out.loss.total)


def test_fused_loss_matches_reference(tiny):
    model, tok = tiny
    model.train()
    batch = make_batch(model, tok, 3)

    def run(fused):
        model.use_kernels(fused)
        model.zero_grad()
        out = forward(model, batch, n_judgment=5, n_interpretation=40)
        out.loss.total.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return out, grads

    ref, ref_grad = run(False)
    fused, fused_grad = run(True)
    model.use_kernels(False)
    for a, b in zip(fused.loss, ref.loss):
        assert a.item() == pytest.approx(b.item(), rel=1e-5)
    torch.testing.assert_close(fused_grad, ref_grad, atol=1e-6, rtol=1e-4)
    # the judgment logits (scores) read from the fused loss's head are the unfused path's
    torch.testing.assert_close(fused.judgment_logits, ref.judgment_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.scores, ref.scores, atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(demo_tokenizer):
    torch.manual_seed(3)
    plain, tok = build_model(ModelConfig(preset="tiny", projector_merge=2), demo_tokenizer)
    torch.manual_seed(3)
    ckpt, _ = build_model(ModelConfig(preset="tiny", projector_merge=2, gradient_checkpointing=["vision", "llm"]),
                          demo_tokenizer)
    assert ckpt.llm.is_gradient_checkpointing and ckpt.vision.is_gradient_checkpointing
    batch = make_batch(plain, tok, 2)
    grads = []
    for model in (plain, ckpt):
        model.train()
        forward(model, batch).loss.total.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
