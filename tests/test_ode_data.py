"""ODE pair storage: our resumable shards, and the published LMDB layout (single and sharded)."""
import json

import lmdb
import numpy as np
import pytest
import torch

from reward_forcing.errors import CheckpointError, ConfigError
from reward_forcing.training.ode_data import (
    OdePairDataset, prepare_output_dir, shard_done, shard_range, shards_for_rank, write_lmdb, write_shard)


def _pairs(n, k=5, c=4, f=6, h=2, w=3):
    """Values exactly representable in float16, so round trips compare with ==."""
    latent = torch.randint(-512, 512, (n, k, c, f, h, w)).float() / 64
    prompts = [f"prompt {i} — ünïcode" for i in range(n)]
    return prompts, latent


@pytest.mark.parametrize("num_prompts,shard_size,world", [(10, 3, 2), (7, 7, 3), (1, 4, 4), (23, 4, 5), (16, 4, 4)])
def test_rank_sharding_covers_every_prompt_once(num_prompts, shard_size, world):
    seen = []
    for rank in range(world):
        for k in shards_for_rank(num_prompts, shard_size, rank, world):
            seen.extend(shard_range(k, num_prompts, shard_size))
    assert sorted(seen) == list(range(num_prompts))


def test_rank_sharding_by_hand():
    # 10 prompts, shards of 3: [0,1,2] [3,4,5] [6,7,8] [9]; two ranks deal them round-robin
    assert shards_for_rank(10, 3, 0, 2) == [0, 2]
    assert shards_for_rank(10, 3, 1, 2) == [1, 3]
    assert list(shard_range(3, 10, 3)) == [9]


def test_our_shards_read_back_equal_and_resume_state(tmp_path):
    prompts, latent = _pairs(5)
    prepare_output_dir(tmp_path, {"num_prompts": 5, "shard_size": 3})
    assert not shard_done(tmp_path, 0)
    write_shard(tmp_path, 1, prompts[3:], [3, 4], latent[3:].half())
    write_shard(tmp_path, 0, prompts[:3], [0, 1, 2], latent[:3].half())
    assert shard_done(tmp_path, 0) and shard_done(tmp_path, 1)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries
    data = OdePairDataset(tmp_path)
    assert len(data) == 5
    for i in range(5):
        item = data[i]
        assert item["prompts"] == prompts[i]
        assert item["ode_latent"].dtype == torch.float32
        assert torch.equal(item["ode_latent"], latent[i])


def test_resume_refuses_other_settings(tmp_path):
    prepare_output_dir(tmp_path, {"num_prompts": 5, "shard_size": 3, "ode_shift": 8.0})
    prepare_output_dir(tmp_path, {"num_prompts": 5, "shard_size": 3, "ode_shift": 8.0})  # same: fine
    with pytest.raises(ConfigError, match="ode_shift"):
        prepare_output_dir(tmp_path, {"num_prompts": 5, "shard_size": 3, "ode_shift": 5.0})


def test_published_single_lmdb_layout_is_written_exactly(tmp_path):
    prompts, latent = _pairs(3)
    write_lmdb(tmp_path / "db", prompts, latent)
    # read the raw layout independently: float16 [K, F, C, H, W] rows and ASCII shapes
    env = lmdb.open(str(tmp_path / "db"), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.get(b"latents_shape").decode() == "3 5 6 4 2 3"
        assert txn.get(b"prompts_shape").decode() == "3"
        for i in range(3):
            row = np.frombuffer(txn.get(f"latents_{i}_data".encode()), dtype=np.float16).reshape(5, 6, 4, 2, 3)
            assert np.array_equal(row, latent[i].permute(0, 2, 1, 3, 4).numpy())
            assert txn.get(f"prompts_{i}_data".encode()).decode() == prompts[i]
    env.close()


def _hand_made_lmdb(path, prompts, rows):
    """The published writer's layout, built here with the lmdb API only."""
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i, (prompt, row) in enumerate(zip(prompts, rows)):
            txn.put(f"latents_{i}_data".encode(), row.astype(np.float16).tobytes())
            txn.put(f"prompts_{i}_data".encode(), prompt.encode())
        txn.put(b"latents_shape", " ".join(map(str, rows.shape)).encode())
    env.close()


def test_reader_on_a_hand_made_published_lmdb(tmp_path):
    prompts, latent = _pairs(4)
    rows = latent.permute(0, 1, 3, 2, 4, 5).numpy()  # published [N, K, F, C, H, W]
    _hand_made_lmdb(tmp_path, prompts, rows)
    data = OdePairDataset(tmp_path)
    assert len(data) == 4
    for i in range(4):
        assert data[i]["prompts"] == prompts[i]
        assert data[i]["ode_latent"].shape == (5, 4, 6, 2, 3)
        assert torch.equal(data[i]["ode_latent"], latent[i])


def test_sharded_lmdb_directory_round_trip(tmp_path):
    prompts, latent = _pairs(7)
    write_lmdb(tmp_path, prompts, latent, num_lmdb_shards=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_0", "shard_1", "shard_2"]
    data = OdePairDataset(tmp_path)
    got = {data[i]["prompts"]: data[i]["ode_latent"] for i in range(len(data))}
    assert len(data) == 7 and set(got) == set(prompts)
    for prompt, expected in zip(prompts, latent):
        assert torch.equal(got[prompt], expected)


def test_sharded_rows_without_state_axis_read_as_one_state(tmp_path):
    # the published 14B shards: latents_shape "N F C H W", one clean latent per entry; 12 shards
    # check that shard_10 / shard_11 are found beside shard_2
    prompts, latent = _pairs(12, k=1)
    for k in range(12):
        _hand_made_lmdb(tmp_path / f"shard_{k}", prompts[k:k + 1], latent[k:k + 1, 0].permute(0, 2, 1, 3, 4).numpy())
    data = OdePairDataset(tmp_path)
    assert [data[i]["prompts"] for i in range(12)] == prompts  # natural shard order
    assert data[11]["ode_latent"].shape == (1, 4, 6, 2, 3)
    assert torch.equal(data[11]["ode_latent"], latent[11])
    write_lmdb(tmp_path / "ours", prompts, latent, num_lmdb_shards=2, state_axis=False)
    env = lmdb.open(str(tmp_path / "ours" / "shard_1"), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.get(b"latents_shape").decode() == "6 6 4 2 3"
    env.close()


def test_bad_paths_and_truncated_entries(tmp_path):
    with pytest.raises(ConfigError, match="not ODE pairs"):
        OdePairDataset(tmp_path)
    prompts, latent = _pairs(2)
    rows = latent.permute(0, 1, 3, 2, 4, 5).numpy()
    _hand_made_lmdb(tmp_path / "db", prompts, rows)
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(b"latents_1_data", b"\x00" * 10)
    env.close()
    data = OdePairDataset(tmp_path / "db")
    with pytest.raises(CheckpointError, match="entry 1"):
        data[1]
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CheckpointError, match="manifest"):
        OdePairDataset(tmp_path / "ours")


def test_incomplete_generation_reads_what_is_there_with_a_warning(tmp_path, caplog):
    prompts, latent = _pairs(5)
    prepare_output_dir(tmp_path, {"num_prompts": 5, "shard_size": 3})
    write_shard(tmp_path, 1, prompts[3:], [3, 4], latent[3:].half())
    with caplog.at_level("WARNING"):
        data = OdePairDataset(tmp_path)
    assert len(data) == 2 and data[0]["prompts"] == prompts[3]
    assert "incomplete: 2 of 5 pairs" in caplog.text
