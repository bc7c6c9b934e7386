"""The bounded-time resume of trainer/data/stream.py: the index-only shuffle replay against the live
shuffle, and resumed streams against unbroken ones at every kind of position (filling the
buffer, streaming, draining, epoch boundaries, later epochs), with workers, several ranks, a
sample-level split, a damaged shard and shards without a manifest; and that a resume reads a
bounded number of samples however far the stream had got."""
from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
import webdataset as wds

from tests.helpers import shard_stream
from trainer.data import Source, StreamState, make_loader, resolve_shards
from trainer.data.epochs import replay_shuffle
from trainer.data.reader import Reader
from trainer.sample.prompt import PromptBuilder

BATCH, BUFFER = 4, 8


@pytest.fixture(scope="module")
def builder(demo_tokenizer):
    return PromptBuilder(demo_tokenizer, 4, 96)


def loader(urls, builder, resume=None, rank=0, world=1, workers=0):
    s = shard_stream(urls, builder, rank=rank, world=world, workers=workers, batch_size=BATCH, shuffle_buffer=BUFFER,
                     resume=resume)
    return iter(make_loader(s, builder.tokenizer.pad_token_id))


def live_shuffle(n: int, buffer_size: int, rng: np.random.Generator) -> list[int]:
    """The live algorithm (EpochSchedule.epoch) on indices, written out plainly."""
    out, buffer = [], []
    for raw in range(n):
        if len(buffer) < buffer_size:
            buffer.append(raw)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], raw = raw, buffer[i]
        out.append(raw)
    rng.shuffle(buffer)
    return out + buffer


@pytest.mark.parametrize("n, buffer_size", [(50, 8), (8, 8), (5, 8), (200, 64)])
def test_replay_shuffle_is_the_live_shuffle_at_every_point(n, buffer_size):
    order = live_shuffle(n, buffer_size, np.random.default_rng([3, 1, 0, 1]))
    for done in range(n + 1):
        rng = np.random.default_rng([3, 1, 0, 1])
        buffer, next_read, draining = replay_shuffle(rng, n, buffer_size, done)
        if draining:
            assert buffer == order[done:] and next_read == n
        else:  # continue the live algorithm from the replayed state: the same rest of the epoch
            rest = []
            for raw in range(next_read, n):
                i = int(rng.integers(len(buffer)))
                buffer[i], raw = raw, buffer[i]
                rest.append(raw)
            rng.shuffle(buffer)
            assert rest + buffer == order[done:], done


def state_after(urls, builder, batches, resume=None, **kw) -> StreamState:
    """The state a checkpoint after ``batches`` holds (the loop updates the state it started from)."""
    state = StreamState.from_state_dict(resume.state_dict()) if resume else StreamState()
    for batch in itertools.islice(loader(urls, builder, resume=resume, **kw), batches):
        state.update(batch["stream_pos"])
    return StreamState.from_state_dict(json.loads(json.dumps(state.state_dict())))  # as in a checkpoint


def assert_resumes_exactly(urls, builder, points, ahead=3, resume=None, **kw):
    unbroken = [b["keys"] for b in itertools.islice(loader(urls, builder, resume=resume, **kw), max(points) + ahead)]
    for consumed in points:
        state = state_after(urls, builder, consumed, resume=resume, **kw)
        resumed = [b["keys"] for b in itertools.islice(loader(urls, builder, resume=state, **kw), ahead)]
        assert resumed == unbroken[consumed:consumed + ahead], f"resumed after {consumed} batches"


def test_resume_is_exact_everywhere_in_and_across_epochs(small_shards, builder):
    urls = resolve_shards([str(d) for d in small_shards.values()])  # 12 shards, 192 samples: 48 batches/epoch
    assert_resumes_exactly(urls, builder, [1, 2, 3, 25, 45, 46, 47, 48, 49, 50, 97, 130])


@pytest.mark.parametrize("rank, world, workers", [(1, 2, 0), (0, 1, 2), (1, 2, 2)])
def test_resume_is_exact_with_ranks_and_workers(small_shards, builder, rank, world, workers):
    urls = resolve_shards([str(d) for d in small_shards.values()])
    assert_resumes_exactly(urls, builder, [3, 11, 24, 40], rank=rank, world=world, workers=workers)


def test_resume_is_exact_with_a_sample_level_split(small_shards, builder):
    urls = resolve_shards([str(small_shards["domain_b"])])  # 3 shards for 2 ranks x 2 workers
    assert_resumes_exactly(urls, builder, [2, 5, 6, 7, 13], rank=1, world=2, workers=2)


def test_resume_is_exact_over_a_damaged_shard_and_shards_without_manifest(small_shards, builder, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(small_shards["domain_a"], damaged)
    tar = damaged / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # the manifest still says 16 samples
    bare = tmp_path / "bare"
    shutil.copytree(small_shards["domain_c"], bare)
    (bare / "manifest.json").unlink()
    urls = resolve_shards([str(damaged), str(bare / "*.tar")])
    unbroken = list(itertools.islice(loader(urls, builder), 30))
    skipped = StreamState()
    for b in unbroken:
        skipped.update(b["stream_pos"])
    assert skipped.skipped_total()["corrupt_tar"] == 1 and skipped.shard_sizes.keys() == {str(tar)}
    assert 0 < skipped.shard_sizes[str(tar)] < 16
    # epoch 1 (first pass) and later epochs, before and after the damaged shard is met
    assert_resumes_exactly(urls, builder, [2, 9, 10, 11, 17, 18, 19, 25], ahead=4)
    state = state_after(urls, builder, 19)
    resumed = list(itertools.islice(loader(urls, builder, resume=state), 4))
    assert resumed[-1]["stream_pos"].skipped == unbroken[22]["stream_pos"].skipped  # the same counts, once each


def test_a_resume_reads_a_bounded_number_of_samples(small_shards, builder, monkeypatch):
    urls = resolve_shards([str(d) for d in small_shards.values()])
    read = []
    real_shard = Reader.shard

    def counting_shard(self, url, skip=0, **kw):
        for raw in real_shard(self, url, skip, **kw):
            read.append(raw["__key__"])
            yield raw

    counts = {}
    for consumed in (48, 48 * 20):  # after 1 epoch and after 20
        state = StreamState(consumed_batches=consumed, raw_consumed={0: consumed * BATCH})
        monkeypatch.setattr(Reader, "shard", counting_shard)
        read.clear()
        next(loader(urls, builder, resume=state))
        monkeypatch.setattr(Reader, "shard", real_shard)
        counts[consumed] = len(read)
    epoch = 192
    assert counts[48] > 0, counts
    assert counts[48 * 20] <= epoch + BUFFER  # 20 epochs consumed, at most one epoch read again
    assert counts[48 * 20] <= 2 * counts[48] + BUFFER


def batches_of(urls, builder, n, **kw) -> list[dict]:
    return list(itertools.islice(loader(urls, builder, **kw), n))


@pytest.mark.parametrize("old, new", [((2, 0), (1, 0)), ((1, 0), (2, 0)), ((2, 0), (3, 2)), ((1, 2), (2, 0))])
def test_a_change_of_layout_finishes_the_epoch_without_loss_or_repeat(small_shards, builder, old, new):
    """(world size, loader workers) old -> new, 5 batches into the first epoch: what the old slots
    had yielded plus the new slots' transition epochs is the epoch, each sample once; then every new
    slot goes on with the next epoch, and a resume inside the transition is exact."""
    urls = resolve_shards([str(d) for d in small_shards.values()])  # 192 samples
    (world, workers), (new_world, new_workers) = old, new
    before, streams = [], []
    for rank in range(world):
        state = StreamState()
        for batch in batches_of(urls, builder, 5, rank=rank, world=world, workers=workers):
            state.update(batch["stream_pos"])
            before += batch["keys"]
        streams.append(json.loads(json.dumps(state.state_dict())))  # as in a checkpoint
    epoch = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    transition = []
    for rank in range(new_world):
        resume = StreamState.after_layout_change(streams, workers, BUFFER, rank)
        s = shard_stream(urls, builder, rank=rank, world=new_world, workers=new_workers, batch_size=BATCH,
                         shuffle_buffer=BUFFER, resume=resume)
        readers = max(new_workers, 1)
        lengths = [s.transition_length(w) for w in range(readers)]
        got = batches_of(urls, builder, sum(-(-n // BATCH) for n in lengths) + readers * 3, rank=rank,
                         world=new_world, workers=new_workers, resume=resume)
        for w in range(readers):  # the DataLoader takes batches from its workers in turn
            keys = [k for b in got[w::readers] for k in b["keys"]]
            transition += keys[:lengths[w]]
            assert len(keys) > lengths[w]  # and the reader goes on with the next epoch
    assert len(before) + len(transition) == len(epoch) == 192
    assert sorted(before + transition) == sorted(epoch)
    # a checkpoint in the middle of the transition resumes exactly (the origin travels in the state)
    resume = StreamState.after_layout_change(streams, workers, BUFFER, 0)
    assert_resumes_exactly(urls, builder, [2, 9], world=new_world, workers=new_workers, resume=resume)


def mixed(urls_a, urls_b, builder, resume=None, seed=0, workers=0, weights=(0.75, 0.25)):
    s = shard_stream(urls_a + urls_b, builder, workers=workers, batch_size=BATCH, seed=seed, shuffle_buffer=BUFFER,
                     resume=resume, sources=[Source(tuple(urls_a), weights[0]), Source(tuple(urls_b), weights[1])])
    return iter(make_loader(s, builder.tokenizer.pad_token_id))


def test_weighted_sources_are_drawn_in_proportion_deterministically(small_shards, builder):
    a, b = (resolve_shards([str(small_shards[d])]) for d in ("domain_a", "domain_b"))
    batches = list(itertools.islice(mixed(a, b, builder), 500))  # 2000 samples: each 48-sample set many times over
    domains = [m["dataset"] for batch in batches for m in batch["meta"]]
    assert abs(domains.count("domain_a") / len(domains) - 0.75) <= 0.02
    state = StreamState()
    for batch in batches:
        state.update(batch["stream_pos"])
    assert state.source_counts() == [domains.count("domain_a"), domains.count("domain_b")]  # what gets logged
    again = [b["keys"] for b in itertools.islice(mixed(a, b, builder), 20)]
    assert again == [b["keys"] for b in batches[:20]]
    assert again != [b["keys"] for b in itertools.islice(mixed(a, b, builder, seed=1), 20)]


@pytest.mark.parametrize("workers", [0, 2])
def test_weighted_sources_resume_exactly(small_shards, builder, workers):
    a, b = (resolve_shards([str(small_shards[d])]) for d in ("domain_a", "domain_b"))
    unbroken = [x["keys"] for x in itertools.islice(mixed(a, b, builder, workers=workers), 40)]
    for consumed in (3, 17, 36):
        state = StreamState()
        for batch in itertools.islice(mixed(a, b, builder, workers=workers), consumed):
            state.update(batch["stream_pos"])
        state = StreamState.from_state_dict(json.loads(json.dumps(state.state_dict())))
        resumed = [x["keys"] for x in itertools.islice(mixed(a, b, builder, resume=state, workers=workers), 4)]
        assert resumed == unbroken[consumed:consumed + 4], consumed


@pytest.fixture(scope="module")
def lopsided_set(small_shards, tmp_path_factory):
    """1 live : 4 spoof, in shards of 10 (written by the project's ShardWriter)."""
    from shards.writer import ShardWriter

    out = tmp_path_factory.mktemp("lopsided") / "set"
    raws = list(wds.WebDataset(resolve_shards([str(d) for d in small_shards.values()]), shardshuffle=False))
    live = [r for r in raws if json.loads(r["json"])["label"] == "live"][:12]
    spoof = [r for r in raws if json.loads(r["json"])["label"] == "spoof"][:48]
    with ShardWriter(out, max_samples=10) as writer:
        for r in sorted(live + spoof, key=lambda r: r["__key__"]):
            writer.write(r["__key__"], r["jpg"], json.loads(r["json"]))
    return resolve_shards([str(out)])


def test_label_offsets_are_webdatasets_samples(lopsided_set):
    from trainer.data.reader import label_offsets

    for url in lopsided_set:
        labels = [json.loads(r["json"])["label"] for r in wds.WebDataset([url], shardshuffle=False)]
        assert label_offsets(url) == {k: tuple(i for i, lab in enumerate(labels) if lab == k) for k in set(labels)}


def balanced(urls, builder, resume=None):
    s = shard_stream(urls, builder, batch_size=BATCH, shuffle_buffer=BUFFER, resume=resume,
                     sources=[Source(tuple(urls), 0.5, "live"), Source(tuple(urls), 0.5, "spoof")])
    return iter(make_loader(s, builder.tokenizer.pad_token_id))


def test_live_spoof_balance_draws_half_and_half_and_resumes_exactly(lopsided_set, builder):
    batches = list(itertools.islice(balanced(lopsided_set, builder), 200))  # 800 samples
    labels = [m["label"] for b in batches for m in b["meta"]]
    assert abs(labels.count("live") / len(labels) - 0.5) <= 0.03  # the set itself is 20% live
    live_keys = [k for b in batches for k, m in zip(b["keys"], b["meta"]) if m["label"] == "live"]
    assert len(set(live_keys)) == 12 and len(live_keys) > 12 * 25  # every live sample, many epochs over
    for consumed in (5, 31):
        state = StreamState()
        for batch in batches[:consumed]:
            state.update(batch["stream_pos"])
        state = StreamState.from_state_dict(json.loads(json.dumps(state.state_dict())))
        resumed = [b["keys"] for b in itertools.islice(balanced(lopsided_set, builder, resume=state), 4)]
        assert resumed == [b["keys"] for b in batches[consumed:consumed + 4]], consumed


def test_a_change_of_layout_over_a_damaged_shard_still_resumes_exactly(small_shards, builder, tmp_path):
    """The old run had not reached the end of a shard shorter than its manifest: the transition
    must not count the samples it lacks, or a later resume rebuilds another transition."""
    damaged = tmp_path / "damaged"
    shutil.copytree(small_shards["domain_a"], damaged)
    tar = damaged / "shard-000002.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    urls = resolve_shards([str(damaged)])  # 3 shards: with 4 new slots, a sample-level split
    state = state_after(urls, builder, 2)
    streams = [json.loads(json.dumps(state.state_dict()))]
    for rank in (0, 1, 3):
        resume = StreamState.after_layout_change(streams, 0, BUFFER, rank)
        assert_resumes_exactly(urls, builder, list(range(1, 16)), ahead=2, rank=rank, world=4, resume=resume)


def test_mixed_runs_count_a_bad_sample_once_however_many_epochs(small_shards, builder, tmp_path):
    from shards.writer import ShardWriter

    raws = list(wds.WebDataset(resolve_shards([str(small_shards["domain_a"])]), shardshuffle=False))[:10]
    with ShardWriter(tmp_path / "bad", max_samples=5) as writer:
        for i, r in enumerate(raws):
            writer.write(r["__key__"], b"not an image" if i == 3 else r["jpg"], json.loads(r["json"]))
    bad, good = resolve_shards([str(tmp_path / "bad")]), resolve_shards([str(small_shards["domain_b"])])
    state = StreamState()
    for batch in itertools.islice(mixed(bad, good, builder, weights=(0.5, 0.5)), 60):  # the 10-sample set ~12x
        state.update(batch["stream_pos"])
    assert state.skipped_total() == {"bad_image": 1}


def test_balance_works_when_shards_hold_one_label_each(small_shards, builder, tmp_path):
    """Builds write sorted files, so real/ and attack/ folders land in different shards: on 4 slots
    a slot's shards hold no live sample in some epochs, which is not an error."""
    from shards.writer import ShardWriter

    raws = list(wds.WebDataset(resolve_shards([str(small_shards["domain_a"])]), shardshuffle=False))
    with ShardWriter(tmp_path / "pure", max_samples=6) as writer:
        for r in sorted(raws, key=lambda r: json.loads(r["json"])["label"]):
            writer.write(r["__key__"], r["jpg"], json.loads(r["json"]))
    urls = resolve_shards([str(tmp_path / "pure")])  # 8 shards, each live only or spoof only
    s = shard_stream(urls, builder, rank=1, world=4, batch_size=BATCH, shuffle_buffer=BUFFER,
                     sources=[Source(tuple(urls), 0.5, "live"), Source(tuple(urls), 0.5, "spoof")])
    labels = [m["label"] for b in itertools.islice(iter(make_loader(s, builder.tokenizer.pad_token_id)), 50)
              for m in b["meta"]]
    assert 0.35 <= labels.count("live") / len(labels) <= 0.65
