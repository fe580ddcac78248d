"""Distiller wiring: generator_micro / critic_micro against the DMD / Re-DMD formulas, term by term.

A real Distiller is built from tiny random checkpoints (a world of one), then its rollout, teacher, critic and
reward are replaced by stand-ins whose outputs are known in closed form: the rollout returns a fixed leaf x,
the teacher predicts a constant flow F_c (conditional) or F_u (unconditional), the critic a linear flow
a * x_t + b, and the reward fixed per-sample scores. The expectations below follow the method's formulas (DMD as in Self Forcing,
arXiv 2506.08009, with upstream's CFG form; the weight of Reward Forcing, arXiv 2512.04678 Sec. 3.3):
  x0 = x_t - sigma_score(t) * flow          (teacher / critic x0 predictions, on the score grid)
  x_real = x0_c + s (x0_c - x0_u)
  g = (x_fake - x_real) / mean_{C,F,H,W} |x - x_real|      per sample
  w = exp(beta * MQ_norm)                    per sample
  dL/dx = w g / numel(x) / grad_accum
  critic: ((x_t - x0_pred) / sigma_gen(t) - (eps - x))^2 = ((x - x0_pred) / sigma_gen(t))^2, mean
Sigmas come from a closed-form nearest point of the shifted training grid written here, not from the code.
"""
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from reward_forcing.config import load_config
from reward_forcing.testing.closed_forms import grid_sigma
from reward_forcing.training import distill
from reward_forcing.training import rollout as rollout_module
from reward_forcing.training.loop import Run
from reward_forcing.training.parallel import init_distributed, shutdown

ROOT = Path(__file__).parents[1]
BATCH, GRAD_ACCUM = 2, 2
MQ_NORM, MQ_RAW = torch.tensor([0.35, -0.6]), torch.tensor([1.9, -2.4])
CONTEXT_NOISE = 40.0


@pytest.fixture(scope="module")
def distiller(tmp_path_factory, write_training_assets):
    assets = write_training_assets(tmp_path_factory.mktemp("distill_assets"))
    cfg = load_config(ROOT / "configs" / "tiny_train.yaml", [
        f"checkpoint_dir={assets}", f"prompt_path={assets / 'prompts.txt'}", "seed=7", f"batch_size={BATCH}",
        f"grad_accum={GRAD_ACCUM}", "distill_loss=re_dmd", f"context_noise={CONTEXT_NOISE}"])
    info = init_distributed()
    try:
        yield distill.Distiller(Run.open(cfg, tmp_path_factory.mktemp("distill_run"), info))
    finally:
        shutdown()


def per_sample(sigma: torch.Tensor) -> torch.Tensor:
    """[B] or [B, F] sigmas against [B, C, F, H, W] latents."""
    return sigma.reshape(sigma.shape[0], 1, -1, 1, 1)


class ConstantTeacher(torch.nn.Module):
    """Flow F_c for rows whose text context is not the unconditional one, F_u for the unconditional rows."""

    def __init__(self, cond, uncond, uncond_context):
        super().__init__()
        self.cond, self.uncond, self.uncond_context, self.rows = cond, uncond, uncond_context, []

    def forward(self, x_t, t, context):
        is_uncond = (context == self.uncond_context.to(context)).flatten(1).all(dim=1)
        for b in range(x_t.shape[0]):
            self.rows.append((x_t[b].detach().clone(), t[b].detach().clone(), bool(is_uncond[b])))
        flow = torch.where(is_uncond.reshape(-1, 1, 1, 1, 1), self.uncond, self.cond)
        return flow.expand_as(x_t).to(x_t.dtype)


class LinearCritic(torch.nn.Module):
    """Flow a * x_t + b, with trainable a (scalar) and b (one latent)."""

    def __init__(self, shape, gen):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3))
        self.b = torch.nn.Parameter(torch.randn(shape, generator=gen))
        self.calls = []

    def forward(self, x_t, t, context):
        self.calls.append((x_t.detach().clone(), t.detach().clone(), context.detach().clone()))
        return self.a * x_t + self.b


class FixedScores:
    """Reward stand-in: fixed per-sample scores; records what it was asked to score."""

    def __init__(self):
        self.seen = []

    def __call__(self, latents, prompts):
        self.seen.append((latents.detach().clone(), list(prompts)))
        return {"VQ": torch.tensor([0.1, 0.2]), "MQ": MQ_RAW.clone(), "TA": torch.tensor([0.3, 0.4]),
                "MQ_norm": MQ_NORM.clone()}


def _latent_shape(d):
    return (BATCH, d.generator.in_dim, int(d.cfg.num_training_frames), *d.latent_hw)


def _stand_ins(d, monkeypatch, x_scale=(1.0, 4.0)):
    """Install the stand-ins; returns (x, teacher, critic, reward, captured) where x is the rollout's leaf."""
    gen = torch.Generator().manual_seed(3)
    shape = _latent_shape(d)
    x = torch.randn(shape, generator=gen) * torch.tensor(x_scale).reshape(-1, 1, 1, 1, 1)
    captured = {}
    real_rollout = rollout_module.rollout

    def fixed_rollout(*args, **kwargs):
        bound = inspect.signature(real_rollout).bind(*args, **kwargs)
        bound.apply_defaults()
        context, num_frames, with_grad = (bound.arguments[k] for k in ("context", "num_frames", "with_grad"))
        assert (context.shape[0], num_frames, tuple(bound.arguments["latent_hw"])) == (BATCH, shape[2], shape[3:])
        assert bound.arguments["context_noise"] == CONTEXT_NOISE  # the config's context_noise reaches the rollout
        captured["context"] = context.detach().clone()
        captured["x"] = x.clone().requires_grad_(with_grad)
        return captured["x"]

    teacher = ConstantTeacher(5 * torch.randn(shape[1:], generator=gen), 5 * torch.randn(shape[1:], generator=gen),
                              d.uncond)
    critic = LinearCritic(shape[1:], gen)
    reward = FixedScores()
    monkeypatch.setattr(rollout_module, "rollout", fixed_rollout)
    monkeypatch.setattr(d, "teacher", teacher)
    monkeypatch.setattr(d, "critic", critic)
    monkeypatch.setattr(d, "reward", reward)
    return x, teacher, critic, reward, captured


def _expected_generator(d, x, teacher, critic, x_t, t, score_shift):
    sigma = per_sample(grid_sigma(t, score_shift))
    x0_cond = x_t.double() - sigma * teacher.cond.double()
    x0_uncond = x_t.double() - sigma * teacher.uncond.double()
    x_real = x0_cond + d.cfg.guidance_scale * (x0_cond - x0_uncond)
    x_fake = x_t.double() - sigma * (critic.a.double() * x_t.double() + critic.b.double())
    normaliser = (x.double() - x_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    return (x_fake - x_real) / normaliser


def test_generator_micro_gradient_is_the_reward_weighted_dmd_gradient(distiller, monkeypatch):
    """Bugs caught, one assertion each: teacher and critic exchanged in g (sign flips); conditional and
    unconditional exchanged in the CFG (direction changes); the normaliser taken over the batch instead of per
    sample; the reward weight not applied or taken from the raw MQ instead of MQ_norm; the score schedule built
    with timestep_shift instead of score_timestep_shift; the teacher fed other x_t / t than the critic;
    `context_noise` not passed to the rollout (checked by the stand-in rollout)."""
    d = distiller
    x, teacher, critic, reward, captured = _stand_ins(d, monkeypatch)
    row = d.generator_micro(4, 0)
    grad = captured["x"].grad.double()

    # wiring: the critic and both teacher branches see the same noisy rollout at the same t
    (x_t, t, context), = critic.calls
    cond = [r for r in teacher.rows if not r[2]]
    uncond = [r for r in teacher.rows if r[2]]
    assert len(cond) == len(uncond) == BATCH
    for b in range(BATCH):
        assert torch.equal(cond[b][0], x_t[b]) and torch.equal(uncond[b][0], x_t[b])
        assert torch.equal(cond[b][1], t[b]) and torch.equal(uncond[b][1], t[b])
    assert torch.equal(context, captured["context"])
    assert not torch.equal(x_t, x)  # noised
    # the reward scored the rollout itself
    (scored, prompts), = reward.seen
    assert torch.equal(scored, x) and len(prompts) == BATCH

    score_shift = d.cfg.score_timestep_shift
    with torch.no_grad():
        g = _expected_generator(d, x, teacher, critic, x_t, t, score_shift)
        other = _expected_generator(d, x, teacher, critic, x_t, t, d.cfg.timestep_shift)
    w = torch.exp(d.cfg.reward.beta * MQ_NORM.double())
    numel = x.numel()

    # direction of each sample's gradient: g up to a positive factor (teacher/critic order, CFG branches)
    for b in range(BATCH):
        cos = torch.nn.functional.cosine_similarity(grad[b].flatten(), g[b].flatten(), dim=0)
        assert cos > 1 - 1e-9, (b, float(cos))
    # per-sample size: w_b * mean|g_b| / numel / grad_accum (the per-sample normaliser and the weight)
    size = grad.abs().mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(size * numel * GRAD_ACCUM, w * g.abs().mean(dim=(1, 2, 3, 4)), rtol=1e-5, atol=0)
    # the weight itself, and that it is exp(beta * MQ_norm), not exp(beta * MQ)
    assert row["reward_weight_min"] == pytest.approx(float(w.min()), rel=1e-12)
    assert row["reward_weight_max"] == pytest.approx(float(w.max()), rel=1e-12)
    assert row["reward_mq_norm"] == pytest.approx(float(MQ_NORM.mean()), rel=1e-6)
    # the whole gradient and the loss value 0.5 * mean_b(w_b * mean(g_b^2)) / grad_accum
    want = w.reshape(-1, 1, 1, 1, 1) * g / numel / GRAD_ACCUM
    torch.testing.assert_close(grad, want.detach(), rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    loss = 0.5 * (w * g.pow(2).mean(dim=(1, 2, 3, 4))).mean() / GRAD_ACCUM
    assert float(row["loss"]) == pytest.approx(float(loss), rel=1e-5)

    # score_timestep_shift matters at these draws: the generator's shift would give a measurably different g
    assert score_shift != d.cfg.timestep_shift
    assert (other - g).abs().max() > 10 * 1e-5 * g.abs().max()


def test_critic_micro_is_flow_matching_on_the_generator_sigma(distiller, monkeypatch):
    """Bugs caught: the flow-matching target's sign (x0 - eps instead of eps - x0); the critic's x0 converted back
    to a flow on the wrong sigma; x_t not the rollout noised at the critic's t; the loss not divided by
    grad_accum or not backpropagated into the critic."""
    d = distiller
    x, _, critic, _, captured = _stand_ins(d, monkeypatch)
    row = d.critic_micro(5, 1)
    assert not captured["x"].requires_grad  # the critic's rollout carries no graph
    (x_t, t, _), = critic.calls
    sigma_gen = per_sample(grid_sigma(t, d.cfg.timestep_shift))
    sigma_score = per_sample(grid_sigma(t, d.cfg.score_timestep_shift))
    # x_t = (1 - sigma) x + sigma eps with eps a unit Gaussian draw
    eps = (x_t.double() - (1 - sigma_gen) * x.double()) / sigma_gen
    assert abs(float(eps.mean())) < 0.1 and abs(float(eps.std()) - 1) < 0.1

    a = critic.a.detach().double().requires_grad_(True)
    b = critic.b.detach().double().requires_grad_(True)
    x0_pred = x_t.double() - sigma_score * (a * x_t.double() + b)
    flow_pred = (x_t.double() - x0_pred) / sigma_gen
    loss = ((flow_pred - (eps - x.double())) ** 2).mean() / GRAD_ACCUM
    # the same loss in the form that needs no eps: ((x - x0_pred) / sigma_gen)^2
    torch.testing.assert_close(loss, (((x.double() - x0_pred) / sigma_gen) ** 2).mean() / GRAD_ACCUM, rtol=1e-6,
                               atol=0)
    assert float(row["loss"]) == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    assert float(critic.a.grad) == pytest.approx(float(a.grad), rel=1e-4)
    torch.testing.assert_close(critic.b.grad.double(), b.grad, rtol=1e-4, atol=1e-4 * float(b.grad.abs().max()))


def test_re_dmd_gradient_is_w_times_the_dmd_gradient_with_the_real_reward(distiller, monkeypatch):
    """The real tiny models and VideoReward: at the same seed, step and micro-step, each sample's gradient on
    the rollout under Re-DMD is exp(beta * MQ_norm_b) times its DMD gradient, and the losses relate the same way.
    Bugs caught: the weight not applied, applied to the wrong sample, or computed from another score."""
    d = distiller
    real_rollout = rollout_module.rollout
    grads = []

    def keep_grad(*args, **kwargs):
        x = real_rollout(*args, **kwargs)
        x.retain_grad()
        grads.append(x)
        return x

    monkeypatch.setattr(rollout_module, "rollout", keep_grad)
    weighted = {k: float(v) for k, v in d.generator_micro(2, 1).items()}
    monkeypatch.setattr(d, "reward", None)
    plain = {k: float(v) for k, v in d.generator_micro(2, 1).items()}
    d.generator.zero_grad(set_to_none=True)
    g_re, g_dmd = (x.grad.double() for x in grads)
    ratio = (g_re.flatten(1) / g_dmd.flatten(1)).median(dim=1).values
    torch.testing.assert_close(g_re, ratio.reshape(-1, 1, 1, 1, 1) * g_dmd, rtol=1e-5, atol=1e-12)
    beta = d.cfg.reward.beta
    assert sorted(ratio.tolist()) == pytest.approx([weighted["reward_weight_min"], weighted["reward_weight_max"]],
                                                   rel=1e-5)
    assert float(torch.log(ratio).mean()) / beta == pytest.approx(weighted["reward_mq_norm"], rel=1e-5)
    assert weighted["reward_weight_min"] != pytest.approx(weighted["reward_weight_max"])  # two distinct weights
    per_sample_loss = 0.5 * (g_dmd * g_dmd.numel() * GRAD_ACCUM).pow(2).flatten(1).mean(dim=1)
    assert float(plain["loss"]) == pytest.approx(float(per_sample_loss.mean() / GRAD_ACCUM), rel=1e-5)
    assert float(weighted["loss"]) == pytest.approx(float((ratio * per_sample_loss).mean() / GRAD_ACCUM), rel=1e-5)


@pytest.mark.parametrize("placement,holds_model", [("rank0", False), ("every_rank", True)])
def test_reward_placement_decides_which_ranks_hold_the_reward_model(distiller, placement, holds_model):
    """Bug caught: `reward.placement` ignored. Seen from rank 1 of 2, `rank0` leaves the reward model on rank 0
    only (this rank scores through gather / scatter) while `every_rank` loads it here. (That central scoring
    gives the local scores is checked end to end: 2 ranks with rank0 vs 1 rank, tests/test_training_e2e.py.)"""
    from omegaconf import OmegaConf

    from reward_forcing.models.decoder import IdentityDecoder
    from reward_forcing.rewards.videoalign import VideoReward
    from reward_forcing.rewards.videoalign_scorer import VideoAlignReward

    cfg = OmegaConf.merge(distiller.cfg, {"reward": {"placement": placement}})
    rank1 = SimpleNamespace(rank=1, world_size=2, is_main=False, device=torch.device("cpu"))
    reward = VideoAlignReward.from_settings(cfg.reward, cfg.checkpoint_dir, cfg.fps, rank1, torch.float32,
                                            IdentityDecoder())
    assert isinstance(reward.model, VideoReward) == holds_model
    assert (reward.model is None) == (not holds_model)


def test_batch_mean_weight_norm_divides_each_weight_by_the_batch_mean(distiller, monkeypatch):
    """reward.weight_norm=batch_mean: sample b's gradient is w_b / mean(w) times its DMD gradient (the paper's w
    divided by its batch mean), so the weights average 1 and keep their ratios."""
    d = distiller
    monkeypatch.setitem(d.cfg.reward, "weight_norm", "batch_mean")  # setattr's undo would delete the key
    x, teacher, critic, _, captured = _stand_ins(d, monkeypatch)
    row = d.generator_micro(4, 0)
    grad = captured["x"].grad.double()
    (x_t, t, _), = critic.calls
    with torch.no_grad():
        g = _expected_generator(d, x, teacher, critic, x_t, t, d.cfg.score_timestep_shift)
    w = torch.exp(d.cfg.reward.beta * MQ_NORM.double())
    w = w / w.mean()
    size = grad.abs().mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(size * x.numel() * GRAD_ACCUM, w * g.abs().mean(dim=(1, 2, 3, 4)), rtol=1e-5, atol=0)
    assert row["reward_weight"] == pytest.approx(1.0, rel=1e-12)
    assert row["reward_weight_max"] == pytest.approx(float(w.max()), rel=1e-12)


def test_teacher_unconditional_branch_gets_the_configured_negative_prompt(distiller, monkeypatch):
    """Bug caught: a distiller that encodes "" (or any other text) for the teacher's unconditional CFG branch.
    The rows the teacher sees second must hold the umT5 embedding of `negative_prompt` as configured, encoded here
    by a text encoder of our own from the same folder; the first rows, the prompts' embedding."""
    from reward_forcing.checkpoints import asset_path
    from reward_forcing.models.text_encoder import TextEncoder

    d = distiller
    x, _, _, _, captured = _stand_ins(d, monkeypatch)
    seen = []

    class RecordingTeacher(torch.nn.Module):
        def forward(self, x_t, t, context):
            seen.append(context.detach().clone())
            return torch.zeros_like(x_t)

    monkeypatch.setattr(d, "teacher", RecordingTeacher())
    d.generator_micro(0, 0)
    encoder = TextEncoder.from_wan_folder(asset_path(d.cfg.checkpoint_dir, d.cfg.model_name), d.cfg.text_encoder)
    with torch.no_grad():
        negative = encoder.encode([d.cfg.negative_prompt])
        empty = encoder.encode([""])
    (context,) = seen
    cond, uncond = context.chunk(2)
    assert d.cfg.negative_prompt.startswith("色调艳丽")  # Wan's standard negative prompt, from the packaged defaults
    torch.testing.assert_close(cond, captured["context"], rtol=0, atol=0)
    for row in uncond:
        torch.testing.assert_close(row, negative[0], rtol=0, atol=0)
    assert not torch.equal(negative, empty)  # so a distiller encoding "" would fail above
