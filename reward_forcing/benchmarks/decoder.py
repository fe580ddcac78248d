"""Peak memory of streaming decode, short vs long latent video (tiny random VAE or TAEHV, CPU).

Each measurement runs in a fresh process: peak RSS (ru_maxrss) is read after the model is built and one warm-up
chunk is decoded, then again after the whole video is streamed through `decode_chunk` with every chunk of
frames consumed and dropped (as a video writer would). The growth should not depend on the video's length:
the summary gives the ratio of the two peaks and the long video's extra growth in MiB (a ratio of growths
would divide by ~0 when the short video adds nothing).
`--full` adds the same measurement for a one-shot `decode` of the whole video, for contrast.

  python scripts/benchmark_decoder.py --decoder vae --short 6 --long 60
"""
import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import torch

from reward_forcing.errors import ConfigError

TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
TINY_TAEHV = dict(latent_channels=16, encoder_width=8, decoder_widths=(16, 8, 8, 8))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _build(decoder: str, folder: Path):
    from reward_forcing.testing import assets
    if decoder == "vae":
        from reward_forcing.models.vae import WanVAE
        assets.write_vae(folder / "Wan2.1_VAE.pth", TINY_VAE)
        return WanVAE.from_file(folder / "Wan2.1_VAE.pth", TINY_VAE)
    from reward_forcing.models.taehv import TAEHV
    assets.write_taehv(folder / "taew2_1.pth", **TINY_TAEHV)
    return TAEHV.from_file(folder / "taew2_1.pth")


def _measure(decoder, frames, h, w, chunk, full, queue):
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = _build(decoder, Path(tmp))
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, frames, h, w, generator=gen)
    model.stream_decoder().decode_chunk(latents[:, :, :chunk])  # warm-up: allocator pools, lazy init
    before = _peak_mib()
    start = time.perf_counter()
    n_pixel_frames = 0
    if full:
        n_pixel_frames = model.decode(latents).shape[2]
    else:
        stream = model.stream_decoder()
        for i in range(0, frames, chunk):
            n_pixel_frames += stream.decode_chunk(latents[:, :, i:i + chunk]).shape[2]  # consumed, then dropped
    queue.put((before, _peak_mib(), n_pixel_frames, time.perf_counter() - start))


def measure(decoder, frames, h, w, chunk, full=False):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(decoder, frames, h, w, chunk, full, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoder", choices=["vae", "taehv"], default="vae")
    parser.add_argument("--short", type=int, default=6, help="latent frames of the short video")
    parser.add_argument("--long", type=int, default=60, help="latent frames of the long video")
    parser.add_argument("--latent-size", type=int, nargs=2, default=[16, 16], metavar=("H", "W"))
    parser.add_argument("--chunk", type=int, default=3, help="latent frames per decode_chunk call")
    parser.add_argument("--full", action="store_true", help="also measure one-shot decode of the whole video")
    args = parser.parse_args(argv)
    if not 0 < args.short < args.long or args.chunk < 1:
        raise ConfigError("need 0 < --short < --long and --chunk >= 1")
    h, w = args.latent_size
    modes = [False, True] if args.full else [False]
    print(f"decoder={args.decoder} latents 16x{h}x{w} chunk={args.chunk} (tiny random weights, CPU, 1 thread)")
    for full in modes:
        peak, growth = {}, {}
        for frames in (args.short, args.long):
            before, after, n_px, secs = measure(args.decoder, frames, h, w, args.chunk, full)
            peak[frames], growth[frames] = after, after - before
            print(f"  {'full  ' if full else 'stream'} {frames:4d} latents -> {n_px:4d} frames: peak RSS "
                  f"{before:7.1f} -> {after:7.1f} MiB (+{after - before:6.1f}) in {secs:6.2f} s", flush=True)
        print(f"  {'full  ' if full else 'stream'} peak RSS long/short = {peak[args.long] / peak[args.short]:.3f}, "
              f"growth long - short = {growth[args.long] - growth[args.short]:+.1f} MiB "
              f"(video length ratio {args.long / args.short:.1f})")

