"""download_checkpoints.sh offline: fake `hf` and `curl` on PATH record their calls and write files."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "download_checkpoints.sh"

SHARDS = [f"diffusion_pytorch_model-{i:05d}-of-00006.safetensors" for i in range(1, 7)]
WAN_SHARED = ["models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", "google/umt5-xxl/spiece.model",
              "google/umt5-xxl/tokenizer.json", "google/umt5-xxl/tokenizer_config.json",
              "google/umt5-xxl/special_tokens_map.json", "README.md"]
# What each Hub repository holds (file -> content); the fake `hf` serves these.
REPOS = {
    "Wan-AI/Wan2.1-T2V-1.3B": ["config.json", "diffusion_pytorch_model.safetensors", *WAN_SHARED],
    "Wan-AI/Wan2.1-T2V-14B": ["config.json", "diffusion_pytorch_model.safetensors.index.json", *SHARDS, *WAN_SHARED],
    "KlingTeam/VideoReward": ["model_config.json", "checkpoint-11352/model.pth", "checkpoint-11352/tokenizer/vocab.json"],
    "Qwen/Qwen2-VL-2B-Instruct": ["config.json", "generation_config.json", "preprocessor_config.json",
                                  "chat_template.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                                  "merges.txt", "model-00001-of-00002.safetensors", "model.safetensors.index.json"],
    "gdhe17/Self-Forcing": ["checkpoints/ode_init.pt", "checkpoints/self_forcing_dmd.pt",
                            "vidprom_filtered_extended.txt"],
    "JaydenLu666/Reward-Forcing-T2V-1.3B": ["rewardforcing.pt", "README.md"],
    "THUDM/ImageReward": ["ImageReward.pt", "med_config.json", "README.md"],
    "zhuhz22/Causal-Forcing": ["chunkwise/ar_diffusion.pt", "chunkwise/causal_ode.pt", "chunkwise/causal_forcing.pt",
                               "framewise/causal_ode.pt", "README.md"],
    "google-bert/bert-base-uncased": ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "config.json",
                                      "model.safetensors"],
}
INDEX = json.dumps({"weight_map": {f"blocks.{i}.w": name for i, name in enumerate(SHARDS)}})

FAKE_HF = '''\
import fnmatch, json, os, sys
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(["hf"] + args) + "\\n")
assert args[0] == "download", args
repo, rest = args[1], args[2:]
files, include, local_dir = [], [], None
while rest:
    if rest[0] in ("--local-dir", "--revision", "--include"):
        if rest[0] == "--local-dir": local_dir = rest[1]
        if rest[0] == "--include": include.append(rest[1])
        rest = rest[2:]
    else:
        files.append(rest[0]); rest = rest[1:]
if repo == os.environ.get("FAKE_HF_FAIL"):
    sys.exit("fake hf: network error")
held = json.loads(os.environ["FAKE_REPOS"])[repo]
if len(files) == 1 and files[0] not in held:
    sys.exit("fake hf: 404 " + files[0])
patterns = files or include or ["*"]
for name in held:
    if any(fnmatch.fnmatch(name, p) for p in patterns):
        path = Path(local_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        text = os.environ["FAKE_INDEX"] if name.endswith(".index.json") else repo + ":" + name + "\\n"
        path.write_text(text)
'''

FAKE_CURL = '''\
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(["curl"] + args) + "\\n")
out = Path(args[args.index("--output") + 1])
url = args[-1]
if os.environ.get("FAKE_CURL_FAIL"):
    sys.exit(22)
out.write_text("served:" + url + "\\n")
'''


def served_text(url):
    return "served:" + url + "\n"


@pytest.fixture
def env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("hf", FAKE_HF), ("curl", FAKE_CURL)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(0o755)
    system_path = ":".join(p for p in ("/usr/bin", "/bin") if Path(p).is_dir())
    return {
        "PATH": f"{bin_dir}:{system_path}",
        "FAKE_LOG": str(tmp_path / "calls.jsonl"),
        "FAKE_REPOS": json.dumps(REPOS),
        "FAKE_INDEX": INDEX,
        "HOME": str(tmp_path),
    }


def run(tmp_path, env, *args):
    result = subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True)
    log = Path(env["FAKE_LOG"])
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return result, calls


def hf_repos(calls):
    return [call[2] for call in calls if call[0] == "hf"]


def arg(call, flag):
    return call[call.index(flag) + 1]


def test_help_lists_every_part_and_flag(tmp_path, env):
    result, calls = run(tmp_path, env, "--help")
    assert result.returncode == 0 and calls == []
    for word in ("--with-teacher", "--only", "--checkpoint-dir", "--prompt-dir", "--no-verify", "wan-14b",
                 "videoreward", "bench-prompts", "VideoReward/"):
        assert word in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus"], "unknown argument '--bogus'"),
        (["--only", "nope"], "unknown part 'nope'"),
        (["--only"], "option --only needs a value"),
        (["--checkpoint-dir", "--with-teacher"], "option --checkpoint-dir needs a value"),
    ],
)
def test_bad_arguments(tmp_path, env, args, message):
    result, calls = run(tmp_path, env, *args)
    assert result.returncode == 2 and calls == []
    assert result.stderr.startswith("error: " + message) and len(result.stderr.strip().splitlines()) == 1


def test_default_run_builds_the_upstream_layout(tmp_path, env):
    result, calls = run(tmp_path, env, "--no-verify")
    assert result.returncode == 0, result.stderr
    ckpt, prompts = tmp_path / "checkpoints", tmp_path / "prompts"
    expected = [
        ckpt / "Wan2.1-T2V-1.3B/config.json",
        ckpt / "Wan2.1-T2V-1.3B/diffusion_pytorch_model.safetensors",
        ckpt / "Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth",
        ckpt / "Wan2.1-T2V-1.3B/Wan2.1_VAE.pth",
        ckpt / "Wan2.1-T2V-1.3B/google/umt5-xxl/spiece.model",
        ckpt / "VideoReward/model_config.json",
        ckpt / "VideoReward/checkpoint-11352/model.pth",
        ckpt / "Qwen2-VL-2B-Instruct/config.json",
        ckpt / "Qwen2-VL-2B-Instruct/preprocessor_config.json",
        ckpt / "Reward-Forcing-T2V-1.3B/rewardforcing.pt",
        ckpt / "ode_init.pt",
        prompts / "vidprom_filtered_extended.txt",
        prompts / "MovieGenVideoBench.txt",
        prompts / "MovieGenVideoBench_extended.txt",
        prompts / "vbench/all_dimension.txt",
        prompts / "vbench/all_dimension_extended.txt",
    ]
    assert [p for p in expected if not p.is_file()] == []
    assert (ckpt / "ode_init.pt").read_text() == "gdhe17/Self-Forcing:checkpoints/ode_init.pt\n"
    # One consistent case, no teacher, no Qwen weights, no stray hf metadata in prompts/.
    assert not (ckpt / "Videoreward").exists() and not (ckpt / "Wan2.1-T2V-14B").exists()
    assert not list((ckpt / "Qwen2-VL-2B-Instruct").glob("*.safetensors"))
    assert sorted(p.name for p in prompts.iterdir()) == sorted(
        ["vidprom_filtered_extended.txt", "MovieGenVideoBench.txt", "MovieGenVideoBench_extended.txt", "vbench"])

    hf = {call[2]: call for call in calls if call[0] == "hf"}
    assert arg(hf["KlingTeam/VideoReward"], "--revision") == "b8e421fe21aec3dde5f61fdd1dc44e1d603b9727"
    assert arg(hf["Qwen/Qwen2-VL-2B-Instruct"], "--revision") == "895c3a49bc3fa70a340399125c650a463535e71c"
    assert arg(hf["KlingTeam/VideoReward"], "--local-dir") == "checkpoints/VideoReward"
    curls = [call[-1] for call in calls if call[0] == "curl" and "--head" not in call]
    assert [call[-1] for call in calls if "--head" in call] == ["https://huggingface.co"]  # one reachability check
    prompt_base = "https://raw.githubusercontent.com/guandeh17/Self-Forcing/33593df3e81fa3ec10239271dd2c100facac6de1/prompts/"
    template = ("https://raw.githubusercontent.com/KwaiVGI/VideoAlign/"
                "219ab9db64c045e5181a2202d11f686439351292/prompt_template.py")
    assert sorted(curls) == sorted([template] + [prompt_base + name for name in (
        "MovieGenVideoBench.txt", "MovieGenVideoBench_extended.txt",
        "vbench/all_dimension.txt", "vbench/all_dimension_extended.txt")])
    assert (ckpt / "VideoReward/prompt_template.py").is_file()


def test_second_run_downloads_nothing(tmp_path, env):
    first, _ = run(tmp_path, env, "--no-verify")
    assert first.returncode == 0, first.stderr
    second, calls = run(tmp_path, env, "--no-verify")
    assert second.returncode == 0 and calls == []
    assert second.stdout.count("present:") == 11  # 6 parts + the rubric template + 4 prompt files


def test_teacher_and_only(tmp_path, env):
    result, calls = run(tmp_path, env, "--only", "wan-14b,ode-init", "--checkpoint-dir", "weights")
    assert result.returncode == 0, result.stderr
    assert hf_repos(calls) == ["Wan-AI/Wan2.1-T2V-14B", "gdhe17/Self-Forcing"]
    teacher = tmp_path / "weights/Wan2.1-T2V-14B"
    assert sorted(p.name for p in teacher.iterdir()) == sorted(
        ["config.json", "diffusion_pytorch_model.safetensors.index.json", *SHARDS])
    assert (tmp_path / "weights/ode_init.pt").is_file()
    # A deleted shard is noticed from the index and fetched again.
    (teacher / SHARDS[3]).unlink()
    result, calls = run(tmp_path, env, "--only", "wan-14b", "--checkpoint-dir", "weights")
    assert hf_repos(calls) == ["Wan-AI/Wan2.1-T2V-14B"] and (teacher / SHARDS[3]).is_file()

    result, calls = run(tmp_path, env, "--with-teacher", "--no-verify")
    assert result.returncode == 0 and "Wan-AI/Wan2.1-T2V-14B" in hf_repos(calls)


def test_sha256_mismatch_is_refused_and_set_aside(tmp_path, env):
    result, _ = run(tmp_path, env, "--only", "bench-prompts")
    assert result.returncode == 1
    bad = tmp_path / "prompts/MovieGenVideoBench.txt.bad"
    digest = hashlib.sha256(bad.read_bytes()).hexdigest()
    assert result.stderr.strip() == (
        "error: sha256 mismatch for prompts/MovieGenVideoBench.txt (expected "
        f"ae02a4bbebcb55067dbeea369e43d52a4817d57fd0ac223071b9aa236ac027c4, got {digest}); moved to "
        "prompts/MovieGenVideoBench.txt.bad, re-run to fetch it again or pass --no-verify"
    )
    assert not (tmp_path / "prompts/MovieGenVideoBench.txt").exists()


def test_third_party_checksum_only_warns(tmp_path, env):
    result, _ = run(tmp_path, env, "--only", "videoreward")
    assert result.returncode == 0
    assert "warning: sha256 of checkpoints/VideoReward/checkpoint-11352/model.pth" in result.stderr
    assert (tmp_path / "checkpoints/VideoReward/checkpoint-11352/model.pth").is_file()


def test_failures_name_the_part_and_stop(tmp_path, env):
    result, calls = run(tmp_path, env | {"FAKE_HF_FAIL": "KlingTeam/VideoReward"}, "--no-verify")
    assert result.returncode == 1
    assert result.stderr.strip().endswith(
        "error: hf download KlingTeam/VideoReward failed; re-run this script to resume")
    assert hf_repos(calls) == ["Wan-AI/Wan2.1-T2V-1.3B", "KlingTeam/VideoReward"]
    assert not (tmp_path / "checkpoints/VideoReward").exists()  # created by the failed call, held no data

    result, _ = run(tmp_path, env | {"FAKE_CURL_FAIL": "1"}, "--only", "taehv")
    assert result.returncode == 1 and "download of https://github.com/madebyollin/taehv/raw/main/taew2_1.pth failed" \
        in result.stderr
    assert not (tmp_path / "checkpoints/taew2_1.pth").exists()


def test_unreachable_hub_is_one_line_and_creates_nothing(tmp_path, env):
    result, calls = run(tmp_path, env | {"FAKE_CURL_FAIL": "1"}, "--only", "wan-1.3b,reward-forcing")
    assert result.returncode == 1 and hf_repos(calls) == []
    assert result.stderr == "error: cannot reach https://huggingface.co (offline, or a proxy blocks it?); " \
        "nothing more was downloaded\n"
    assert not (tmp_path / "checkpoints").exists()


def test_missing_hf_cli_is_explained(tmp_path, env):
    (Path(env["PATH"].split(":")[0]) / "hf").unlink()
    if shutil.which("hf", path=env["PATH"]):
        pytest.skip("a real hf is on the system PATH")
    result, _ = run(tmp_path, env, "--only", "reward-forcing")
    assert result.returncode == 1
    assert "error: 'hf' not found on PATH: install the huggingface_hub CLI" in result.stderr


def test_revision_can_be_overridden(tmp_path, env):
    result, calls = run(tmp_path, env | {"QWEN2_VL_REVISION": "main"}, "--only", "qwen2-vl")
    (qwen,) = [call for call in calls if call[0] == "hf"]
    assert result.returncode == 0 and arg(qwen, "--revision") == "main"


@pytest.mark.skipif(os.name != "posix", reason="bash script")
def test_script_is_strict_and_executable():
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert os.access(SCRIPT, os.X_OK)
    assert "huggingface-cli" not in text and "Videoreward" not in text


def test_with_imagereward_fetches_checkpoint_config_and_tokenizer(tmp_path, env):
    result, calls = run(tmp_path, env, "--with-imagereward", "--no-verify")
    assert result.returncode == 0, result.stderr
    assert hf_repos(calls)[-2:] == ["THUDM/ImageReward", "google-bert/bert-base-uncased"]
    folder = tmp_path / "checkpoints/ImageReward"
    assert sorted(p.name for p in folder.iterdir()) == ["ImageReward.pt", "bert-base-uncased", "med_config.json"]
    # The tokenizer files only, in the subfolder the loader reads (reward_forcing/rewards/imagereward.py).
    assert sorted(p.name for p in (folder / "bert-base-uncased").iterdir()) == [
        "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    assert (folder / "med_config.json").read_text() == "THUDM/ImageReward:med_config.json\n"
    again, calls = run(tmp_path, env, "--only", "imagereward")
    assert again.returncode == 0 and calls == [] and again.stdout.count("present:") == 2


def test_causal_forcing_fetches_the_chunkwise_teacher_and_init_where_its_presets_look(tmp_path, env):
    result, calls = run(tmp_path, env, "--only", "causal-forcing")
    assert result.returncode == 0, result.stderr
    assert hf_repos(calls) == ["zhuhz22/Causal-Forcing", "zhuhz22/Causal-Forcing"]
    folder = tmp_path / "checkpoints/chunkwise"
    assert sorted(p.name for p in folder.iterdir()) == ["ar_diffusion.pt", "causal_ode.pt"]
    assert (folder / "causal_ode.pt").read_text() == "zhuhz22/Causal-Forcing:chunkwise/causal_ode.pt\n"
    again, calls = run(tmp_path, env, "--only", "causal-forcing")
    assert again.returncode == 0 and calls == [] and again.stdout.count("present:") == 2
