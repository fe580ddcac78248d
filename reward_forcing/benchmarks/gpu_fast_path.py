"""Every figure of the real-size fast-path check in one run: DiT-only and end-to-end FPS (eager and compiled, Wan
VAE and TAEHV, decode overlapped), time to first frame, bf16 error against an fp32 reference of the same weights,
and the peak memory of a training rollout with backward broken down by what holds it.

Random weights at the configured real size (speed does not depend on weight values). On the GPU machine:

    python scripts/gpu_fast_path.py --out gpu_results            # configs/reward_forcing.yaml, 832x480, cuda

Dry run of the same code on CPU at a tiny size (minutes, no GPU):

    python scripts/gpu_fast_path.py --out /tmp/dry --device cpu --dry_run

Beside upstream Reward Forcing (https://github.com/JaydenLyh/Reward-Forcing) in the same run: give a checkout of it
(only its wan/modules/ is imported, with diffusers and einops installed; see reward_forcing/benchmarks/upstream.py):

    git clone https://github.com/JaydenLyh/Reward-Forcing ../Reward-Forcing
    python scripts/gpu_fast_path.py --out gpu_results --upstream_repo ../Reward-Forcing
    python scripts/gpu_fast_path.py --out /tmp/dry --device cpu --dry_run --upstream_repo ../Reward-Forcing

This adds the step dit_vs_upstream (our eager and compiled DiT and upstream's causal DiT with the same weights,
chunks interleaved: upstream_chunk_s, ratio_vs_upstream = our compiled steady chunk / upstream's, and
upstream_max_abs_diff between the two streams) and upstream's bf16 error to bf16_error.

Writes <out>/<step>.json per step and <out>/summary.json; each step's command is printed before it runs.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from reward_forcing.benchmarks import streaming as benchmark
from reward_forcing.errors import UserError
from reward_forcing.inference.generator import latent_size

# --dry_run: the small benchmark model at a small size and a few chunks (same code paths)
DRY_SIZE = ["--dim", "64", "--ffn_dim", "128", "--num_heads", "2", "--num_layers", "2", "--text_len", "16",
            "--height", "32", "--width", "48", "--chunks", "4", "--vae_base_dim", "4"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the JSON results")
    p.add_argument("--config", default="reward_forcing", help="config path or preset name")
    p.add_argument("--device", default="cuda")
    p.add_argument("--chunks", type=int, default=12)
    p.add_argument("--dry_run", action="store_true", help="tiny sizes, to check the script on CPU")
    p.add_argument("--skip", nargs="*", default=[], help="steps to leave out (names as in summary.json)")
    p.add_argument("--upstream_repo", metavar="DIR",
                   help="a checkout of JaydenLyh/Reward-Forcing: also time and check its causal DiT with the same "
                        "weights (step dit_vs_upstream, and in bf16_error)")
    return p.parse_args(argv)


def benchmark_steps(args):
    """(name, benchmark.py arguments) of the speed steps."""
    model = DRY_SIZE if args.dry_run else ["--config", args.config, "--random_weights", "--chunks", str(args.chunks)]
    common = [*model, "--device", args.device]
    vae, taehv = ["decoder=vae"], ["decoder=taehv"]
    steps = [
        ("eager_vs_compiled_vae", [*common, "--compile", "--compare", *vae]),
        ("compiled_taehv", [*common, "--compile", *taehv]),
        ("eager_taehv", [*common, *taehv]),
    ]
    if args.upstream_repo:
        steps.append(("dit_vs_upstream", [*common, "--compile", "--compare", "--dit_only", "--upstream_repo",
                                          str(Path(args.upstream_repo).resolve())]))
    return steps


def run_benchmark(name, arguments, out):
    path = out / f"{name}.json"
    command = [sys.executable, "-m", benchmark.MODULE, *arguments, "--json", str(path)]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return json.loads(path.read_text())


def build_models(args):
    """The configured student at real size (or tiny for --dry_run) in fp32, and a bf16 copy of the same weights."""

    bench_args = benchmark.parse_args(DRY_SIZE + ["--device", args.device, "--dit_only"] if args.dry_run else
                                      ["--config", args.config, "--random_weights", "--device", args.device,
                                       "--dit_only"])
    cfg = benchmark.harness_config(bench_args)
    torch.manual_seed(0)  # as benchmark.Setup: the same small-model weights whatever ran before (an upstream import)
    model, _ = benchmark.harness_model(bench_args, cfg)
    return cfg, model.eval().requires_grad_(False)


def bf16_error(args):
    """One steady chunk's flow (window full, EMA active) in bf16 vs fp32, same weights, same inputs; with
    --upstream_repo the same for upstream's causal DiT holding the same weights."""
    cfg, model = build_models(args)
    hw = latent_size(cfg, model.patch_size)
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(1, model.text_len, model.text_embedding[0].in_features, generator=gen)
    chunks = [torch.randn(1, model.in_dim, 3, *hw, generator=gen) for _ in range(5)]
    upstream = None
    if args.upstream_repo:  # built while our weights are still fp32
        from reward_forcing.benchmarks.upstream import load_upstream_model
        upstream = load_upstream_model(args.upstream_repo, model, cfg, args.device, torch.float32)
    result = steady_flow_error(model, cfg, args.device, context, chunks)
    if upstream is not None:
        errors = steady_flow_error(upstream, cfg, args.device, context, chunks)
        result.update(upstream_max_abs_error=errors["max_abs_error"], upstream_output_scale=errors["output_scale"])
    return result


def steady_flow_error(model, cfg, device, context, chunks):
    """Flow of the last chunk of `chunks` (each after the context passes of those before it) in bf16 vs fp32."""
    from reward_forcing.inference.generator import StreamingGenerator

    device = torch.device(device)
    flows = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.to(device=device, dtype=dtype)
        sampler = StreamingGenerator.from_config(model, cfg)
        cache = sampler.new_cache(1, static=True)
        with torch.no_grad():
            for index, x in enumerate(chunks):
                x = x.to(device, dtype)
                t = torch.full((1, 3), sampler.timesteps[1], device=device)
                flow = sampler.flow(cache, context.to(device, dtype), x, t, 3 * index)
                sampler.context_pass(cache, context.to(device, dtype), x, 3 * index)
        flows[dtype] = flow.float().cpu()
    reference = flows[torch.float32]
    return {"max_abs_error": (flows[torch.bfloat16] - reference).abs().max().item(),
            "output_scale": reference.abs().max().item(), "chunk": len(chunks) - 1}


def mib(value):
    return value / 2**20


def training_memory(args):
    """Peak CUDA memory of a 21-latent-frame rollout with gradient (activation checkpointing) and its backward,
    split into parameters, what the rollout holds for backward, and the transient peak of each phase."""
    from reward_forcing.training.rollout import rollout, training_sampler

    device = torch.device(args.device)
    if device.type != "cuda":
        print("training memory: CUDA allocator statistics only (skipped on CPU beyond a functional run)")
    cfg, model = build_models(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = model.to(device=device, dtype=dtype).train().requires_grad_(True)
    model.gradient_checkpointing = True
    stats = {}

    def mark(name):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            stats[f"{name}_allocated_mib"] = mib(torch.cuda.memory_allocated(device))
            stats[f"{name}_peak_mib"] = mib(torch.cuda.max_memory_allocated(device))
            torch.cuda.reset_peak_memory_stats(device)

    mark("parameters")
    hw = latent_size(cfg, model.patch_size)
    context = torch.randn(1, model.text_len, model.text_embedding[0].in_features, device=device, dtype=dtype)
    frames = 6 if args.dry_run else 21
    sampler = training_sampler(model, cfg)
    start = time.perf_counter()
    video = rollout(sampler, context, frames, hw, exits=[len(sampler.timesteps) - 1] * (frames // 3), seed=0,
                    key=("memory",), sample_ids=[0], dtype=dtype, with_grad=True, checkpoint=True,
                    cache_grad=str(cfg.rollout_cache_grad))
    mark("rollout")  # allocated now: the output, checkpoint inputs, replay snapshots, saved cache K/V
    rollout_s = time.perf_counter() - start
    start = time.perf_counter()
    video.float().square().mean().backward()
    mark("backward")  # allocated now: parameters + their gradients
    stats.update(rollout_s=rollout_s, backward_s=time.perf_counter() - start, latent_frames=frames,
                 parameter_mib=mib(sum(p.numel() * p.element_size() for p in model.parameters())),
                 gradient_mib=mib(sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                                      if p.grad is not None)))
    return stats


def main(argv=None):
    args = parse_args(argv)
    if args.upstream_repo:  # before any step runs: a checkout that cannot be imported stops the run at once
        from reward_forcing.benchmarks.upstream import import_causal_model
        try:
            import_causal_model(args.upstream_repo)
        except UserError as err:
            raise SystemExit(f"error: {err}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, arguments in benchmark_steps(args):
        if name not in args.skip:
            summary[name] = run_benchmark(name, arguments, out)
    for name, step in (("bf16_error", bf16_error), ("training_memory", training_memory)):
        if name not in args.skip:
            print(f"== {name}", flush=True)
            summary[name] = step(args)
            (out / f"{name}.json").write_text(json.dumps(summary[name], indent=2) + "\n")
            print(json.dumps(summary[name], indent=2), flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / 'summary.json'}")

