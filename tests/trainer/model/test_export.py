"""Export without two copies of the model: safetensors written tensor by tensor (sharded above a size),
read back exactly; and a real 2-rank ZeRO-3 checkpoint consolidated that way."""
from __future__ import annotations

import json
import weakref

import pytest
import torch

from trainer.model.arch import ArchConfig
from trainer.model.build import preset_configs
from trainer.model.ifas import IFASModel
from trainer.model.weights import INDEX_NAME, WEIGHTS_NAME, WeightsError, load_weights, verify_weights, write_weights


def tiny_model(tied: bool, seed: int = 0) -> IFASModel:
    torch.manual_seed(seed)
    vision, text = preset_configs("tiny", 300)
    text.tie_word_embeddings = tied
    return IFASModel(vision, text, ArchConfig(image_token_id=1, yes_token_id=2, no_token_id=3))


def skeleton_of(model: IFASModel) -> IFASModel:
    with torch.device("meta"):
        return IFASModel.from_config_dict(model.config_dict())


class LiveBytes:
    """Tensor-likes over a state dict that count the bytes materialised and still alive."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.live = self.peak = 0
        by_storage: dict[int, LiveBytes._Lazy] = {}  # tied names share one object, as in DeepSpeed's reader
        self.items = {name: by_storage.setdefault(t.data_ptr(), self._Lazy(self, t)) for name, t in state.items()}

    class _Lazy:
        def __init__(self, owner: "LiveBytes", t: torch.Tensor) -> None:
            self.owner, self.t, self.shape, self.dtype = owner, t, t.shape, t.dtype

        def contiguous(self) -> torch.Tensor:
            out = self.t.detach().clone()
            n = out.numel() * out.element_size()
            self.owner.live += n
            self.owner.peak = max(self.owner.peak, self.owner.live)
            weakref.finalize(out, self.owner._release, n)
            return out

    def _release(self, n: int) -> None:
        self.live -= n


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("tied", [False, True])
def test_sharded_write_holds_one_shard_and_reads_back_exactly(tied, tmp_path):
    src = tiny_model(tied)
    state = src.state_dict()
    lazy = LiveBytes(state)
    limit = 300_000
    files = write_weights(skeleton_of(src), lazy.items, tmp_path, max_shard_bytes=limit)
    largest = max(t.numel() * t.element_size() for t in state.values())
    assert len(files) > 3 and (tmp_path / INDEX_NAME).is_file() and not (tmp_path / WEIGHTS_NAME).exists()
    assert lazy.peak <= max(limit, largest)  # never more than one shard materialised at once
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert sorted(set(index["weight_map"].values())) == [f.name for f in files]
    assert ("llm.lm_head.weight" in index["weight_map"]) is not tied  # a tied weight is stored once
    for f in files:
        assert f.stat().st_size <= max(limit, largest) + 64 * 1024  # + safetensors header

    dst = tiny_model(tied, seed=1)
    load_weights(dst, tmp_path)
    assert_same_weights(src, dst)
    if tied:
        assert dst.llm.lm_head.weight is dst.llm.model.embed_tokens.weight


def test_small_weights_stay_one_file_and_the_existing_loader_reads_them(tmp_path):
    from safetensors.torch import load_model, save_model

    src = tiny_model(tied=True)
    write_weights(skeleton_of(src), src.state_dict(), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [WEIGHTS_NAME]
    dst = tiny_model(tied=True, seed=1)
    load_model(dst, str(tmp_path / WEIGHTS_NAME))  # what IFASModel.from_pretrained uses today
    assert_same_weights(src, dst)

    # and the other way: a file written by safetensors' save_model (its own choice of tied name)
    save_model(src, str(tmp_path / WEIGHTS_NAME))
    dst = tiny_model(tied=True, seed=2)
    load_weights(dst, tmp_path)
    assert_same_weights(src, dst)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_weights_follow_the_umask_like_every_other_file(umask, tmp_path):
    import os

    old = os.umask(umask)
    try:
        model = tiny_model(tied=False)
        model.save_pretrained(tmp_path / "model", max_shard_size=300_000)
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    want = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert want == 0o666 & ~umask
    weights = sorted((tmp_path / "model").glob("*.safetensors"))
    assert len(weights) > 1 and {f.stat().st_mode & 0o777 for f in weights} == {want}


def test_mismatched_weights_are_refused_with_the_name(tmp_path):
    src = tiny_model(tied=False)
    state = src.state_dict()
    bad = dict(state)
    del bad["gac.queries" if "gac.queries" in bad else next(iter(bad))]
    with pytest.raises(WeightsError, match="missing"):
        write_weights(skeleton_of(src), bad, tmp_path)
    wrong = dict(state, **{"llm.lm_head.weight": torch.zeros(3, 3)})
    with pytest.raises(WeightsError, match=r"llm\.lm_head\.weight has shape \(3, 3\)"):
        write_weights(skeleton_of(src), wrong, tmp_path)

    write_weights(skeleton_of(src), state, tmp_path, max_shard_bytes="100KB")
    other = tiny_model(tied=True)  # untied weights hold two different tensors for one tied parameter
    with pytest.raises(WeightsError, match="which the model ties"):
        verify_weights(skeleton_of(other), tmp_path)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(WeightsError, match="shards that are missing"):
        load_weights(tiny_model(tied=False), tmp_path)


# ----- a real ZeRO-3 checkpoint (2 CPU ranks) -----


@pytest.fixture(scope="module")
def zero3_run(small_shards, tmp_path_factory):
    from tests.trainer.training.test_train_e2e import run_train

    out = tmp_path_factory.mktemp("export_run")
    run_train(small_shards, out, "train.max_steps=3", "train.save_every=3", "eval.at_end=false")
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero3_checkpoint_exports_sharded_and_loads_back_identical(zero3_run, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from trainer.cli.export import main
    from trainer.run_dir import RunDir
    from trainer.sample.tokenizer import load_tokenizer

    out = tmp_path / "sharded"
    assert main([str(zero3_run), "--out", str(out), "--max-shard-size", "500KB"]) == 0
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and (out / INDEX_NAME).is_file() and not (out / WEIGHTS_NAME).exists()
    config = json.loads((out / "ifas_config.json").read_text())
    model = IFASModel.from_config_dict(config)
    load_weights(model, out)
    reference = get_fp32_state_dict_from_zero_checkpoint(str(RunDir(zero3_run).checkpoints))
    got = model.state_dict()
    assert set(reference) <= set(got)
    for name, tensor in reference.items():
        assert torch.equal(got[name], tensor), name
    tok = load_tokenizer(out)
    assert tok.convert_tokens_to_ids("<image>") == config["arch"]["image_token_id"]

    # the default (weights under 5GB): one file, which IFASModel.from_pretrained reads as is
    single = tmp_path / "single"
    assert main([str(zero3_run), "--out", str(single)]) == 0
    assert not list(single.glob("model-*-of-*.safetensors"))
    loaded, _ = IFASModel.from_pretrained(single)
    for name, tensor in reference.items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_export_of_a_directory_that_is_no_run_is_one_error_line(tmp_path, capsys):
    from trainer.cli.export import main

    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ifas-export: error:") and "not a training output" in err[0]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bf16_export_scores_like_fp32_and_seeds_a_new_run(zero3_run, small_shards, tmp_path):
    from safetensors import safe_open

    from tests.trainer.model.test_ifas import forward, make_batch
    from tests.trainer.training.test_train_e2e import run_train
    from trainer.cli.export import main

    assert main([str(zero3_run), "--out", str(tmp_path / "fp32")]) == 0  # the run trained in fp32 (CPU)
    assert main([str(zero3_run), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    with safe_open(str(tmp_path / "bf16" / WEIGHTS_NAME), framework="pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}
    sizes = {d: (tmp_path / d / WEIGHTS_NAME).stat().st_size for d in ("fp32", "bf16")}
    assert sizes["bf16"] < 0.51 * sizes["fp32"]
    full, tok = IFASModel.from_pretrained(tmp_path / "fp32")
    half, _ = IFASModel.from_pretrained(tmp_path / "bf16")  # in the dtype it was saved in
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    batch = make_batch(full, tok, 4, seed=3)
    with torch.no_grad():
        scores_fp32, scores_bf16 = forward(full.eval(), batch).scores, forward(half.eval(), batch).scores
    assert scores_bf16.dtype == torch.float32  # the judgment softmax runs in fp32 whatever the weights
    torch.testing.assert_close(scores_bf16, scores_fp32, atol=3e-2, rtol=0)  # bf16 keeps ~3 significant digits
    assert not torch.equal(scores_bf16, scores_fp32)

    # a new run from the fp32 export: with lr 0 its first checkpoint holds exactly the export's weights
    seeded = tmp_path / "seeded"
    run_train(small_shards, seeded, f"model.init_from={tmp_path / 'fp32'}", "train.max_steps=1", "optim.lr=0",
              "eval.at_end=false")
    assert main([str(seeded), "--out", str(tmp_path / "again")]) == 0
    again, _ = IFASModel.from_pretrained(tmp_path / "again")
    assert_same_weights(again, full)
