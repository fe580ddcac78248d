"""Streaming speed: DiT-only and end-to-end FPS, time to first frame, chunk latency, memory, compile and overlap.

Runs the same StreamingGenerator / VideoPipeline as inference.py on randomly initialised weights (speed does not
depend on weight values), so no download is needed. Examples:

    python scripts/benchmark.py                                  # ~1 min on a laptop CPU: small model, 12 chunks
    python scripts/benchmark.py --compile --compare --json out.json    # eager vs compiled, sequential vs overlapped
    python scripts/benchmark.py --config configs/tiny.yaml --random_weights --compare    # needs config.json from
                                                       # scripts/make_tiny_checkpoints.py for the tiny architecture
    python scripts/benchmark.py --config configs/reward_forcing.yaml --random_weights --device cuda --compile
                                                       # the 1.3B student at 832x480 (the paper's setting)
    python scripts/benchmark.py --ema_vs_static                  # per-chunk latency, EMA vs static sink
    python scripts/benchmark.py --memory                         # peak memory of the streaming pipeline, T=21 vs 120
    python scripts/benchmark.py --dit_only --upstream_repo ../Reward-Forcing    # beside upstream's causal DiT

--json writes: dit_fps, e2e_fps, ttff_s, chunk_p50_s, chunk_p99_s, peak_memory_mb, compiled_graphs, recompiles,
env, aten_ops_per_chunk, copy_ops_per_chunk, and with --compare eager_vs_compiled (with --compile) and
sequential_vs_overlapped (ratios > 1: the fast path is faster). FPS counts output video frames.
With --upstream_repo also (upstream's causal DiT with our weights, streamed in the same run, chunks interleaved):
upstream_chunk_s (its DiT-only steady chunk p50), ratio_vs_upstream (chunk_p50_s / upstream_chunk_s: < 1, ours is
faster), eager_ratio_vs_upstream (our eager path's, with --compile --compare), upstream_max_abs_diff (largest
|ours - upstream| over every streamed chunk: same weights, noise and sampling loop), upstream_aten_ops_per_chunk,
upstream_copy_ops_per_chunk, upstream_repo (path @ commit).
"""
import argparse
import collections
import hashlib
import itertools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from reward_forcing.checkpoints import asset_path, read_wan_config
from reward_forcing.config import load_config
from reward_forcing.errors import UserError
from reward_forcing.inference.generator import StreamingGenerator, latent_size, vae_strides
from reward_forcing.inference.pipeline import VideoPipeline, compile_if_configured
from reward_forcing.models.causal_wan import CausalWanModel

MODULE = "reward_forcing.benchmarks.streaming"  # run as a child process for each memory measurement
WARMUP_CHUNKS = 3  # chunks 0..2 attend to 3/6/9 frames; from chunk 3 on the window is full and evicts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--config", help="a config YAML (model, size, window, decoder); default: a small model from the "
                                    "size flags below with a small random Wan VAE")
    p.add_argument("--random_weights", action="store_true",
                   help="with --config: build the configured model at its real size with random weights (the "
                        "architecture from the model folder's config.json if present, else the released "
                        "Wan2.1-T2V-1.3B one) instead of loading checkpoints")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the steady streaming step (config key compile)")
    p.add_argument("--compare", action="store_true",
                   help="also run the slow paths: eager vs compiled (with --compile), sequential vs overlapped decode")
    p.add_argument("--chunks", type=int, default=12, help="chunks streamed per run (the first fill the window)")
    p.add_argument("--dit_only", action="store_true", help="skip the end-to-end passes (e2e_fps, ttff_s are null)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:n]")
    p.add_argument("--upstream_repo", metavar="DIR",
                   help="a checkout of JaydenLyh/Reward-Forcing: also stream its causal DiT (wan/modules/"
                        "causal_model.py) with this model's weights, chunks interleaved with ours "
                        "(see reward_forcing/benchmarks/upstream.py)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. height=96 width=160")
    small = p.add_argument_group("the small default model (ignored with --config)")
    small.add_argument("--dim", type=int, default=256)
    small.add_argument("--ffn_dim", type=int, default=512)
    small.add_argument("--num_heads", type=int, default=4)
    small.add_argument("--num_layers", type=int, default=4)
    small.add_argument("--text_len", type=int, default=32)
    small.add_argument("--height", type=int, default=128, help="pixels (latent = /8)")
    small.add_argument("--width", type=int, default=208)
    small.add_argument("--window", type=int, default=9, help="local_attn_size, frames including the sink")
    small.add_argument("--sink", type=int, default=3)
    small.add_argument("--vae_base_dim", type=int, default=4, help="width of the small random Wan VAE")
    other = p.add_argument_group("other reports")
    other.add_argument("--ema_vs_static", action="store_true", help="per-chunk latency, EMA vs static sink")
    other.add_argument("--repeats", type=int, default=5, help="--ema_vs_static: runs per sink mode; per chunk the "
                                                              "fastest run counts")
    other.add_argument("--memory", action="store_true", help="peak memory for --memory_frames instead")
    other.add_argument("--memory_frames", type=int, nargs="+", default=[21, 120])
    other.add_argument("--memory_child", type=int, help=argparse.SUPPRESS)  # one measurement in a fresh process
    other.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True,
                       help="memory mode: also stream-decode with a random tiny Wan VAE and write the mp4")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.random_weights and not args.config:
        p.error("--random_weights goes with --config (the default model is random already)")
    if args.upstream_repo and (args.memory or args.ema_vs_static or args.memory_child is not None):
        p.error("--upstream_repo goes with the FPS harness (not --memory or --ema_vs_static)")
    return args


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
    calls = []  # every DiT call, whichever streaming step runs it, embeds its chunk once
    model.patch_embedding.register_forward_pre_hook(lambda module, inputs: calls.append(1))
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
        cmd = [sys.executable, "-m", MODULE, "--memory_child", str(frames), "--device", args.device, "--dim", str(args.dim),
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


# ---- the FPS harness -------------------------------------------------------------------------------------------
COPY_OPS = ("aten::copy_", "aten::_to_copy", "aten::cat", "aten::clone", "aten::contiguous")


def progress(message):
    print(message, file=sys.stderr, flush=True)


def harness_config(args):
    """The run's config: --config (+ overrides), or the defaults sized by the small-model flags."""
    if args.config:
        return load_config(args.config, [*args.overrides, f"compile={str(args.compile).lower()}"])
    sizes = [f"height={args.height}", f"width={args.width}", f"local_attn_size={args.window}",
             f"sink_size={args.sink}", f"sink_mode={'ema' if args.sink else 'none'}",
             f"vae.base_dim={args.vae_base_dim}"]
    return load_config(overrides=[*sizes, *args.overrides, f"compile={str(args.compile).lower()}"])


def harness_model(args, cfg):
    """(model, description): the small flag-sized model, random weights at the configured architecture, or the
    configured checkpoint (VideoPipeline's loader)."""
    blocks = dict(num_frame_per_block=int(cfg.num_frame_per_block), local_attn_size=int(cfg.local_attn_size))
    if not args.config:
        return CausalWanModel(dim=args.dim, ffn_dim=args.ffn_dim, num_heads=args.num_heads, num_layers=args.num_layers,
                              text_len=args.text_len, **blocks), "small random model"
    if not args.random_weights:
        from reward_forcing.inference.pipeline import load_student
        model, _ = load_student(cfg, cfg.get("inference", {}).get("checkpoint_path"))
        return model, f"weights of {cfg.model_name}"
    folder = asset_path(cfg.checkpoint_dir, cfg.model_name)
    arch = read_wan_config(folder) if (folder / "config.json").is_file() else {}
    with torch.device("meta"):  # no init work: the weights are filled once below
        model = CausalWanModel.from_config(arch, **blocks)
    fill_random_(model.to_empty(device="cpu"))
    source = f"{folder}/config.json" if arch else "the released Wan2.1-T2V-1.3B architecture"
    return model, f"random weights, {source}"


def fill_random_(module, std=0.02, period=2**20):
    """Fill every parameter with N(0, std^2) noise (one random block of `period` values, tiled): fast at 1.3B
    parameters, and GEMM and attention speed does not depend on the values."""
    block = torch.randn(period, generator=torch.Generator().manual_seed(0)) * std
    with torch.no_grad():
        for param in module.parameters():
            flat = param.view(-1)
            for start in range(0, flat.numel(), period):
                piece = flat[start:start + period]
                piece.copy_(block[:piece.numel()])
    return module


def harness_decoder(cfg, in_dim, device, dtype):
    """The configured decoder with random weights (its real size for a real config)."""
    torch.manual_seed(0)
    if cfg.decoder == "taehv":
        from reward_forcing.models.taehv import TAEHV
        decoder = TAEHV(latent_channels=in_dim)
    else:
        from reward_forcing.models.vae import WanVAE, build_autoencoder
        decoder = WanVAE(build_autoencoder(dict(cfg.vae, z_dim=in_dim)))
    return decoder.to(device=device, dtype=dtype).eval().requires_grad_(False)


class Setup:
    def __init__(self, args):
        self.args = args
        self.cfg = harness_config(args)
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" and self.cfg.mixed_precision else torch.float32
        progress(f"building the model on {self.device} ({self.dtype}) ...")
        torch.manual_seed(0)
        model, self.source = harness_model(args, self.cfg)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        if not args.dit_only:
            progress(f"building the {self.cfg.decoder} decoder with random weights (importing diffusers takes a "
                     "while) ...")
        self.decoder = None if args.dit_only else harness_decoder(self.cfg, self.model.in_dim, self.device, self.dtype)
        self.latent_hw = latent_size(self.cfg, self.model.patch_size)
        text_dim, text_len = self.model.text_embedding[0].in_features, self.model.text_len
        self.context = torch.randn(1, text_len, text_dim, generator=torch.Generator().manual_seed(0)).to(
            self.device, self.dtype)
        chunk = int(self.cfg.num_frame_per_block)
        window = int(self.cfg.local_attn_size)
        # chunks until the attended K/V length stops growing (the compiled graph is built on the last of them)
        self.warmup = min(args.chunks - 1, math.ceil(window / chunk) if window > 0 else 3)
        self.chunk_frames = chunk
        self.frames_per_chunk = vae_strides(self.cfg)[0] * chunk  # output video frames of a steady chunk

    def generator(self):
        return StreamingGenerator.from_config(self.model, self.cfg)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def dit_stream(setup, generator, chunks):
    """Chunks of one video streamed by `generator` with the run's prompt and noise seed."""
    return generator.stream(setup.context, setup.chunk_frames * chunks, setup.latent_hw,
                            generator=torch.Generator(device=setup.device).manual_seed(0), dtype=setup.dtype)


def dit_passes(setup, generators, chunks):
    """Seconds per chunk of the DiT alone (denoising steps + context pass, synchronised) and the chunks produced,
    for each name -> StreamingGenerator (eager, compiled, upstream's model). They stream side by side, one chunk
    each in turn (alternating who goes first), so that load drifting over time (a shared machine) hits them alike."""
    streams = {name: dit_stream(setup, generator, chunks) for name, generator in generators.items()}
    seconds = {name: [] for name in streams}
    outputs = {name: [] for name in streams}
    order = list(streams)
    for index in range(chunks):
        for name in order if index % 2 == 0 else order[::-1]:
            if name == "compiled" and index == setup.warmup - 1 and int(setup.cfg.local_attn_size) > 0:
                progress(f"[DiT {name}] chunk {index + 1}/{chunks} fills the window: torch.compile builds the "
                         "steady streaming step now ...")
            setup.sync()
            start = time.perf_counter()
            outputs[name].append(next(streams[name]))
            setup.sync()
            seconds[name].append(time.perf_counter() - start)
            progress(f"[DiT {name}] chunk {index + 1}/{chunks}: {seconds[name][-1] * 1e3:.1f} ms")
    return seconds, outputs


def count_ops(setup, model):
    """Dispatched ATen ops, and the copy-like ones among them, in the first steady chunk of `model`'s eager
    streaming (the CPU proxy for kernel launches)."""
    from torch.profiler import ProfilerActivity, profile

    # kineto logs profiler_start / profiler_stop to stderr at its USDT level (5, its highest): 6 silences it
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    progress(f"counting the ATen ops of one steady chunk ({setup.warmup} warm-up chunks first) ...")
    stream = dit_stream(setup, StreamingGenerator.from_config(model, setup.cfg), setup.warmup + 1)
    for _ in range(setup.warmup):
        next(stream)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        next(stream)
    names = collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))
    return sum(names.values()), sum(names[name] for name in COPY_OPS)


def e2e_pass(setup, generator, label, chunks, overlap):
    """Frames decoded and written (mp4) chunk by chunk; returns the time each chunk's frames were written
    (from the start), and a digest of every frame."""
    from reward_forcing.video import Mp4Writer

    pipeline = VideoPipeline(None, generator, setup.decoder, setup.latent_hw, setup.device, setup.dtype,
                             overlap=overlap)
    stamps, frames, digest = [], [], hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp, Mp4Writer(Path(tmp) / "bench.mp4", fps=int(setup.cfg.fps)) as writer:
        setup.sync()
        start = time.perf_counter()
        for index, chunk in enumerate(pipeline.frames(setup.context, setup.chunk_frames * chunks, seed=0)):
            writer.append(chunk)
            stamps.append(time.perf_counter() - start)
            frames.append(chunk.shape[0])
            digest.update(chunk.tobytes())
            progress(f"[{label}] chunk {index + 1}/{chunks}: frames written at {stamps[-1]:.2f} s")
    return stamps, frames, digest.hexdigest()


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def compile_counters():
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def environment(setup):
    from reward_forcing.models.attention import _flash_kernel
    device = setup.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    flash = _flash_kernel() if device.type == "cuda" else None
    backend = f"{flash.__module__}.flash_attn_func" if flash is not None else "torch scaled_dot_product_attention"
    hw = setup.latent_hw
    return {"torch": torch.__version__, "device": f"{device} ({name})", "dtype": str(setup.dtype).replace("torch.", ""),
            "attention_backend": backend, "threads": torch.get_num_threads(), "model": setup.source,
            "parameters": sum(p.numel() for p in setup.model.parameters()),
            "size": f"{setup.cfg.height}x{setup.cfg.width} (latent {hw[0]}x{hw[1]})", "decoder": setup.cfg.decoder,
            "window": int(setup.cfg.local_attn_size), "sink": int(setup.cfg.sink_size), "chunks": setup.args.chunks,
            "steady_chunks": setup.args.chunks - setup.warmup, "overlap_decode": bool(setup.cfg.overlap_decode)}


def fps_report(args):
    """The harness: DiT-only and end-to-end passes (and their slow twins with --compare); see the module doc."""
    setup = Setup(args)
    warm, steady = setup.warmup, slice(setup.warmup, None)
    result = {}
    generators = {}
    if args.compare or not args.compile:
        generators["eager"] = setup.generator()
    if args.compile:
        torch._dynamo.reset()
        before = compile_counters()
        generators["compiled"] = compile_if_configured(setup.generator(), setup.cfg, setup.device)
    fast_path = "compiled" if args.compile else "eager"
    upstream = None
    if args.upstream_repo:
        from reward_forcing.benchmarks.upstream import load_upstream_model
        progress(f"building upstream's causal model from {args.upstream_repo} with the same weights ...")
        upstream = load_upstream_model(args.upstream_repo, setup.model, setup.cfg, setup.device, setup.dtype)
        generators["upstream"] = StreamingGenerator.from_config(upstream, setup.cfg)
    seconds, outputs = dit_passes(setup, generators, args.chunks)
    fast = seconds[fast_path]
    steady_fast = fast[steady]
    result["dit_fps"] = setup.frames_per_chunk / statistics.median(steady_fast)
    result["chunk_p50_s"] = statistics.median(steady_fast)
    result["chunk_p99_s"] = percentile(steady_fast, 0.99)
    result["e2e_fps"] = result["ttff_s"] = None
    if not args.dit_only:
        overlap = bool(setup.cfg.overlap_decode)
        stamps, frames, digest = e2e_pass(setup, generators[fast_path], f"end to end, "
                                          f"{'overlapped' if overlap else 'sequential'} decode", args.chunks, overlap)
        result["e2e_fps"] = sum(frames[warm:]) / (stamps[-1] - stamps[warm - 1]) if warm else sum(frames) / stamps[-1]
        result["ttff_s"] = stamps[0]
    result["peak_memory_mb"] = peak_memory_mb(setup.device)
    if args.compare and args.compile:
        result["eager_vs_compiled"] = sum(seconds["eager"][steady]) / sum(fast[steady])
    if args.compare and not args.dit_only:
        other, other_frames, other_digest = e2e_pass(setup, generators[fast_path], f"end to end, "
                                                     f"{'sequential' if overlap else 'overlapped'} decode",
                                                     args.chunks, not overlap)
        if other_digest != digest or other_frames != frames:
            raise SystemExit("error: overlapped and sequential decoding wrote different frames")
        sequential, overlapped = (other, stamps) if overlap else (stamps, other)
        result["sequential_vs_overlapped"] = sequential[-1] / overlapped[-1]
    graphs = compile_counters() - before if args.compile else 0
    result["compiled_graphs"] = graphs
    result["recompiles"] = max(0, graphs - 1)  # one graph is the steady step; any further one is a recompile
    result["env"] = environment(setup)
    result["aten_ops_per_chunk"], result["copy_ops_per_chunk"] = count_ops(setup, setup.model)
    if upstream is not None:
        result.update(upstream_report(setup, upstream, seconds, outputs, args))
    print_report(setup, result, fast)
    return result


def upstream_report(setup, model, seconds, outputs, args):
    """Upstream's steady chunk, ours over it, how far apart the two streams' chunks are, upstream's op counts."""
    fast = "compiled" if args.compile else "eager"
    upstream_s = statistics.median(seconds["upstream"][setup.warmup:])
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(outputs[fast], outputs["upstream"]))
    ops, copies = count_ops(setup, model)
    report = {"upstream_chunk_s": upstream_s, "ratio_vs_upstream": statistics.median(seconds[fast][setup.warmup:]) /
              upstream_s, "upstream_max_abs_diff": diff, "upstream_aten_ops_per_chunk": ops,
              "upstream_copy_ops_per_chunk": copies, "upstream_repo": upstream_checkout(args.upstream_repo)}
    if fast != "eager" and "eager" in seconds:
        report["eager_ratio_vs_upstream"] = statistics.median(seconds["eager"][setup.warmup:]) / upstream_s
    return report


def upstream_checkout(repo):
    """The checkout's path and commit (git), for the record."""
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    commit = head.stdout.strip() if head.returncode == 0 else "commit unknown (not a git checkout)"
    return f"{Path(repo).resolve()} @ {commit}"


def print_report(setup, result, seconds):
    env = result["env"]
    print(f"model: {env['model']}, {env['parameters'] / 1e6:.1f} M parameters; {env['size']}; "
          f"window {env['window']}, sink "
          f"{env['sink']}; decoder {env['decoder']}; {env['device']}, {env['dtype']}, {env['threads']} threads")
    print(f"DiT only: {result['dit_fps']:.2f} FPS; steady chunk p50 {result['chunk_p50_s'] * 1e3:.1f} ms, "
          f"p99 {result['chunk_p99_s'] * 1e3:.1f} ms ({env['steady_chunks']} steady chunks, {setup.frames_per_chunk} "
          f"frames each)")
    if result["e2e_fps"] is not None:
        print(f"end to end (denoise + decode + mp4): {result['e2e_fps']:.2f} FPS; time to first frame "
              f"{result['ttff_s']:.2f} s (prompt encoding excluded)")
    allocator = "CUDA allocator" if setup.device.type == "cuda" else "RSS"
    print(f"peak memory: {result['peak_memory_mb']:.0f} MiB ({allocator})"
          f"; compiled graphs {result['compiled_graphs']}, recompiles {result['recompiles']}")
    print(f"eager ATen ops per steady chunk: {result['aten_ops_per_chunk']}, copy-like {result['copy_ops_per_chunk']}")
    if "upstream_chunk_s" in result:
        eager = f", eager {result['eager_ratio_vs_upstream']:.3f}" if "eager_ratio_vs_upstream" in result else ""
        print(f"upstream ({result['upstream_repo']}), same weights: steady chunk p50 "
              f"{result['upstream_chunk_s'] * 1e3:.1f} ms; ratio_vs_upstream {result['ratio_vs_upstream']:.3f} "
              f"(ours / upstream){eager}; max |ours - upstream| over all chunks {result['upstream_max_abs_diff']:.3g}; "
              f"eager ATen ops {result['upstream_aten_ops_per_chunk']}, copy-like "
              f"{result['upstream_copy_ops_per_chunk']}")
    for key, what in (("eager_vs_compiled", "eager / compiled steady-chunk time"),
                      ("sequential_vs_overlapped", "sequential / overlapped end-to-end time (frames identical)")):
        if key in result:
            print(f"{key}: {result[key]:.3f}  ({what})")
    print_estimates(setup, statistics.median(seconds[setup.warmup:]))


def chunk_flops(model, tokens_per_frame, chunk_frames, attended_frames, forwards):
    """Multiply-adds x 2 of the DiT per chunk (linear layers and attention; the glue is not counted)."""
    d, ffn = model.dim, model.blocks[0].ffn[0].out_features
    n, keys = tokens_per_frame * chunk_frames, tokens_per_frame * attended_frames
    per_block = 2 * n * (6 * d * d + 2 * d * ffn) + 4 * n * keys * d + 4 * n * model.text_len * d
    return forwards * len(model.blocks) * per_block


def matmul_flops_per_s(setup, size=1024, repeats=3):
    """This device's GEMM rate in the run's dtype (the floor of a real-size chunk is its GEMMs)."""
    progress("measuring this device's GEMM rate ...")
    a = torch.randn(size, size, device=setup.device).to(setup.dtype)
    torch.mm(a, a)
    setup.sync()
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, a)
    setup.sync()
    return repeats * 2 * size ** 3 / (time.perf_counter() - start)


def print_estimates(setup, chunk_seconds):
    """Expected runtimes of heavier settings on this device."""
    patch = setup.model.patch_size[1] * setup.model.patch_size[2]
    with torch.device("meta"):
        released = CausalWanModel()  # the defaults are the released Wan2.1-T2V-1.3B sizes
    real = chunk_flops(released, (480 // 8) * (832 // 8) // patch, 3, 9, 5)  # 832x480, window 9, 5 calls
    per_chunk = real / matmul_flops_per_s(setup)
    print(f"expected on this device: --chunks 64 ~{64 * chunk_seconds:.0f} s of DiT for this model; the 1.3B "
          f"student at 832x480 (--config configs/reward_forcing.yaml --random_weights) >= {per_chunk:.0f} s per "
          f"chunk ({real / 1e12:.0f} TFLOP at this device's measured GEMM rate); --compare streams every chunk "
          f"through 2 DiT and 2 end-to-end passes")


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child is not None:
        return memory_child(args)
    if args.memory:
        return memory(args)
    if args.ema_vs_static:
        return latency(args)
    try:
        result = fps_report(args)
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
