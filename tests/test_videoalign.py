"""VideoReward (KwaiVGI/VideoAlign): a tiny random Qwen2-VL in the released layout, checked against hand tables,
transformers' own processor pieces, and an unmerged LoRA forward written here (and peft's, when installed)."""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reward_forcing.errors import CheckpointError, UserError, run_cli
from reward_forcing.rewards import qwen_video
from reward_forcing.rewards import videoalign_checkpoint as ckpt
from reward_forcing.rewards.qwen_video import VisionSpec, patchify, sample_frame_indices, smart_resize
from reward_forcing.rewards.videoalign import VideoReward, main
from reward_forcing.testing.videoreward import TINY_TEMPLATE, write_tiny_videoreward

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The released model's video budget: max_frame_pixels 200704, qwen-vl-utils' minimum 128·28².
REAL_SPEC = VisionSpec(14, 2, 2, CLIP_MEAN, CLIP_STD, min_pixels=100352, max_pixels=200704)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_videoreward(tmp_path_factory.mktemp("videoreward"))


@pytest.fixture(scope="module")
def reward(tiny):
    return VideoReward.from_checkpoint(tiny["root"], tiny["qwen_dir"], verify_template=False)


def _videos(batch=2, frames=9, height=64, width=96, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=gen) * 2 - 1


# ---------------- preprocessing goldens ----------------
def test_frame_sampling_matches_hand_table():
    assert sample_frame_indices(81, 16, 2.0) == [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]
    # 33 frames: 4.125 -> 4 frames over 0..32 = 0, 10.67, 21.33, 32
    assert sample_frame_indices(33, 16, 2.0) == [0, 11, 21, 32]
    # 3 frames: the even cap floor(3/2)*2 = 2 wins over the 4-frame minimum
    assert sample_frame_indices(3, 16, 2.0) == [0, 2]
    with pytest.raises(UserError):
        sample_frame_indices(1, 16, 2.0)


def test_smart_resize_golden_and_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    assert smart_resize(480, 832, 28, 100352, 200704) == (336, 588)
    for h, w in [(480, 832), (64, 96), (720, 1280), (100, 3000), (28, 28), (1080, 1920)]:
        assert smart_resize(h, w, 28, 100352, 200704) == tuple(hf_smart_resize(h, w, 28, 100352, 200704))


def test_patchify_matches_transformers_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (56, 84, 3), generator=gen, dtype=torch.uint8)
    hf = Qwen2VLImageProcessorPil(do_resize=False)(images=[image.numpy()], return_tensors="pt")
    frames = image.permute(2, 0, 1)[None].float()  # one frame: padded to two, as HF repeats an image
    patches, grid = patchify(qwen_video.normalise(frames, REAL_SPEC), REAL_SPEC)
    assert list(grid) == hf["image_grid_thw"][0].tolist() == [1, 4, 6]
    torch.testing.assert_close(patches, hf["pixel_values"].float(), atol=1e-5, rtol=0)


def test_patchify_layout_by_hand():
    # Row (t, block_y, block_x, merge_y, merge_x) holds frames 2t, 2t+1 of one 14x14 patch, channel-major.
    frames = torch.randn(4, 3, 56, 84)
    patches, (gt, gh, gw) = patchify(frames, REAL_SPEC)
    assert (gt, gh, gw) == (2, 4, 6)
    row = 0
    for t in range(gt):
        for by in range(gh // 2):
            for bx in range(gw // 2):
                for my in range(2):
                    for mx in range(2):
                        y, x = (2 * by + my) * 14, (2 * bx + mx) * 14
                        block = frames[2 * t:2 * t + 2, :, y:y + 14, x:x + 14].transpose(0, 1)  # [C, 2, 14, 14]
                        assert torch.equal(patches[row], block.reshape(-1))
                        row += 1


def test_token_counts_native_and_all_frames():
    video = torch.zeros(3, 81, 480, 832)
    patches, grid = qwen_video.preprocess_video(video, REAL_SPEC, video_fps=16, sample_fps=2.0)
    assert grid == (5, 24, 42) and grid[0] * grid[1] * grid[2] // 4 == 1260
    assert patches.shape == (5040, 1176)
    # Reward-Forcing's path: all 81 frames at a fixed 336x588, padded to 82 frames.
    _, grid = patchify(torch.zeros(81, 3, 336, 588), REAL_SPEC)
    assert grid == (41, 24, 42) and grid[0] * grid[1] * grid[2] // 4 == 10332


def test_resize_stays_on_uint8_levels_and_maps_ranges():
    x = torch.rand(2, 3, 30, 50) * 255
    out = qwen_video.resize_frames(x, (28, 56))
    assert out.shape == (2, 3, 28, 56) and torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 255
    v = torch.tensor([-1.0, 0.0, 1.0])
    torch.testing.assert_close(qwen_video.to_unit255(v, "[-1,1]"), torch.tensor([0.0, 127.5, 255.0]))
    torch.testing.assert_close(qwen_video.to_unit255(v.clamp(0, 1), "[0,1]"), torch.tensor([0.0, 0.0, 255.0]))
    with pytest.raises(UserError):
        qwen_video.to_unit255(v, "[-255,255]")


# ---------------- checkpoint keys and LoRA ----------------
def test_old_layout_prefix_remap():
    old = {
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight": 1,
        "base_model.model.model.embed_tokens.weight": 2,
        "base_model.model.visual.blocks.0.attn.qkv.weight": 3,
        "base_model.model.lm_head.weight": 4,
        "base_model.model.rm_head.weight": 5,
        "base_model.model.model.language_model.norm.weight": 6,  # already new: untouched
    }
    assert ckpt.remap_old_layout(old) == {
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.weight": 1,
        "base_model.model.model.language_model.embed_tokens.weight": 2,
        "base_model.model.model.visual.blocks.0.attn.qkv.weight": 3,
        "base_model.model.lm_head.weight": 4,
        "base_model.model.rm_head.weight": 5,
        "base_model.model.model.language_model.norm.weight": 6,
    }


def test_merge_lora_closed_form():
    state = {
        "m.q.base_layer.weight": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        "m.q.base_layer.bias": torch.tensor([0.5, -0.5]),
        "m.q.lora_A.default.weight": torch.tensor([[1.0, 2.0]]),  # [r=1, in=2]
        "m.q.lora_B.default.weight": torch.tensor([[3.0], [4.0]]),  # [out=2, r=1]
        "m.norm.weight": torch.tensor([1.0]),
    }
    merged = ckpt.merge_lora(state, scale=2.0)
    # W + 2·B@A = I + 2·[[3, 6], [4, 8]]
    assert set(merged) == {"m.q.weight", "m.q.bias", "m.norm.weight"}
    assert torch.equal(merged["m.q.weight"], torch.tensor([[7.0, 12.0], [8.0, 17.0]]))
    assert torch.equal(merged["m.q.bias"], torch.tensor([0.5, -0.5]))
    assert ckpt.lora_scale({"lora_r": 64, "lora_alpha": 128}) == 2.0
    del state["m.q.lora_B.default.weight"]
    with pytest.raises(CheckpointError, match="incomplete LoRA"):
        ckpt.merge_lora(state, 2.0)


def _reference_qwen(tiny):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = json.loads((tiny["qwen_dir"] / "config.json").read_text())
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**config)).eval()
    model.rm_head = torch.nn.Linear(config["hidden_size"], 1, bias=False)
    return model


def _reference_scores(backbone, rm_head, inputs, reward_ids):
    """Sequential positions arange(L) on all three axes, head read at each reward token."""
    ids = inputs["input_ids"]
    positions = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, ids.shape[0], -1)
    hidden = backbone(input_ids=ids, attention_mask=inputs["attention_mask"], position_ids=positions,
                      pixel_values_videos=inputs["pixel_values_videos"],
                      video_grid_thw=inputs["video_grid_thw"]).last_hidden_state
    cols = []
    for token_id in reward_ids:
        b, pos = (ids == token_id).nonzero(as_tuple=True)
        assert b.tolist() == list(range(ids.shape[0]))  # once per sample
        cols.append(rm_head(hidden[b, pos])[:, 0])
    return torch.stack(cols, 1)


def test_merged_scores_equal_hand_written_unmerged_lora(tiny, reward):
    """Reference: base weights loaded as they are, LoRA applied in the forward as x·Wᵀ + s·(x·Aᵀ)·Bᵀ."""
    ref = _reference_qwen(tiny)
    state = torch.load(tiny["step_dir"] / "model.pth", weights_only=True)
    cfg = json.loads((tiny["root"] / "model_config.json").read_text())["peft_lora_config"]
    scale = cfg["lora_alpha"] / cfg["lora_r"]
    modules = dict(ref.named_modules())
    n_lora = 0
    for key, value in state.items():
        new = key.removeprefix("base_model.model.")
        new = "model.visual." + new[len("visual."):] if new.startswith("visual.") else new
        new = "model.language_model." + new[len("model."):] if new.startswith("model.") and not new.startswith(
            "model.visual.") else new
        if ".lora_" in new:
            continue
        if ".base_layer." in new:
            name = new.split(".base_layer.")[0]
            module = modules[name]
            getattr(module, new.rsplit(".", 1)[1]).data.copy_(value)
            if new.endswith("weight"):
                a = state[key.replace("base_layer.weight", "lora_A.default.weight")]
                b = state[key.replace("base_layer.weight", "lora_B.default.weight")]
                module.forward = (lambda m, a, b: lambda x: F.linear(x, m.weight, m.bias)
                                  + scale * F.linear(F.linear(x, a), b))(module, a, b)
                n_lora += 1
        else:
            ref.get_parameter(new).data.copy_(value)
    assert n_lora == 14  # q, k, v, o, gate, up, down in each of the 2 decoder layers
    videos, prompts = _videos(), ["a red fox jumps", "two dogs run on the beach at sunset, {camera pans}"]
    inputs = reward.prepare(videos, prompts)
    with torch.no_grad():
        expected = _reference_scores(ref.model, ref.rm_head, inputs, reward.reward_ids)
        got = reward(**inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    scores = reward.score(videos, prompts)
    torch.testing.assert_close(torch.stack([scores["VQ"], scores["MQ"], scores["TA"]], 1), expected,
                               atol=1e-5, rtol=1e-5)


def test_released_layout_matches_peft_and_scores_equal_peft_unmerged(tiny, reward):
    peft = pytest.importorskip("peft")
    ref = _reference_qwen(tiny)
    targets = [n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)
               and not any(w in n for w in ("lm_head", "rm_head", "embed_tokens", "visual"))]
    cfg = json.loads((tiny["root"] / "model_config.json").read_text())["peft_lora_config"]
    wrapped = peft.get_peft_model(ref, peft.LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"],
                                                       target_modules=targets, lora_dropout=0.05, bias="none"))
    state = ckpt.remap_old_layout(torch.load(tiny["step_dir"] / "model.pth", weights_only=True))
    expected_keys = set(wrapped.state_dict())
    state = {k: v for k, v in state.items() if k in expected_keys or k != "base_model.model.lm_head.weight"}
    assert set(state) == expected_keys  # the tiny writer's peft names, after transformers >= 4.52's 2 remaps
    wrapped.load_state_dict(state, strict=True)
    wrapped.eval()
    inputs = reward.prepare(_videos(seed=3), ["a cat", "a slow zoom on a mountain lake"])
    with torch.no_grad():
        expected = _reference_scores(wrapped.base_model.model.model, wrapped.base_model.model.rm_head, inputs,
                                     reward.reward_ids)
        torch.testing.assert_close(reward(**inputs), expected, atol=1e-5, rtol=1e-5)


# ---------------- model behaviour ----------------
def test_tiny_model_size_and_special_token_ids(reward):
    n = sum(p.numel() for p in reward.parameters())
    assert n == 186_688  # the tiny sizes' count (lm_head is tied, so not counted twice)
    assert reward.reward_ids == [505, 506, 507] and reward.video_token_id == 501


def test_special_token_order_vq_mq_ta(reward):
    inputs = reward.prepare(_videos(batch=1), ["a prompt"])
    ids = inputs["input_ids"][0].tolist()
    vq, mq, ta = (ids.index(reward.tokenizer.convert_tokens_to_ids(t)) for t in
                  ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"))
    assert vq < mq < ta
    bad = TINY_TEMPLATE.replace("<|VQ_reward|>", "@").replace("<|MQ_reward|>", "<|VQ_reward|>").replace(
        "@", "<|MQ_reward|>")
    with pytest.raises(CheckpointError, match="order"):
        ckpt.check_template(bad)
    with pytest.raises(CheckpointError, match="exactly once"):
        ckpt.check_template(TINY_TEMPLATE.replace("<|TA_reward|>", ""))
    with pytest.raises(UserError, match="exactly once"):
        reward.score(_videos(batch=1), ["sneaky <|MQ_reward|>"])


def test_chat_wrapping_and_literal_braces(reward):
    prompt = "a {weird} prompt with } and {text_prompt"
    inputs = reward.prepare(_videos(batch=1, frames=5), [prompt])
    text = reward.tokenizer.decode(inputs["input_ids"][0])
    n_video = int(inputs["video_grid_thw"][0].prod()) // 4
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                + "<|video_pad|>" * n_video + "<|vision_end|>" + TINY_TEMPLATE.replace("{text_prompt}", prompt)
                + "<|im_end|>\n<|im_start|>assistant\n")
    assert text == expected


def test_batch_of_two_equals_two_batches_of_one(reward):
    videos = _videos(batch=2, seed=5)
    prompts = ["short", "a much longer prompt about a dog chasing a ball in a sunny park, slow motion"]
    both = reward.score(videos, prompts)
    for i in range(2):
        one = reward.score(videos[i:i + 1], prompts[i:i + 1])
        for name in ("VQ", "MQ", "TA", "Overall_norm"):
            torch.testing.assert_close(both[name][i:i + 1], one[name], atol=2e-5, rtol=1e-5)
    assert not torch.allclose(both["TA"][0], both["TA"][1])


def test_scores_independent_of_earlier_calls(reward):
    videos = _videos(batch=1, seed=7)
    first = reward.score(videos, ["a boat"])["MQ"]
    reward.score(_videos(batch=2, frames=17, seed=8), ["x", "y z"])
    torch.testing.assert_close(reward.score(videos, ["a boat"])["MQ"], first, atol=0, rtol=0)


def test_input_ranges_agree_and_normalisation(tiny, reward):
    videos = _videos(batch=1, seed=9)
    a = reward.score(videos, ["a tree"])
    b = reward.score((videos + 1) * 127.5, ["a tree"], input_range="[0,255]")
    c = reward.score((videos + 1) / 2, ["a tree"], input_range="[0,1]")
    for name in ("VQ", "MQ", "TA"):
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)
        torch.testing.assert_close(a[name], c[name], atol=1e-5, rtol=0)
    stats = json.loads((tiny["root"] / "model_config.json").read_text())["inference_config"]
    for name in ("VQ", "MQ", "TA"):
        torch.testing.assert_close(a[f"{name}_norm"], (a[name] - stats[f"{name}_mean"]) / stats[f"{name}_std"])
    torch.testing.assert_close(a["Overall"], a["VQ"] + a["MQ"] + a["TA"])


def test_gradient_reaches_pixels_only_in_differentiable_mode(reward):
    videos = _videos(batch=2, seed=11).requires_grad_(True)
    plain = reward.score(videos, ["a", "b"])
    assert plain["MQ"].grad_fn is None
    scores = reward.score(videos, ["a", "b"], differentiable=True)
    torch.testing.assert_close(scores["MQ"].detach(), plain["MQ"], atol=1e-6, rtol=0)
    scores["MQ_norm"][1].backward()
    grad = videos.grad
    assert torch.isfinite(grad).all() and grad[1].abs().sum() > 0
    assert grad[0].abs().sum() == 0  # sample 0's pixels do not affect sample 1's score
    assert all(p.grad is None for p in reward.parameters())


def test_all_frames_mode_and_fixed_size(reward):
    videos = _videos(batch=1, frames=9)
    inputs = reward.prepare(videos, ["a"], sample="all", size=(56, 84))
    assert inputs["video_grid_thw"].tolist() == [[5, 4, 6]]  # 9 frames padded to 10
    fps_inputs = reward.prepare(videos, ["a"])  # 9 frames at 16 fps -> 4 sampled frames
    assert fps_inputs["video_grid_thw"][0, 0].item() == 2
    with pytest.raises(UserError):
        reward.prepare(videos, ["a"], size=(50, 84))
    with pytest.raises(UserError):
        reward.prepare(videos, ["a", "b"])
    with pytest.raises(UserError):
        reward.prepare(videos[0], ["a"])


# ---------------- loading ----------------
def _write_template(path, text):
    path.write_text("raise SystemExit('never executed')\n"
                    f"DETAILED_PROMPT_WITH_SPECIAL_TOKEN = {text!r}\nOTHER = 1\n")


def test_template_is_read_without_executing_and_hash_checked(tmp_path):
    path = tmp_path / "prompt_template.py"
    _write_template(path, TINY_TEMPLATE)
    digest = hashlib.sha256(TINY_TEMPLATE.encode()).hexdigest()
    assert ckpt.read_template(path, expected_sha256=digest) == TINY_TEMPLATE
    with pytest.raises(CheckpointError, match="sha256"):
        ckpt.read_template(path)  # VideoAlign's hash: the synthetic rubric is refused
    path.write_text("X = 1\n")
    with pytest.raises(CheckpointError, match="no string constant"):
        ckpt.read_template(path)


def test_loader_refuses_wrong_template_and_accepts_override(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="sha256"):
        VideoReward.from_checkpoint(tiny["root"], tiny["qwen_dir"])
    model = VideoReward.from_checkpoint(tiny["root"], tiny["qwen_dir"], template_text=TINY_TEMPLATE)
    assert model.template == TINY_TEMPLATE


def test_step_selection_and_strict_load_errors(tiny, tmp_path):
    root = tmp_path / "Videoreward"  # upstream's lower-case spelling is found from the parent folder
    shutil.copytree(tiny["root"], root)
    step_dir = tiny["step_dir"].name
    shutil.copytree(root / step_dir, root / "checkpoint-100")
    assert ckpt.find_step_dir(ckpt.resolve_root(tmp_path)).name == "checkpoint-100"
    assert ckpt.find_step_dir(root, step=8).name == "checkpoint-8"
    with pytest.raises(CheckpointError, match="checkpoint-7"):
        ckpt.find_step_dir(root, step=7)
    state = torch.load(root / "checkpoint-100" / "model.pth", weights_only=True)
    del state["base_model.model.rm_head.weight"]
    state["base_model.model.extra.weight"] = torch.zeros(1)
    torch.save(state, root / "checkpoint-100" / "model.pth")
    with pytest.raises(CheckpointError, match="lacks"):
        VideoReward.from_checkpoint(tmp_path, tiny["qwen_dir"], verify_template=False)
    state["base_model.model.rm_head.weight"] = torch.zeros(1, 64)
    torch.save(state, root / "checkpoint-100" / "model.pth")
    with pytest.raises(CheckpointError, match="unexpected.*extra.weight"):
        VideoReward.from_checkpoint(tmp_path, tiny["qwen_dir"], verify_template=False)
    (root / "checkpoint-100" / "model.pth").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="cannot load"):
        VideoReward.from_checkpoint(tmp_path, tiny["qwen_dir"], verify_template=False)


def test_cli_scores_an_mp4_and_reports_bad_input(tiny, tmp_path, capsys):
    import imageio.v2 as imageio

    frames = (np.random.default_rng(0).random((8, 56, 84, 3)) * 255).astype(np.uint8)
    video = tmp_path / "clip.mp4"
    imageio.mimwrite(video, frames, fps=16, macro_block_size=1)
    args = ["--checkpoint_dir", str(tiny["root"]), "--qwen_dir", str(tiny["qwen_dir"]), "--device", "cpu",
            "--unverified_template", str(video), "a {braced} prompt"]
    assert run_cli(main, args) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["VQ", "MQ", "TA", "Overall"]
    assert run_cli(main, args[:-2] + [str(tmp_path / "missing.mp4"), "x"]) == 2
    (tmp_path / "bad.mp4").write_bytes(b"garbage")
    assert run_cli(main, args[:-2] + [str(tmp_path / "bad.mp4"), "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)


def test_vq_and_mq_ignore_the_prompt(reward):
    # Causal decoder + the prompt sitting only in the TA section: VQ and MQ cannot see it.
    video = _videos(batch=1, seed=13).expand(2, -1, -1, -1, -1)
    scores = reward.score(video, ["a quiet forest", "an explosion in a busy city street at night"])
    torch.testing.assert_close(scores["VQ"][0], scores["VQ"][1], atol=2e-5, rtol=0)
    torch.testing.assert_close(scores["MQ"][0], scores["MQ"][1], atol=2e-5, rtol=0)
    assert (scores["TA"][0] - scores["TA"][1]).abs() > 1e-4
