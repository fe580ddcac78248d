"""Streaming cost per chunk, EMA vs static sink, DiT calls per chunk, and peak memory versus video length.

Runs the StreamingGenerator (the same core as inference.py) on a small randomly initialised causal Wan
model, so it needs no checkpoint. Examples:

    python scripts/benchmark.py                       # latency: 32 chunks, window 9, sink 3
    python scripts/benchmark.py --memory              # peak memory of the streaming pipeline, T=21 vs T=120
    python scripts/benchmark.py --device cuda --dim 1536 --num_layers 30 --num_heads 12 --height 480 --width 832

Targets: last/early chunk latency <= 1.10, EMA/static <= 1.03, exactly 5 DiT forwards per chunk.
"""
import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reward_forcing.config import load_config  # noqa: E402
from reward_forcing.inference.generator import StreamingGenerator, latent_size  # noqa: E402
from reward_forcing.models.causal_wan import CausalWanModel  # noqa: E402

WARMUP_CHUNKS = 3  # chunks 0..2 attend to 3/6/9 frames; from chunk 3 on the window is full and evicts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=32, help="chunks streamed per run (>= 30 for the targets)")
    p.add_argument("--repeats", type=int, default=5, help="runs per sink mode; per chunk the fastest run counts")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--ffn_dim", type=int, default=512)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--text_len", type=int, default=32)
    p.add_argument("--height", type=int, default=128, help="pixels (latent = /8)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--window", type=int, default=9, help="local_attn_size, frames including the sink")
    p.add_argument("--sink", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--memory", action="store_true", help="measure peak memory for --memory_frames instead")
    p.add_argument("--memory_frames", type=int, nargs="+", default=[21, 120])
    p.add_argument("--memory_child", type=int, help=argparse.SUPPRESS)  # one measurement in a fresh process
    p.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True,
                   help="memory mode: also stream-decode with a random tiny Wan VAE and write the mp4")
    return p.parse_args(argv)


def build_config(args, sink_mode):
    return load_config(overrides=[f"height={args.height}", f"width={args.width}", f"local_attn_size={args.window}",
                                  f"sink_size={args.sink}", f"sink_mode={sink_mode}"])


def build_model(args, device, dtype):
    torch.manual_seed(0)
    model = CausalWanModel(dim=args.dim, ffn_dim=args.ffn_dim, num_heads=args.num_heads, num_layers=args.num_layers,
                           text_len=args.text_len, num_frame_per_block=3, local_attn_size=args.window)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device):
    # On CPU, process time ignores the time other jobs hold the cores (this machine is shared).
    return time.perf_counter if device.type == "cuda" else time.process_time


def lockstep(streams, device, calls):
    """Advance several chunk streams in turn (alternating who goes first), so that machine load drifting over
    time hits them alike. Returns per stream the seconds and DiT calls of each chunk."""
    now_fn = clock(device)
    seconds = {name: [] for name in streams}
    counts = {name: [] for name in streams}
    order = list(streams)
    for index in itertools.count():
        for name in order if index % 2 == 0 else order[::-1]:
            sync(device)
            start, before = now_fn(), len(calls)
            if next(streams[name], None) is None:
                return seconds, counts
            sync(device)
            seconds[name].append(now_fn() - start)
            counts[name].append(len(calls) - before)


def latency(args):
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args, device, dtype)
    calls = []
    model.register_forward_pre_hook(lambda module, inputs: calls.append(1))
    context = torch.randn(1, args.text_len, model.text_embedding[0].in_features, device=device, dtype=dtype)
    frames = 3 * args.chunks
    best, forwards = {}, set()
    for _ in range(args.repeats):
        streams = {}
        for mode in ("ema", "static"):
            cfg = build_config(args, mode)
            generator = StreamingGenerator.from_config(model, cfg)
            rng = torch.Generator(device=device).manual_seed(0)
            streams[mode] = generator.stream(context, frames, latent_size(cfg, model.patch_size), generator=rng)
        seconds, counts = lockstep(streams, device, calls)
        for mode in streams:
            forwards.update(counts[mode])
            best[mode] = [min(pair) for pair in zip(best.get(mode, seconds[mode]), seconds[mode])]
    ema = best["ema"]
    early = statistics.median(ema[WARMUP_CHUNKS:WARMUP_CHUNKS + 5])
    late = statistics.median(ema[-5:])
    ratio_ema = sum(ema[WARMUP_CHUNKS:]) / sum(best["static"][WARMUP_CHUNKS:])
    hw = latent_size(build_config(args, "ema"), model.patch_size)
    print(f"config: dim {args.dim}, {args.num_layers} layers, {args.num_heads} heads, latent {hw[0]}x{hw[1]} "
          f"({hw[0] * hw[1] // 4} tokens/frame), window {args.window}, sink {args.sink}, {args.chunks} chunks, "
          f"{args.device}, {torch.get_num_threads()} threads, per chunk the best of {args.repeats} runs, "
          f"{'CUDA-synchronised wall' if device.type == 'cuda' else 'process CPU'} time")
    print(f"per-chunk latency (EMA sink): first {ema[0] * 1e3:.1f} ms, median {statistics.median(ema) * 1e3:.1f} ms, "
          f"last {ema[-1] * 1e3:.1f} ms")
    print(f"last/early: {late / early:.3f}  (median of the last 5 chunks / median of chunks "
          f"{WARMUP_CHUNKS}-{WARMUP_CHUNKS + 4}; target <= 1.10)")
    print(f"EMA/static: {ratio_ema:.3f}  (summed best times of chunks {WARMUP_CHUNKS}..; target <= 1.03)")
    print(f"DiT forwards per chunk: {sorted(forwards)}  (target: exactly [5])")
    return {"first": ema[0], "median": statistics.median(ema), "last": ema[-1], "last_over_early": late / early,
            "ema_over_static": ratio_ema, "forwards_per_chunk": sorted(forwards)}


def _rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_child(args):
    """Stream one video of args.memory_child latent frames through the same path as inference.py."""
    from reward_forcing.inference.pipeline import VideoPipeline
    from reward_forcing.video import Mp4Writer

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = build_config(args, "ema" if args.sink else "none")  # --window -1 --sink 0: the unbounded control
    model = build_model(args, device, dtype)
    decoder = None
    if args.decode:
        from reward_forcing.models.vae import WanVAE, build_autoencoder
        vae_cfg = dict(cfg.vae, base_dim=4, z_dim=model.in_dim)
        decoder = WanVAE(build_autoencoder(vae_cfg)).to(device=device, dtype=dtype).eval()
    pipeline = VideoPipeline(None, StreamingGenerator.from_config(model, cfg), decoder,
                             latent_size(cfg, model.patch_size), device, dtype)
    context = torch.randn(1, args.text_len, model.text_embedding[0].in_features, device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_rss = _rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        if args.decode:
            with Mp4Writer(Path(tmp) / "bench-0.mp4", fps=int(cfg.fps)) as writer:
                for frames in pipeline.frames(context, args.memory_child, seed=0):
                    writer.append(frames)
            count = writer.frames
        else:
            count = sum(c.shape[2] for c in pipeline.generator.stream(context, args.memory_child, pipeline.latent_hw))
    result = {"frames": args.memory_child, "output_frames": count, "peak_rss_mib": _rss_mib(),
              "streaming_rss_growth_mib": _rss_mib() - base_rss}
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(result))


def memory(args):
    results = []
    for frames in args.memory_frames:
        cmd = [sys.executable, __file__, "--memory_child", str(frames), "--device", args.device, "--dim", str(args.dim),
               "--ffn_dim", str(args.ffn_dim), "--num_heads", str(args.num_heads), "--num_layers",
               str(args.num_layers), "--text_len", str(args.text_len), "--height", str(args.height), "--width",
               str(args.width), "--window", str(args.window), "--sink", str(args.sink),
               "--decode" if args.decode else "--no-decode"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ))
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    key = "peak_cuda_mib" if args.device.startswith("cuda") else "peak_rss_mib"
    for r in results:
        extra = f", peak CUDA {r['peak_cuda_mib']:.1f} MiB" if "peak_cuda_mib" in r else ""
        print(f"T={r['frames']} latent frames ({r['output_frames']} {'pixel' if args.decode else 'latent'} frames): "
              f"peak RSS {r['peak_rss_mib']:.1f} MiB, growth while streaming {r['streaming_rss_growth_mib']:.1f} MiB"
              f"{extra}")
    first, last = results[0][key], results[-1][key]
    print(f"peak {key} T={results[-1]['frames']} / T={results[0]['frames']}: {last / first:.3f}  (target <= 1.10)")
    return results


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child is not None:
        return memory_child(args)
    return memory(args) if args.memory else latency(args)


if __name__ == "__main__":
    main()
