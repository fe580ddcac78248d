"""inference.py argument handling: flags set config keys, and each bad input is one line, exit 2, no files."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reward_forcing.errors import ConfigError, run_cli
from reward_forcing.inference.cli import load_run_config, main, plan_jobs
from reward_forcing.inference.jobs import shard, video_seed

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n\na dog\na cat\n")
    (tmp_path / "ckpt.pt").write_bytes(b"")
    return tmp_path


def test_flags_set_config_keys_and_defaults_come_from_the_config(files):
    (files / "c.yaml").write_text("inference:\n  num_samples: 3\nseed: 7\n")
    cfg = load_run_config(["--config_path", str(files / "c.yaml"), "--data_path", str(files / "prompts.txt"),
                           "--output_folder", str(files / "out"), "--num_output_frames", "120", "--use_ema",
                           "height=256", "width=384"])
    run = cfg.inference
    assert (run.num_output_frames, run.num_samples, run.use_ema, run.overwrite, cfg.seed) == (120, 3, True, False, 7)
    assert (cfg.height, cfg.width) == (256, 384)
    cfg = load_run_config(["--data_path", "p", "--output_folder", "o", "--seed", "5", "seed=9", "--overwrite"])
    assert (cfg.seed, cfg.inference.overwrite, cfg.inference.num_output_frames) == (5, True, 21)  # flag wins


def test_repeated_prompts_are_planned_once(files):
    cfg = load_run_config(["--data_path", str(files / "prompts.txt"), "--output_folder", str(files / "out")])
    with pytest.warns(UserWarning, match="repeats"):
        jobs, blank = plan_jobs(cfg)
    assert [(j.prompt.index, j.stem) for j in jobs] == [(0, "a cat"), (1, "a dog")] and blank == 1
    cfg = load_run_config(["--data_path", str(files / "prompts.txt"), "--output_folder", "o", "--save_with_index"])
    assert [j.stem for j in plan_jobs(cfg)[0]] == ["0", "1", "2"]


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
def test_sharding_covers_every_prompt_once(world):
    items = list(range(7))
    parts = [shard(items, rank, world) for rank in range(world)]
    assert sorted(i for part in parts for i in part) == items


def test_seeds_depend_only_on_base_prompt_and_sample():
    seeds = {video_seed(0, p, s) for p in range(50) for s in range(5)}
    assert len(seeds) == 250 and all(0 <= s < 2**63 for s in seeds)
    assert video_seed(0, 3, 1) == video_seed(0, 3, 1) != video_seed(1, 3, 1)
    # base + index schemes collide ((0, 1) vs (1, 0)); this one must not
    assert video_seed(0, 1, 0) != video_seed(1, 0, 0) != video_seed(0, 0, 1)


def test_seed_help_names_what_the_seed_is_derived_from():
    """Each video's seed hashes (base seed, prompt index, sample index), never the prompt text."""
    from reward_forcing.inference.cli import build_parser

    help_text = " ".join(build_parser().format_help().split())
    assert "(seed, prompt index, sample index)" in help_text and "not the prompt text" in help_text
    assert "(seed, prompt, sample)" not in help_text
    assert "latent frames (21 -> 81 video frames" in help_text


BAD_INPUTS = [
    (["--data_path", "{d}/empty.txt"], "contains no prompts"),
    (["--data_path", "{d}/prompts.txt", "--extended_prompt_path", "{d}/short_ext.txt"], "has 1 lines but"),
    (["--data_path", "{d}/prompts.txt", "--checkpoint_path", "{d}/missing.pt"], "checkpoint not found"),
    (["--data_path", "{d}/prompts.txt", "--config_path", "{d}/broken.yaml"], "cannot read config"),
    (["--data_path", "{d}/prompts.txt", "--config_path", "{d}/nowhere.yaml"], "config file not found"),
    (["--data_path", "{d}/prompts.txt", "not_a_key=1"], "unknown config key 'not_a_key'"),
    (["--data_path", "{d}/prompts.txt", "--num_output_frames", "20"], "multiple of the chunk size"),
    (["--data_path", "{d}/prompts.txt", "--num_samples", "0"], "num_samples must be at least 1"),
    (["--data_path", "{d}/prompts.txt", "--i2v"], "--i2v is not supported"),
    (["--data_path", "{d}/nope.txt"], "prompt file not found"),
    ([], "give exactly one of --data_path and --switch_prompts"),
    (["--data_path", "{d}/prompts.txt", "--switch_prompts", "{d}/switch.jsonl"], "give exactly one of"),
    (["--switch_prompts", "{d}/switch.jsonl", "--extended_prompt_path", "{d}/short_ext.txt"], "pairs with --data_path"),
    (["--switch_prompts", "{d}/nope.jsonl"], "switch prompts file not found"),
    (["--switch_prompts", "{d}/empty.txt"], "contains no videos"),
    (["--switch_prompts", "{d}/prompts.txt"], "prompts.txt line 1: not JSON"),
    (["--switch_prompts", "{d}/bad_frames.jsonl"], "line 2: segment 2 has latent_frames=4; it must be a positive"),
    (["--switch_prompts", "{d}/bad_keys.jsonl"], "segment 1 must be an object with exactly the keys prompt, "
                                                 "latent_frames"),
    (["--switch_prompts", "{d}/not_list.jsonl"], "expected a non-empty JSON array of segments"),
    (["--switch_prompts", "{d}/blank_prompt.jsonl"], "segment 1 has an empty prompt"),
    (["--switch_prompts", "{d}/same_first.jsonl"], "videos 1 and 2 of"),
    (["--data_path", "{d}/prompts.txt", "--seed", "x"], "invalid int value"),
    (["--data_path", "{d}/prompts.txt", "inference.num_output_frames=abc"],
     "invalid value for 'inference.num_output_frames' in command-line overrides: Value 'abc' of type 'str' could "
     "not be converted to Integer"),
    (["--data_path", "{d}/prompts.txt", "inference.device=gpu"], "is not a device"),
]


@pytest.mark.filterwarnings("ignore:prompt 2 repeats")
@pytest.mark.parametrize("args, message", BAD_INPUTS)
def test_bad_input_is_one_line_and_writes_nothing(files, capsys, args, message):
    (files / "empty.txt").write_text("\n\n")
    (files / "short_ext.txt").write_text("an extended cat\n")
    (files / "broken.yaml").write_text("height: [1, 2\n")
    segments = {"switch": '[{"prompt": "a cat", "frames": 3}]',
                "bad_frames": '[{"prompt": "a", "frames": 3}]\n[{"prompt": "b", "frames": 3}, {"prompt": "c", "frames": 4}]',
                "bad_keys": '[{"prompt": "a", "frames": 3, "seed": 1}]', "not_list": '{"prompt": "a", "frames": 3}',
                "blank_prompt": '[{"prompt": " ", "frames": 3}]',
                "same_first": '[{"prompt": "a", "frames": 3}]\n[{"prompt": "a", "frames": 3}, {"prompt": "b", "frames": 3}]'}
    for name, text in segments.items():
        (files / f"{name}.jsonl").write_text(text + "\n")
    out = files / "out"
    argv = [a.format(d=files) for a in args] + ["--output_folder", str(out)]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not out.exists()


def test_a_missing_released_checkpoint_names_its_download_flag(files, capsys):
    missing = files / "Reward-Forcing-T2V-1.3B" / "rewardforcing.pt"
    assert run_cli(main, ["--data_path", str(files / "prompts.txt"), "--output_folder", str(files / "out"),
                          "--checkpoint_path", str(missing)]) == 2
    assert capsys.readouterr().err == (f"error: checkpoint not found: {missing}; `bash download_checkpoints.sh --only "
                                       "reward-forcing` fetches it (into checkpoints/; with --checkpoint-dir DIR, pass "
                                       "checkpoint_dir=DIR here)\n")


def test_only_rank_0_prints_the_error(monkeypatch, capsys):
    def bad(argv):
        raise ConfigError("bad value")

    for rank, printed in (("0", "error: bad value\n"), ("1", "")):
        monkeypatch.setenv("RANK", rank)
        assert run_cli(bad) == 2 and capsys.readouterr().err == printed


def test_under_torchrun_a_bad_config_is_reported_once(tmp_path):
    (tmp_path / "broken.yaml").write_text("height: 256\nwidth: [1, 2\n")
    (tmp_path / "p.txt").write_text("a cat\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(REPO / "inference.py"), "--config_path", str(tmp_path / "broken.yaml"), "--data_path",
                             str(tmp_path / "p.txt"), "--output_folder", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode != 0 and not (tmp_path / "out").exists()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: cannot read config {tmp_path / 'broken.yaml'}: line 3, column 1: did not find expected "
                      "',' or ']'"]
    assert "exitcode  : 2" in result.stderr  # torchrun's own report of the failed processes (see README)


def test_the_script_exits_2_with_one_line(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    result = subprocess.run([sys.executable, str(REPO / "inference.py"), "--data_path", str(tmp_path / "empty.txt"),
                             "--output_folder", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "contains no prompts" in result.stderr
    assert not (tmp_path / "out").exists()


def test_switch_prompt_videos_are_named_after_their_first_segment(files):
    # latent_frames names the unit; `frames`, its older name, is still read
    (files / "s.jsonl").write_text('[{"prompt": "a cat", "latent_frames": 6}, {"prompt": "a dog", "frames": 3}]\n\n'
                                   '[{"prompt": "a cat", "latent_frames": 3}]\n')
    cfg = load_run_config(["--switch_prompts", str(files / "s.jsonl"), "--output_folder", "o", "--save_with_index"])
    jobs, blank = plan_jobs(cfg)
    assert [(j.stem, j.prompt.text, j.num_frames(21)) for j in jobs] == [("0", "a cat", 9), ("1", "a cat", 3)]
    assert [s.prompt for s in jobs[0].segments] == ["a cat", "a dog"] and blank == 0


def test_output_folder_check_table(tmp_path):
    """Which existing videos a run may skip, must regenerate, or must not sit beside."""
    from reward_forcing.errors import ConfigError
    from reward_forcing.inference.provenance import check_output_folder, video_record

    old, new = {"height": 480}, {"height": 256}
    for name in ("a-0.mp4", "b-0.mp4", "mine.mp4"):
        (tmp_path / name).write_bytes(b"")
    records = [{"file": "a-0.mp4", "prompt": "a", "extended_prompt": None, "seed": 1, "settings": old},
               {"file": "gone-0.mp4", "prompt": "g", "seed": 3, "settings": old}]  # deleted since: ignored
    same = {"a-0.mp4": video_record(old, 1, "a")}
    check_output_folder(tmp_path, records, same, old, overwrite=False)  # made just so: skipped
    cases = [  # (planned, settings, overwrite) -> message
        ({"a-0.mp4": video_record(new, 1, "a")}, new, False, "height 480 -> 256"),
        ({"a-0.mp4": video_record(old, 2, "a")}, old, False, "seed 1 -> 2"),
        ({"a-0.mp4": video_record(old, 1, "a cat")}, old, False, "generated_from 'a' -> 'a cat'"),
        ({"b-0.mp4": video_record(old, 1, "b")}, old, False, "does not say how it was made"),
        ({"c-0.mp4": video_record(new, 1, "c")}, new, True, "holds a-0.mp4, made with other settings"),
    ]
    for planned, settings, overwrite, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_output_folder(tmp_path, records, planned, settings, overwrite)
    check_output_folder(tmp_path, records, {"a-0.mp4": video_record(new, 1, "a")}, new, overwrite=True)
