"""Per-rank memory of a training run, worked out before any GPU is rented (scripts/plan_memory.py).

Everything is computed from the config and the DiTs' config.json files (models are built on the meta device, so
nothing is allocated); c is the compute dtype's size (2 for bf16 under `mixed_precision` on GPUs, 4 for fp32).
The figures are for rank 0, the rank with the most (FSDP gives it the rounded-up share of every tensor).

Layout (reward_forcing/training/parallel.py). N GPUs form N / sequence_parallel data-parallel ranks; FSDP2 shards
every parameter on dim 0 over the S = N / fsdp_replicate ranks of a shard group (sequence-parallel ranks included),
and a rank keeps ceil(rows / S) rows of each tensor. With sequence parallelism P a rank holds 1/P of every sample's
tokens, and 1/P of the heads inside self-attention and in the KV cache (reward_forcing/training/sequence_parallel.py).

Static (for the whole run):
- parameters: fp32 master shards of every DiT (the trained generator and critic and the frozen teacher; the
  mixed-precision policy casts them to the compute dtype per unit), the umT5 encoder's shards in the compute dtype
  (no fp32 master: reward_forcing/training/networks.py), and the VAE whole on every rank when a pixel reward decodes.
- optimiser: AdamW's exp_avg and exp_avg_sq, two fp32 shards of each trained network, and a 4-byte step count per
  tensor; its foreach step makes one more shard (sqrt of exp_avg_sq) while it runs.
- EMA: one fp32 shard of the generator (reward_forcing/training/ema.py).
- gradients: one fp32 shard of the network being stepped (set to None after each step). With grad_accum > 1,
  FSDP2 accumulates the micro-steps before the last unsharded (requires_gradient_sync off): numel x 4 bytes,
  unless fsdp_reduce_every_micro_step.
- gathered units: while a block computes, its parameters are all-gathered in the compute dtype, and the next one
  is prefetched (2 blocks), the root's own parameters (embeddings, head) beside them; in backward a block's
  unsharded gradient (compute dtype) and its fp32 reduce-scatter input come on top.

Activations: what autograd keeps for backward, per token of a rank and per block, read op by op off
reward_forcing/models/wan.py (WanBlock.forward) and checked against saved-tensor hooks at tiny sizes
(tests/test_memory_plan.py):
- 10 tensors of width D in fp32 (the fp32 islands: the inputs of the three LayerNorms, the two normalised outputs
  that `modulate` scales, the RMSNorm inputs of q, k and the cross-attention query, and the self-attention and FFN
  outputs that `residual` gates);
- 12 tensors of width D in the compute dtype (the inputs of q/k/v and of the FFN, the RMSNorm products of q, k and
  the cross-attention query, the RoPE'd q and k, v, the normalised cross-attention query, both attention outputs,
  the norm3 output);
- 2 of width ffn_dim in the compute dtype (the GELU's input and output);
- 8 H + 36 bytes of statistics (both attentions' log-sum-exp, LayerNorm mean and rstd, RMSNorm rsqrt);
- under sequence parallelism one more D-wide tensor: the output projection's input is the all-to-all's result,
  no longer a view of the attention output.
Attention over a KV cache (the rollout's stream_step) keeps the attended keys and values instead of its own:
2 c D H/P-head tokens of every attended frame. Per block and forward the prompt adds T (4 + 3c) D + 4 T bytes
(cross-attention K/V, T = text_len); per forward the head keeps (8 + c) D per token.

With gradient_checkpointing a full-sequence forward keeps only each block's input (c D per token per block) and
recomputes one block at a time in backward (one block's activations on top). The rollout checkpoints each chunk's
exit-step forward whole (reward_forcing/training/rollout.py): per chunk it keeps the snapshot of the context K/V
(a view that keeps the chunk's whole attended K/V alive) and recomputes one chunk at a time.

Held by the rollout outside autograd: the KV cache (the window's frames, H/P heads, keys and values in the compute
dtype; an EMA sink in fp32) and, with straight-through cache gradient, the exit-step K/V of every chunk still in
the window (checkpointed: of every chunk a later one attends, until backward); in its backward, as many gradients
wait for the window's K/V (a later chunk's backward makes them before the earlier chunk's runs).

Gradient-free forwards (the teacher with its CFG batch, the critic on generator steps, the no-grad rollout
steps) hold one block's working set at a time: at most 36 D bytes per token (the attention stage's live tensors,
measured on CPU at tiny sizes in fp32; 30 D in bf16) plus the FFN's hidden pair, 2 c ffn_dim.

Not modelled (kept free by --headroom): the reward scorer's weights and forward, the VAE decode's working set, the
gradients of one block's activations while its backward runs, attention kernels' workspace, the CUDA context and
allocator fragmentation.
"""
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from reward_forcing.errors import UserError

GB = 1e9
# Bytes autograd keeps per token and block (module docstring; tests/test_memory_plan.py checks them).
FP32_TENSORS, COMPUTE_TENSORS, FFN_TENSORS = 10, 12, 2
STATISTICS_PER_HEAD, STATISTICS = 8, 36
HEAD_FP32_TENSORS = 2  # the head's LayerNorm input and normalised output; its linear's input is in the compute dtype
NO_GRAD_WIDTHS = {2: 30, 4: 36}  # live bytes per token / D of one block's gradient-free forward, bf16 and fp32
# Kept free for what is not modelled. The one GPU peak this project measured, the 1.3B student's rollout and its
# backward alone on one H200 (README, What it takes: 56.7 GiB, i.e. 60.9 GB, by scripts/gpu_fast_path.py): this plan
# computes 49.9 GB for that run (44.2 of activations, 5.7 of bf16 weights and gradients), 18 % below it, while on CPU
# its activations agree with the measured ones within 2 % (fp32 and bf16): what CUDA adds there is not broken down.
HEADROOM = 0.2


@dataclass(frozen=True)
class Dit:
    """A Wan DiT's sizes and parameter shapes (from its config.json, built on the meta device)."""
    name: str
    dim: int
    ffn_dim: int
    heads: int
    layers: int
    text_len: int
    text_dim: int
    patch: tuple
    block_shapes: tuple   # the parameter shapes of one block
    root_shapes: tuple    # the parameters outside the blocks (embeddings, head)

    @classmethod
    def from_config(cls, name: str, config: dict) -> "Dit":
        from reward_forcing.models.wan import WanModel

        with torch.device("meta"):
            model = WanModel.from_config(config)
        block = tuple(tuple(p.shape) for p in model.blocks[0].parameters())
        in_blocks = {id(p) for p in model.blocks.parameters()}
        root = tuple(tuple(p.shape) for p in model.parameters() if id(p) not in in_blocks)
        return cls(name, model.dim, model.blocks[0].ffn[0].out_features, model.num_heads, len(model.blocks),
                   model.text_len, model.text_embedding[0].in_features, model.patch_size, block, root)

    @property
    def shapes(self) -> tuple:
        return self.block_shapes * self.layers + self.root_shapes

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def block_numel(self) -> int:
        return sum(math.prod(s) for s in self.block_shapes)

    @property
    def root_numel(self) -> int:
        return sum(math.prod(s) for s in self.root_shapes)


def shard_bytes(shapes, ranks: int, element: int) -> int:
    """Bytes of rank 0's FSDP2 shards: ceil(rows / ranks) rows of every tensor (dim 0 is split)."""
    return sum(-(-s[0] // ranks) * math.prod(s[1:]) * element for s in shapes)


# ---- activations (bytes of one rank) ----
def block_token_bytes(dit: Dit, c: int, split: bool) -> int:
    """What one block keeps per token for backward (module docstring)."""
    widths = FP32_TENSORS * 4 + COMPUTE_TENSORS * c + (c if split else 0)
    return widths * dit.dim + FFN_TENSORS * c * dit.ffn_dim + STATISTICS_PER_HEAD * dit.heads + STATISTICS


def prompt_block_bytes(dit: Dit, c: int, batch: int) -> int:
    """What one block keeps of the prompt's cross-attention K/V path."""
    return batch * dit.text_len * ((4 + 3 * c) * dit.dim + 4)


def outside_blocks_bytes(dit: Dit, tokens: int, c: int, batch: int, rope_tokens: int) -> int:
    """What a forward keeps outside its blocks: the head's inputs per token, the prompt embedding (its MLP's input,
    hidden pair and output) and the fp32 RoPE tables (cos and sin) of `rope_tokens` positions."""
    head = tokens * (HEAD_FP32_TENSORS * 4 + c) * dit.dim
    prompt = batch * dit.text_len * (dit.text_dim + 3 * dit.dim) * c
    return head + prompt + 2 * 4 * rope_tokens * (dit.dim // dit.heads)


def forward_bytes(dit: Dit, tokens: int, c: int, split: bool, batch: int, parts: int = 1) -> int:
    """A full-sequence forward with grad (bidirectional attention) over `tokens` tokens of this rank."""
    per_block = tokens * block_token_bytes(dit, c, split) + prompt_block_bytes(dit, c, batch)
    return dit.layers * per_block + outside_blocks_bytes(dit, tokens, c, batch, tokens * parts // batch)


def checkpointed_forward_bytes(dit: Dit, tokens: int, c: int, split: bool, batch: int, parts: int = 1) -> int:
    """The same with per-block activation checkpointing: every block's input, and one block recomputed."""
    one_block = tokens * block_token_bytes(dit, c, split) + prompt_block_bytes(dit, c, batch)
    return (dit.layers * tokens * c * dit.dim + one_block
            + outside_blocks_bytes(dit, tokens, c, batch, tokens * parts // batch))


def chunk_forward_bytes(dit: Dit, tokens: int, attended_tokens: int, c: int, split: bool, batch: int,
                        parts: int) -> int:
    """One exit-step stream_step with grad: `tokens` of this rank's chunk attending `attended_tokens` (whole
    frames, H/P heads) through the cache instead of their own keys and values."""
    own_kv = 2 * c * dit.dim
    cached_kv = 2 * c * dit.dim * attended_tokens // parts
    per_block = tokens * (block_token_bytes(dit, c, split) - own_kv) + cached_kv + prompt_block_bytes(dit, c, batch)
    rope = (tokens * parts + attended_tokens) // batch  # the chunk's query positions and the attended keys'
    return dit.layers * per_block + outside_blocks_bytes(dit, tokens, c, batch, rope)


def no_grad_bytes(dit: Dit, tokens: int, c: int) -> int:
    """One block's working set in a gradient-free forward (module docstring)."""
    return tokens * (NO_GRAD_WIDTHS[c] * dit.dim + 2 * c * dit.ffn_dim)


# ---- the rollout's cache geometry, from the cache's own bookkeeping ----
class _CacheOnly:
    """Stands in for the student where only its KV cache's bookkeeping is wanted (one layer, one token)."""

    def __init__(self, chunk_frames: int):
        self.chunk_frames = chunk_frames

    def new_cache(self, batch_size, **settings):
        from reward_forcing.cache import KVCache

        return KVCache(1, chunk_frames=self.chunk_frames, **settings)


@dataclass
class RolloutGeometry:
    """Per chunk of a training rollout: frames attended and frames whose exit-step K/V the straight-through path
    holds (whole chunks: a chunk's K/V are one tensor); and over the rollout, the frames of the chunks some later
    chunk attends (what checkpointed exit steps keep until backward)."""
    attended: list = field(default_factory=list)
    live: list = field(default_factory=list)
    attended_earlier: int = 0  # frames of the chunks that a later chunk attends
    cache_frames: int = 0      # frames the cache allocates (a bounded window's ring is allocated whole)
    fp32_sink_frames: int = 0  # an EMA sink is kept in fp32


def rollout_geometry(cfg) -> RolloutGeometry:
    from reward_forcing.training.rollout import training_sampler

    chunk = int(cfg.num_frame_per_block)
    sampler = training_sampler(_CacheOnly(chunk), cfg)
    layer = sampler.new_cache(1).layers[0]
    frames = int(cfg.num_training_frames)
    geometry = RolloutGeometry(cache_frames=sampler.window_frames or frames,
                               fp32_sink_frames=sampler.sink_frames if sampler.sink_mode == "ema" else 0)
    zeros = torch.zeros(1, chunk, 1, 1)
    earlier = set()
    for start in range(0, frames, chunk):
        layer.update(zeros, zeros, start, 1)
        attended = layer.attended_frames
        geometry.attended.append(len(attended))
        geometry.live.append(chunk * len({frame // chunk for frame in attended}))
        earlier |= {frame // chunk for frame in attended if frame < start}
    geometry.attended_earlier = chunk * len(earlier)
    return geometry


# ---- the plan ----
class Layout(NamedTuple):
    gpus: int
    sequence_parallel: int
    replicate: int
    shard: int          # ranks an FSDP shard group spans (sequence-parallel ranks included)
    data_parallel: int  # ranks that train different samples


@dataclass
class Plan:
    """Per-rank bytes: `rows` [(label, bytes)] held all run, and `moments` {name: [(label, bytes)]}: what a step
    holds beside them at each of its high points; the peak is the largest moment, and it fits or not."""
    title: str
    layout: Layout
    capacity: float
    rows: list
    moments: dict
    notes: list

    @property
    def static(self) -> int:
        return sum(b for _, b in self.rows)

    def total(self, moment: str) -> int:
        return self.static + sum(b for _, b in self.moments[moment])

    @property
    def peak(self) -> int:
        return max(self.total(moment) for moment in self.moments)

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity


ROLES = {"distill": {"generator": "model_name", "critic": "fake_name", "teacher": "real_name"},
         "reward_feedback": {"generator": "model_name"}}


def trainer_dits(cfg) -> dict:
    """{role: Dit} of the networks `cfg`'s trainer builds, read from their folders' config.json."""
    from reward_forcing.checkpoints import asset_path, read_wan_config
    from reward_forcing.errors import ConfigError

    if cfg.trainer not in ROLES:
        raise ConfigError(f"the memory plan covers trainer {' and '.join(ROLES)}, not '{cfg.trainer}'")
    return {role: Dit.from_config(cfg[key], read_wan_config(asset_path(cfg.checkpoint_dir, cfg[key])))
            for role, key in ROLES[str(cfg.trainer)].items()}


def frame_tokens(cfg, dit: Dit) -> int:
    from reward_forcing.inference.generator import latent_size

    height, width = latent_size(cfg, dit.patch)
    return (height // dit.patch[1]) * (width // dit.patch[2])


def _text_encoder_shapes(cfg):
    from transformers import UMT5EncoderModel

    from reward_forcing.models.text_encoder import umt5_config

    with torch.device("meta"):
        model = UMT5EncoderModel(umt5_config(cfg.text_encoder))
    return [tuple(p.shape) for p in model.parameters()]


def _vae_numel(cfg) -> int:
    from reward_forcing.models.vae import build_autoencoder

    with torch.device("meta"):
        return sum(p.numel() for p in build_autoencoder(cfg.vae).parameters())


def _decodes_pixels(cfg) -> bool:
    from reward_forcing.rewards.registry import check_reward

    reward = cfg.distill_loss == "re_dmd" or cfg.trainer == "reward_feedback"
    pixels = reward and check_reward(cfg.reward).input == "pixels"
    return cfg.decoder == "vae" and (pixels or cfg.reward.feedback_weight > 0)


def _fsdp_working(dit: Dit, c: int, backward: bool) -> int:
    gathered = 2 * dit.block_numel * c + dit.root_numel * c
    return gathered + (dit.block_numel * (c + 4) if backward else 0)


def plan(cfg, dits: dict, gpus: int, gpu_memory_gb: float, gpus_per_node: int = 8, device: str = "cuda") -> Plan:
    """The per-rank memory of `cfg`'s trainer on `gpus` GPUs of `gpu_memory_gb` GB. dits: {'generator': Dit,
    'critic': Dit, 'teacher': Dit} (distill) or {'generator': Dit} (reward_feedback)."""
    from reward_forcing.distributed import compute_dtype
    from reward_forcing.training.parallel import replica_groups

    parts = int(cfg.sequence_parallel)
    replicate = replica_groups(int(cfg.fsdp_replicate), gpus, gpus_per_node, parts)
    layout = Layout(gpus, parts, replicate, gpus // replicate, gpus // parts)
    c = torch.finfo(compute_dtype(bool(cfg.mixed_precision), torch.device(device))).bits // 8
    split, batch, checkpoint = parts > 1, int(cfg.batch_size), bool(cfg.gradient_checkpointing)
    generator = dits["generator"]
    tokens_per_frame = frame_tokens(cfg, generator)

    rows = []
    for role, dit in dits.items():
        rows.append((f"{role} {dit.name}: fp32 parameters", shard_bytes(dit.shapes, layout.shard, 4)))
    trained = [role for role in ("generator", "critic") if role in dits]
    for role in trained:
        shapes = dits[role].shapes  # exp_avg and exp_avg_sq, fp32 shards, and a 4-byte step count per tensor
        rows.append((f"{role}: AdamW state", 2 * shard_bytes(shapes, layout.shard, 4) + 4 * len(shapes)))
    if cfg.ema_decay is not None:
        rows.append(("generator EMA (fp32)", shard_bytes(generator.shapes, layout.shard, 4)))
    rows.append(("umT5 text encoder (compute dtype)", shard_bytes(_text_encoder_shapes(cfg), layout.shard, c)))
    if _decodes_pixels(cfg):
        rows.append(("Wan VAE decoder (whole, compute dtype)", _vae_numel(cfg) * c))

    def gradients(role):
        dit = dits[role]
        out = [(f"{role} gradients (fp32 shards)", shard_bytes(dit.shapes, layout.shard, 4))]
        if int(cfg.grad_accum) > 1 and not cfg.fsdp_reduce_every_micro_step:
            out.append((f"{role} gradients accumulated unsharded (grad_accum > 1)", dit.numel * 4))
        return out

    geometry = rollout_geometry(cfg)
    frame_kv = 2 * c * tokens_per_frame * generator.dim // parts * batch * generator.layers  # K and V, every layer
    chunk = int(cfg.num_frame_per_block)
    chunk_tokens = batch * chunk * tokens_per_frame // parts
    exits = [chunk_forward_bytes(generator, chunk_tokens, batch * frames * tokens_per_frame, c, split, batch, parts)
             for frames in geometry.attended]
    how = "checkpointed" if checkpoint else "no checkpointing"
    straight = cfg.rollout_cache_grad == "straight_through"
    live = max(geometry.live) * frame_kv if straight else 0  # the exit K/V of the chunks in the window
    if checkpoint:  # each chunk keeps its context K/V snapshot (views of its whole attended K/V) and the exit K/V
        # that gradient reaches (every chunk a later one attends), until backward; one chunk recomputes at a time
        snapshots = ("rollout checkpoint snapshots (context K/V)", sum(frames * frame_kv for frames in geometry.attended))
        kept = ("exit-step K/V the snapshots keep (straight-through)",
                geometry.attended_earlier * frame_kv if straight else 0)
        held, backward = [snapshots, kept], [snapshots, kept, ("one chunk's exit-step forward recomputed", max(exits))]
    else:
        held = backward = [("rollout activations (no checkpointing)", sum(exits))]
    cache = geometry.cache_frames * frame_kv + geometry.fp32_sink_frames * frame_kv * (4 - c) // c
    step_working = no_grad_bytes(generator, chunk_tokens, c) + _fsdp_working(generator, c, False)

    video_tokens = batch * int(cfg.num_training_frames) * tokens_per_frame // parts
    moments = {
        "generator: rollout": gradients("generator") + held + [
            ("rollout KV cache + the window's straight-through exit K/V", cache + live),
            ("one block's gradient-free step + gathered units", step_working)],
        "generator: backward": gradients("generator") + backward + [
            ("straight-through gradients pending for earlier chunks' K/V", live),
            ("gathered units + one block's gradient", _fsdp_working(generator, c, True))]}
    if "critic" in dits:
        critic, teacher = dits["critic"], dits["teacher"]
        moments["generator: teacher forward"] = gradients("generator") + held + [
            ("teacher block working set, CFG batch (no grad) + gathered units",
                       no_grad_bytes(teacher, 2 * video_tokens, c) + _fsdp_working(teacher, c, False))]
        measure = checkpointed_forward_bytes if checkpoint else forward_bytes
        moments["critic: backward"] = gradients("critic") + [
            (f"critic forward activations ({how})", measure(critic, video_tokens, c, split, batch, parts)),
            ("gathered units + one block's gradient", _fsdp_working(critic, c, True))]
    for role in trained:
        moments[f"{role}: optimiser step"] = gradients(role)[:1] + [
            ("AdamW foreach temporary (fp32 shard)", shard_bytes(dits[role].shapes, layout.shard, 4))]

    title = (f"{gpus} GPUs x {gpu_memory_gb:g} GB: sequence_parallel {parts}, FSDP shard {layout.shard} x "
             f"replicate {layout.replicate}, {layout.data_parallel} data-parallel rank(s), compute "
             f"{'bf16' if c == 2 else 'fp32'}")
    notes = [f"tokens per frame {tokens_per_frame}, {cfg.num_training_frames} frames, batch {batch} per "
             f"data-parallel rank, gradient_checkpointing {str(checkpoint).lower()}, grad_accum {cfg.grad_accum}"]
    return Plan(title, layout, gpu_memory_gb * GB, rows, moments, notes)


# ---- what to change, and the command line (scripts/plan_memory.py) ----
def _sequence_parallel_choices(current: int, dits: dict, frame_token_count: int, gpus: int) -> list[int]:
    """`current`, then every larger degree that divides all heads, the tokens per frame and the GPUs."""
    sizes = [dit.heads for dit in dits.values()] + [frame_token_count, gpus]
    return [current] + [n for n in range(current + 1, gpus + 1) if all(size % n == 0 for size in sizes)]


def remedy(cfg, dits: dict, gpus: int, gpu_memory_gb: float, usable: float, **where) -> str | None:
    """The smallest change that makes `cfg` fit `usable` bytes per rank: first on these GPUs, then on 2x, 4x, ...
    as many; at each count the settings that change only memory and speed (activation checkpointing, a
    reduce-scatter per micro-step, plain FSDP instead of HSDP), then larger sequence_parallel degrees."""
    from omegaconf import OmegaConf

    fixes = {}
    if not cfg.gradient_checkpointing:
        fixes["gradient_checkpointing"] = True
    if cfg.grad_accum > 1 and not cfg.fsdp_reduce_every_micro_step:
        fixes["fsdp_reduce_every_micro_step"] = True
    if cfg.fsdp_replicate != 1:
        fixes["fsdp_replicate"] = 1
    frame_token_count = frame_tokens(cfg, dits["generator"])
    count = gpus
    while count <= 4096:
        for parts in _sequence_parallel_choices(int(cfg.sequence_parallel), dits, frame_token_count, count):
            for changes in ({}, fixes) if fixes else ({},):
                changes = dict(changes, **({"sequence_parallel": parts} if parts != cfg.sequence_parallel else {}))
                try:
                    fitted = plan(OmegaConf.merge(cfg, changes), dits, count, gpu_memory_gb, **where).peak <= usable
                except UserError:
                    fitted = False
                if fitted and (changes or count != gpus):
                    said = " ".join(f"{key}={str(value).lower()}" for key, value in changes.items())
                    more = f"{count} GPUs of {gpu_memory_gb:g} GB" if count != gpus else ""
                    return " with ".join(part for part in (more, said) if part)
        count *= 2
    return None


def render(plan_: Plan, headroom: float, suggestion: str | None) -> str:
    def gb(value: int) -> str:
        return f"{value / GB:7.2f}"

    usable = plan_.capacity * (1 - headroom)
    lines = [f"layout: {plan_.title}", *plan_.notes, "held all run (GB per rank, computed):"]
    lines += [f"  {gb(value)}  {label}" for label, value in plan_.rows]
    lines.append(f"  {gb(plan_.static)}  total")
    lines.append("a step's high points (GB per rank on top of the above, computed):")
    for moment, parts in plan_.moments.items():
        lines.append(f"  {gb(sum(v for _, v in parts))}  {moment} -> {plan_.total(moment) / GB:.2f} in all")
        lines += [f"  {'':7}    {gb(value)}  {label}" for label, value in parts]
    verdict = "fits" if plan_.peak <= usable else "does NOT fit"
    lines.append(f"peak {plan_.peak / GB:.2f} GB per rank of {usable / GB:.2f} GB usable ({plan_.capacity / GB:g} GB "
                 f"less {headroom:.0%} headroom for what is not modelled): {verdict}")
    if plan_.peak > usable:
        lines.append(f"change: {suggestion}" if suggestion else "change: nothing up to 4096 GPUs fits")
    return "\n".join(lines)


def summary(cfg, dits: dict, counts, gpu_memory_gb: float, headroom: float, **where) -> str:
    """One markdown row per GPU count: layout, what is held all run, the peak and where, and whether it fits."""
    lines = [f"| GPUs x {gpu_memory_gb:g} GB | FSDP shard x replicate, data-parallel ranks | held all run | "
             f"peak per rank (at) | fits in {(1 - headroom) * gpu_memory_gb:g} GB ({headroom:.0%} headroom) |",
             "|---|---|---|---|---|"]
    for count in counts:
        result = plan(cfg, dits, count, gpu_memory_gb, **where)
        usable = result.capacity * (1 - headroom)
        at = max(result.moments, key=result.total)
        verdict = "yes" if result.peak <= usable else f"no; change: {remedy(cfg, dits, count, gpu_memory_gb, usable, **where)}"
        lines.append(f"| {count} | {result.layout.shard} x {result.layout.replicate}, {result.layout.data_parallel} | "
                     f"{result.static / GB:.1f} GB | {result.peak / GB:.1f} GB ({at}) | {verdict} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from reward_forcing.config import load_config
    from reward_forcing.errors import OneLineParser
    from reward_forcing.training.sequence_parallel import check_sequence_parallel

    parser = OneLineParser(description="Per-rank GPU memory of a training config, computed before renting GPUs "
                                       "(reward_forcing/training/memory_plan.py explains the model).")
    parser.add_argument("--config", required=True, help="training config (e.g. configs/reward_forcing_14b.yaml)")
    parser.add_argument("--gpus", required=True,
                        help="GPUs in the run (torchrun's world size); a comma list (8,16,64) prints one row each")
    parser.add_argument("--gpu_memory_gb", type=float, required=True, help="memory of one GPU, GB (1e9 bytes)")
    parser.add_argument("--gpus_per_node", type=int, default=8, help="GPUs per node (for fsdp_replicate 0)")
    parser.add_argument("--headroom", type=float, default=HEADROOM,
                        help=f"fraction of a GPU kept for what the plan does not model (default {HEADROOM})")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. sequence_parallel=4)")
    args = parser.parse_intermixed_args(argv)
    try:
        counts = [int(count) for count in args.gpus.split(",")]
    except ValueError:
        counts = [0]
    if min(counts) < 1 or args.gpu_memory_gb <= 0 or not 0 <= args.headroom < 1:
        raise UserError("--gpus must be counts >= 1, --gpu_memory_gb > 0 and --headroom in [0, 1)")
    cfg = load_config(args.config, args.overrides)
    dits = trainer_dits(cfg)
    for count in counts:
        check_sequence_parallel(cfg, ROLES[str(cfg.trainer)].values(), count)
    where = {"gpus_per_node": args.gpus_per_node}
    print(f"memory plan of {args.config} (trainer {cfg.trainer}; computed, not measured)")
    if len(counts) > 1:
        print(summary(cfg, dits, counts, args.gpu_memory_gb, args.headroom, **where))
        return 0
    result = plan(cfg, dits, counts[0], args.gpu_memory_gb, **where)
    usable = result.capacity * (1 - args.headroom)
    suggestion = remedy(cfg, dits, counts[0], args.gpu_memory_gb, usable, **where) if result.peak > usable else None
    print(render(result, args.headroom, suggestion))
    return 0
