"""The Causal Forcing path on tiny assets, through the command-line entry points: the autoregressive teacher
(`trainer: diffusion` with `causal: true`) trains, exports and resumes exactly; its causal ODE pairs
(scripts/generate_ode_pairs.py with `ode_teacher_causal`) are its streamed samples; `trainer: ode` and DMD start from
them unchanged. Causal Forcing's released files load as `generator_ckpt` and as `ode_teacher_name`; the presets load."""
import json
from pathlib import Path

import pytest
import torch

from reward_forcing.checkpoints import load_generator_state_dict, load_wan_folder
from reward_forcing.config import load_config
from reward_forcing.inference.ar_teacher import ARTeacherSampler
from reward_forcing.inference.pipeline import load_student
from reward_forcing.models.text_encoder import TextEncoder
from reward_forcing.sampling import euler_sigmas, warped_steps
from reward_forcing.testing.assets import CAUSAL_FORCING_FILES
from reward_forcing.training.cli import main as train
from reward_forcing.training.ode_data import OdePairDataset, prepare_output_dir, write_shard
from reward_forcing.training.ode_pairs import load_teacher, main as generate_ode_pairs
from reward_forcing.training.state import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_train.yaml"
FRAMES = 6  # two chunks of 3
# the teacher attends to the whole causal context, as configs/causal_forcing_teacher.yaml
ATTENTION = ("local_attn_size=-1", "sink_size=0", "sink_mode=none")


@pytest.fixture(scope="module")
def assets(tmp_path_factory, write_training_assets):
    root = write_training_assets(tmp_path_factory.mktemp("causal_forcing"))
    prepare_output_dir(root / "latents", {"num_prompts": 8, "shard_size": 8})
    prompts = (root / "prompts.txt").read_text().splitlines()
    latents = torch.randn(8, 1, 16, FRAMES, 4, 4, generator=torch.Generator().manual_seed(0))
    write_shard(root / "latents", 0, [prompts[i % len(prompts)] for i in range(8)], list(range(8)), latents)
    return root


def _train(assets, logdir, *overrides):
    train(["--config_path", str(CONFIG), "--logdir", str(logdir), "--disable-wandb", f"checkpoint_dir={assets}",
           f"prompt_path={assets / 'prompts.txt'}", "seed=5", *ATTENTION, *overrides])


def _teacher(assets, logdir, *overrides):
    _train(assets, logdir, "trainer=diffusion", "causal=true", f"data_path={assets / 'latents'}", "max_steps=4",
           "save_every=2", "batch_size=2", "ema_start=1", *overrides)


def _rows(logdir):
    return [{k: v for k, v in json.loads(line).items() if k not in ("step_time", "wall_time")}
            for line in (Path(logdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher(assets):
    logdir = assets / "teacher"
    _teacher(assets, logdir)
    return logdir


def test_the_ar_teacher_trains_exports_a_causal_wan_folder_and_resumes_exactly(assets, teacher, tmp_path):
    rows = _rows(teacher)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] > 0 and r["grad_norm"] > 0 for r in rows)
    config, weights = load_wan_folder(teacher / "model")
    _, start = load_wan_folder(assets / "Wan2.1-T2V-1.3B")
    assert config == json.loads((assets / "Wan2.1-T2V-1.3B" / "config.json").read_text())
    assert weights.keys() == start.keys() and any(not torch.equal(weights[k], start[k]) for k in weights)
    # it loads as the causal student (generator_ckpt) and as the causal ODE teacher
    cfg = load_config(CONFIG, [f"checkpoint_dir={assets}", *ATTENTION, "ode_teacher_causal=true",
                               f"ode_teacher_name={teacher / 'model'}"])
    loaded = load_teacher(cfg, "cpu")
    assert type(loaded).__name__ == "CausalWanModel" and loaded.num_frame_per_block == 3
    assert all(torch.equal(loaded.state_dict()[k], weights[k]) for k in weights)

    crashed = tmp_path / "crashed"
    _teacher(assets, crashed, "max_steps=3")
    import shutil
    shutil.rmtree(crashed / "checkpoints" / "step_00000003")  # the crash came before step 3's checkpoint completed
    assert latest_checkpoint(crashed).name == "step_00000002"
    _teacher(assets, crashed)
    assert _rows(crashed) == rows
    _, ema, = load_wan_folder(teacher / "model_ema")
    _, resumed = load_wan_folder(crashed / "model_ema")
    assert all(torch.equal(resumed[k], ema[k]) for k in ema)


def test_the_causal_mode_differs_from_the_bidirectional_one(assets, teacher, tmp_path):
    """The same data, seed and start with causal=false trains another model (the mode is not a no-op)."""
    _train(assets, tmp_path / "bi", "trainer=diffusion", f"data_path={assets / 'latents'}", "max_steps=1",
           "batch_size=2")
    assert _rows(tmp_path / "bi")[0]["loss"] != _rows(teacher)[0]["loss"]


def _pairs(assets, out, teacher_name, *overrides):
    generate_ode_pairs(["--config_path", str(CONFIG), "--data_path", str(assets / "prompts.txt"),
                        "--output_dir", str(out), f"checkpoint_dir={assets}", *ATTENTION, "ode_teacher_causal=true",
                        f"ode_teacher_name={teacher_name}", f"ode_num_frames={FRAMES}", "ode_num_steps=4",
                        "ode_keep_indices=[0,1,2,3,4]", "ode_shard_size=2", "ode_save_dtype=float32", "seed=3",
                        *overrides])


@pytest.fixture(scope="module")
def pairs(assets, teacher):
    _pairs(assets, assets / "pairs", teacher / "model")
    return assets / "pairs"


def test_causal_pairs_are_the_teachers_streamed_samples(assets, teacher, pairs):
    manifest = json.loads((pairs / "manifest.json").read_text())
    assert manifest["teacher_causal"] is True and manifest["num_frame_per_block"] == 3
    data = OdePairDataset(pairs)
    assert len(data) == 5 and data[0]["ode_latent"].shape == (5, 16, FRAMES, 4, 4)
    # an independent assembly of the pieces: the exported weights, the text encoder, the config's grid and CFG
    cfg = load_config(CONFIG, [f"checkpoint_dir={assets}", *ATTENTION])
    model, _ = load_student(cfg, teacher / "model")
    encoder = TextEncoder.from_wan_folder(assets / cfg.model_name, cfg.text_encoder)
    with torch.no_grad():
        cond, uncond = encoder.encode([data[2]["prompts"]]), encoder.encode([cfg.negative_prompt])
    sampler = ARTeacherSampler(model, euler_sigmas(4, cfg.ode_shift), 3, guidance_scale=cfg.ode_guidance_scale,
                               uncond=uncond)
    states = data[2]["ode_latent"]
    video = torch.cat(list(sampler.stream(cond, FRAMES, (4, 4), noise=states[:1])), dim=2)
    torch.testing.assert_close(states[-1], video[0], atol=1e-5, rtol=1e-5)


def test_causal_pairs_resume_exactly_and_refuse_other_cache_settings(assets, teacher, pairs, tmp_path, capsys):
    import shutil

    from reward_forcing.errors import run_cli
    from reward_forcing.training.ode_data import shard_name

    copy = tmp_path / "pairs"
    shutil.copytree(pairs, copy)
    (copy / shard_name(1)).unlink()  # pairs 2 and 3
    _pairs(assets, copy, teacher / "model")
    for i in range(5):
        assert torch.equal(OdePairDataset(copy)[i]["ode_latent"], OdePairDataset(pairs)[i]["ode_latent"])
    status = run_cli(lambda _: _pairs(assets, copy, teacher / "model", "local_attn_size=3"))
    assert status == 2 and "made with local_attn_size=-1, not 3" in capsys.readouterr().err


def test_a_non_chunk_multiple_is_refused_in_one_line(assets, teacher, tmp_path, capsys):
    from reward_forcing.errors import run_cli

    status = run_cli(generate_ode_pairs, [
        "--config_path", str(CONFIG), "--data_path", str(assets / "prompts.txt"), "--output_dir", str(tmp_path),
        f"checkpoint_dir={assets}", "ode_teacher_causal=true", f"ode_teacher_name={teacher / 'model'}",
        "ode_num_frames=7"])
    assert status == 2
    assert capsys.readouterr().err.strip() == ("error: ode_num_frames=7 must be a multiple of num_frame_per_block=3: "
                                               "the autoregressive teacher generates whole chunks")


def test_ode_init_and_dmd_run_unchanged_from_the_causal_pairs(assets, teacher, pairs, tmp_path):
    labels = "ode_timesteps=[1000,750,500,250,0]"
    _train(assets, tmp_path / "ode", "trainer=ode", f"data_path={pairs}", labels, "max_steps=2", "save_every=2",
           f"generator_ckpt={teacher / 'model'}", "lr_generator=1e-3")
    init = tmp_path / "ode" / "ode_init.pt"
    assert [r["step"] for r in _rows(tmp_path / "ode")] == [1, 2]
    _train(assets, tmp_path / "dmd", "trainer=distill", "distill_loss=dmd", f"generator_ckpt={init}", "max_steps=1",
           "reward.qwen_dir=Qwen2-VL-2B-Instruct")
    assert "generator_loss" in _rows(tmp_path / "dmd")[0]


# --- Causal Forcing's released files -------------------------------------------------------------------------

def upstream_keys(num_layers: int) -> set[str]:
    """The parameter names of thu-ml/Causal-Forcing's wan/modules/causal_model.py CausalWanModel (t2v, qk_norm and
    cross_attn_norm on, as Wan2.1's config.json sets them), written out from its module tree."""
    linear = ("weight", "bias")
    keys = {f"{m}.{p}" for m in ("patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0",
                                 "time_embedding.2", "time_projection.1", "head.head") for p in linear}
    keys.add("head.modulation")
    for i in range(num_layers):
        block = f"blocks.{i}"
        keys |= {f"{block}.{m}.{p}" for m in ("norm3", "ffn.0", "ffn.2") for p in linear}
        keys.add(f"{block}.modulation")
        for attn in ("self_attn", "cross_attn"):
            keys |= {f"{block}.{attn}.{m}.{p}" for m in "qkvo" for p in linear}
            keys |= {f"{block}.{attn}.norm_q.weight", f"{block}.{attn}.norm_k.weight"}
    return keys


def test_the_fake_release_has_upstreams_layout_and_keys(assets):
    for name in CAUSAL_FORCING_FILES:
        obj = torch.load(assets / name, weights_only=True)
        assert set(obj) == {"generator"}
        assert all(key.startswith("model.") for key in obj["generator"])
        assert {key.removeprefix("model.") for key in obj["generator"]} == upstream_keys(2)


@pytest.mark.parametrize("prefix", ["model.", "model._fsdp_wrapped_module."])  # both upstream's loaders accept
def test_the_released_causal_init_loads_as_generator_ckpt(assets, tmp_path, prefix):
    from reward_forcing.training.networks import sharded_student
    from reward_forcing.training.parallel import init_distributed, shutdown
    from reward_forcing.training.state import full_state_dict

    released = torch.load(assets / "chunkwise/causal_ode.pt", weights_only=True)["generator"]
    path = tmp_path / "chunkwise" / "causal_ode.pt"
    path.parent.mkdir()
    torch.save({"generator": {prefix + k.removeprefix("model."): v for k, v in released.items()}}, path)
    cfg = load_config(ROOT / "configs" / "causal_forcing_dmd.yaml", [f"checkpoint_dir={assets}"])
    cfg.checkpoint_dir = str(tmp_path)  # generator_ckpt chunkwise/causal_ode.pt resolves here; the base folder
    cfg.model_name = str(assets / "Wan2.1-T2V-1.3B")  # (the architecture) stays in the assets
    info = init_distributed()
    try:
        weights = full_state_dict(sharded_student(cfg, info, torch.float32))
    finally:
        shutdown()
    assert weights.keys() == {k.removeprefix("model.") for k in released}
    assert all(torch.equal(weights[k.removeprefix("model.")], v) for k, v in released.items())


def test_the_released_ar_teacher_loads_as_the_causal_ode_teacher(assets):
    cfg = load_config(ROOT / "configs" / "causal_forcing_ode.yaml", [f"checkpoint_dir={assets}"])
    released = load_generator_state_dict(assets / "chunkwise/ar_diffusion.pt")
    teacher = load_teacher(cfg, "cpu")
    assert type(teacher).__name__ == "CausalWanModel"
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in released.items())


# --- the presets ------------------------------------------------------------------------------------------------

def test_the_three_presets_load_and_chain():
    teacher, ode, dmd = (load_config(ROOT / "configs" / f"causal_forcing_{n}.yaml") for n in ("teacher", "ode", "dmd"))
    assert (teacher.trainer, teacher.causal, teacher.diffusion_timestep_shift, teacher.ema_decay) == (
        "diffusion", True, 5.0, None)
    assert (ode.trainer, ode.ode_teacher_causal, ode.ode_teacher_name, ode.generator_ckpt) == (
        "ode", True, "chunkwise/ar_diffusion.pt", "chunkwise/ar_diffusion.pt")
    assert (ode.ode_num_steps, ode.ode_shift, ode.ode_guidance_scale, list(ode.adam_betas)) == (48, 5.0, 6.0, [0.9, 0.999])
    assert (dmd.trainer, dmd.distill_loss, dmd.generator_ckpt, dmd.real_name) == (
        "distill", "dmd", "chunkwise/causal_ode.pt", "Wan2.1-T2V-14B")
    assert (dmd.ema_start, dmd.guidance_scale, dmd.lr_generator, dmd.lr_critic) == (200, 3.0, 2e-6, 4e-7)
    for cfg in (teacher, ode, dmd):  # one architecture and one cache through the three stages
        assert (cfg.model_name, cfg.num_frame_per_block, cfg.local_attn_size, cfg.sink_size) == (
            "Wan2.1-T2V-1.3B", 3, -1, 0)
        assert cfg.batch_size * cfg.grad_accum * 8 == 64  # upstream's 64 GPUs x batch 1, on 8 GPUs
    # the regression labels are the recorded states' own timesteps: warped labels = 1000 x the pairs' sigmas
    sigmas = euler_sigmas(ode.ode_num_steps, ode.ode_shift)[list(ode.ode_keep_indices)]
    assert warped_steps(ode.ode_timesteps, ode.ode_shift) == pytest.approx((1000 * sigmas).tolist(), abs=1e-9)


def test_the_causal_trainer_feeds_the_clean_copy_and_one_timestep_per_chunk(assets, tmp_path):
    from reward_forcing.training.diffusion import FlowMatching
    from reward_forcing.training.loop import Run
    from reward_forcing.training.parallel import init_distributed, shutdown

    cfg = load_config(CONFIG, [f"checkpoint_dir={assets}", *ATTENTION, "trainer=diffusion", "causal=true",
                               f"data_path={assets / 'latents'}", "batch_size=2", "seed=5"])
    seen = []
    info = init_distributed()
    try:
        method = FlowMatching(Run.open(cfg, tmp_path, info))
        method.model.register_forward_pre_hook(lambda _, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
        method.micro_step(0, 0)
        clean = method.batches(0, 0)[1][:, -1]
    finally:
        shutdown()
    (x_t, t, _), kwargs = seen[0]
    assert torch.equal(kwargs["clean_x"], clean)  # [clean || noisy]: the batch's own clean latents
    assert t.shape == (2, FRAMES) and all(len(set(chunk.tolist())) == 1 for row in t for chunk in row.split(3))
    assert (t[:, 0] != t[:, 3]).any()  # chunks are noised at their own levels
    sigma = (x_t - clean).transpose(1, 2).flatten(2).std(dim=2)  # x_t's noise level follows its frame's timestep
    assert (sigma[:, 0] > sigma[:, 3]).tolist() == (t[:, 0] > t[:, 3]).tolist()
