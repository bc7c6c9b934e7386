"""The streaming pipeline: shard resolution errors, rank/worker splitting, determinism, resume."""
import itertools
import json

import pytest
import webdataset as wds

from tests.helpers import shard_stream
from trainer.data import ShardSetError, StreamState, make_loader, resolve_shards
from trainer.data import samples as samples_module
from trainer.sample import IGNORE_INDEX
from trainer.sample.prompt import PromptBuilder

N_IMAGE_TOKENS = 4


@pytest.fixture(scope="module")
def builder(demo_tokenizer):
    return PromptBuilder(demo_tokenizer, N_IMAGE_TOKENS, 96)


def stream(urls, builder, rank=0, world=1, workers=0, resume=None, batch=4, train=True, seed=0):
    s = shard_stream(urls, builder, rank=rank, world=world, workers=workers, batch_size=batch, seed=seed,
                     shuffle_buffer=8, train=train, resume=resume)
    return make_loader(s, builder.tokenizer.pad_token_id)


def keys_of(loader, n):
    return [b["keys"] for b in itertools.islice(iter(loader), n)]


def test_resolve_manifest_dir_glob_and_brace(small_shards):
    d = small_shards["domain_a"]
    from_dir = resolve_shards([str(d)])
    assert len(from_dir) == 3 and all(u.endswith(".tar") for u in from_dir)
    assert resolve_shards([str(d / "*.tar")]) == from_dir
    assert resolve_shards([str(d / "shard-{000000..000002}.tar")]) == from_dir


def test_missing_and_empty_shard_sets_are_refused(tmp_path):
    with pytest.raises(ShardSetError, match="does not exist"):
        resolve_shards([str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardSetError, match="holds no .tar shards"):
        resolve_shards([str(tmp_path / "empty")])
    with pytest.raises(ShardSetError, match="is empty"):
        resolve_shards([], "data.train_shards")


def test_batches_are_well_formed(small_shards, builder):
    batch = next(iter(stream(resolve_shards([str(small_shards["domain_a"])]), builder)))
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == batch["label_groups"].shape == batch["attention_mask"].shape
    for b in range(4):
        length = int(batch["attention_mask"][b].sum())
        assert (labels[b, length:] == IGNORE_INDEX).all()  # padding is never supervised
        judgment = labels[b, batch["score_positions"][b] + 1].item()
        assert judgment == (builder.yes_id if batch["live"][b] else builder.no_id)


def test_training_stream_is_deterministic_and_seeded(small_shards, builder):
    urls = resolve_shards([str(d) for d in small_shards.values()])
    assert keys_of(stream(urls, builder), 5) == keys_of(stream(urls, builder), 5)
    assert keys_of(stream(urls, builder, seed=1), 5) != keys_of(stream(urls, builder), 5)


@pytest.mark.parametrize("workers, consumed", [(0, 4), (2, 4), (2, 5), (3, 7)])
def test_resume_continues_exactly(small_shards, builder, workers, consumed, monkeypatch):
    urls = resolve_shards([str(d) for d in small_shards.values()])
    unbroken = keys_of(stream(urls, builder, workers=workers), consumed + 4)
    state = StreamState()
    for batch in itertools.islice(iter(stream(urls, builder, workers=workers)), consumed):
        state.update(batch["stream_pos"])
    saved = StreamState.from_state_dict(json.loads(json.dumps(state.state_dict())))  # as in a checkpoint
    decoded = []
    real_decode = samples_module.decode_sample
    monkeypatch.setattr(samples_module, "decode_sample",
                        lambda raw: decoded.append(raw["__key__"]) or real_decode(raw))
    resumed = keys_of(stream(urls, builder, workers=workers, resume=saved), 4)
    assert resumed == unbroken[consumed:]
    if workers == 0:  # (workers decode in other processes) nothing consumed before is decoded again
        assert set(decoded).isdisjoint(itertools.chain(*unbroken[:consumed]))


def test_ranks_split_shards_and_never_run_dry(small_shards, builder):
    """One shard set of 3 shards on 2 ranks x 2 workers (fewer shards than readers): both ranks
    keep producing batches, disjoint within a pass."""
    urls = resolve_shards([str(small_shards["domain_b"])])
    r0 = keys_of(stream(urls, builder, rank=0, world=2, workers=2), 20)  # 80 samples > 48 in the set
    r1 = keys_of(stream(urls, builder, rank=1, world=2, workers=2), 20)
    first0 = set(itertools.chain(*r0[:4]))
    first1 = set(itertools.chain(*r1[:4]))
    assert first0.isdisjoint(first1)


def test_eval_stream_covers_each_sample_once(small_shards, builder):
    urls = resolve_shards([str(small_shards["domain_d"])])
    seen = []
    for rank in range(2):
        for b in stream(urls, builder, rank=rank, world=2, train=False, batch=5):
            seen.extend(b["keys"])
    expected = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    assert sorted(seen) == sorted(expected) and len(seen) == 48


def test_manifest_listing_a_missing_shard_is_refused(small_shards, tmp_path):
    import shutil

    copy = tmp_path / "set"
    shutil.copytree(small_shards["domain_c"], copy)
    (copy / "shard-000001.tar").unlink()
    with pytest.raises(ShardSetError, match="shard-000001.tar which does not exist"):
        resolve_shards([str(copy)])
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ShardSetError, match="manifest.json"):
        resolve_shards([str(copy)])


def test_template_caption_source_swaps_in_the_attack_template(small_shards, builder):
    from shards.captions import template_caption

    urls = resolve_shards([str(small_shards["domain_a"])])
    s = shard_stream(urls, builder, batch_size=8, shuffle_buffer=8, caption_source="template")
    batch = next(iter(make_loader(s, builder.tokenizer.pad_token_id)))
    own = {r["__key__"]: json.loads(r["json"]) for r in wds.WebDataset(urls, shardshuffle=False)}
    swapped = 0
    for b, key in enumerate(batch["keys"]):
        meta = own[key]
        template = template_caption(meta["attack"], key)
        expected, _ = builder.answer_ids(meta["label"] == "live", template)
        assert batch["labels"][b][batch["labels"][b] != IGNORE_INDEX].tolist() == expected
        swapped += template != meta["caption"]
    assert swapped > 0  # the synthetic shards' own captions differ: the swap is visible


def test_batches_are_the_same_through_a_worker(small_shards, builder):
    """The integer fields cross from the worker packed in one tensor; they arrive as collate made them."""
    import torch

    from trainer.data import collate

    urls = resolve_shards([str(small_shards["domain_b"])])
    local, remote = (list(itertools.islice(iter(stream(urls, builder, workers=w)), 3)) for w in (0, 1))
    for a, b in zip(local, remote):
        assert a.keys() == b.keys() and a["keys"] == b["keys"] and a["meta"] == b["meta"]
        for name, value in a.items():
            if torch.is_tensor(value):
                assert torch.equal(value, b[name]) and value.dtype == b[name].dtype, name
    # and equal to collate's own batch of the same samples (an eval stream: fixed order)
    samples = list(itertools.islice(iter(stream(urls, builder, train=False).loader.dataset), 4))
    reference = collate(samples, builder.tokenizer.pad_token_id)
    loaded = next(iter(stream(urls, builder, train=False, workers=1)))
    assert loaded["keys"] == reference["keys"]
    for name, value in reference.items():
        if torch.is_tensor(value):
            assert torch.equal(value, loaded[name]), name


def test_dev_split_of_training_shards_is_held_out_of_training(small_shards, builder):
    """eval.dev_shards that are also training shards: their `val` samples never reach training
    (they fix the deployable threshold), every other sample still does."""
    from trainer.config import RunConfig
    from trainer.training.inputs import held_out_dev

    a, b = small_shards["domain_a"], small_shards["domain_b"]
    cfg = RunConfig()
    cfg.data.train_shards, cfg.eval.dev_shards = [str(a), str(b)], [f"{a}/"]  # the same set, spelt differently
    urls = resolve_shards(cfg.data.train_shards)
    held = held_out_dev(cfg, urls)
    assert held is not None and held.split == "val" and held.shards == frozenset(resolve_shards([str(a)]))
    everything = {r["__key__"]: (r["__url__"], json.loads(r["json"])["split"])
                  for r in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}
    s = shard_stream(urls, builder, batch_size=8, shuffle_buffer=8, held_out=held)
    seen = set(itertools.chain(*keys_of(make_loader(s, builder.tokenizer.pad_token_id), 40)))  # > 3 passes
    held_keys = {k for k, (url, split) in everything.items() if url in held.shards and split == "val"}
    kept_val = {k for k, (url, split) in everything.items() if url not in held.shards and split == "val"}
    assert held_keys and kept_val  # both kinds exist in the synthetic shards
    assert seen == set(everything) - held_keys
    cfg.eval.dev_shards = []
    assert held_out_dev(cfg, urls) is None


def test_dev_shards_that_leave_nothing_to_train_on_are_refused(small_shards):
    from trainer.config import ConfigError, RunConfig
    from trainer.training.inputs import check_inputs

    cfg = RunConfig()
    cfg.data.train_shards = cfg.eval.dev_shards = [str(small_shards["domain_a"])]
    check_inputs(cfg)  # the val split held out: the train split is left
    cfg.eval.dev_split = ""
    with pytest.raises(ConfigError, match="nothing is left to train on"):
        check_inputs(cfg)
