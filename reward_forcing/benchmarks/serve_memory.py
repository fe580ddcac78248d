"""How much memory the streaming server holds for a client that never reads, at a large frame size.

Starts `python -m reward_forcing.serve` (as scripts/benchmark_serve.py does), or with --noise the same app over
frames of uniform noise (reward_forcing/testing/noise_server.py: the JPEG's worst case, made in milliseconds, for machines
where the model is slow or its random tiny weights make flat, small frames), and reads one whole stream (the
baseline: the server after making and sending a stream). Then a client sends `start` and never reads (the client
library takes one message, the socket's receive window is 4 KB), and a second client streams a chunk: its stream
begins when the device is done with the first. Prints the server's resident memory (VmRSS, sampled meanwhile) when
the second stream is done and at its peak, against the baseline, beside the JPEG bytes of the never-read stream.
glibc's dynamic mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so that freed frames leave the resident set.

    python scripts/serve_slow_reader_memory.py --noise                  # 480x832 (the packaged defaults' size)
    python scripts/serve_slow_reader_memory.py --tiny height=480 width=832 decoder=taehv
    python scripts/serve_slow_reader_memory.py --config_path configs/reward_forcing.yaml \\
        --checkpoint_path checkpoints/Reward-Forcing-T2V-1.3B/rewardforcing.pt --use_ema
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from websockets.sync.client import connect

from reward_forcing.benchmarks.serve import PROMPT, add_server_arguments, server_command
from reward_forcing.errors import UserError


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(p)
    p.add_argument("--noise", action="store_true", help="serve frames of noise instead of a model's")
    p.add_argument("--latent_frames", type=int, default=30, help="length of the stream that is never read")
    p.add_argument("--chunk", type=int, default=3, help="latent frames per chunk (the config's num_frame_per_block)")
    args = p.parse_args(argv)
    if args.chunk < 1 or args.latent_frames < args.chunk or args.latent_frames % args.chunk:
        raise UserError("--latent_frames must be a positive multiple of --chunk")
    return args


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise UserError(f"no VmRSS for process {pid}")


def read_stream(ws_url: str, latent_frames: int) -> list[int]:
    """The JPEG sizes of one whole stream, read as it comes."""
    sizes = []
    with connect(ws_url, max_size=None, open_timeout=60) as ws:
        ws.send(json.dumps({"type": "start", "prompt": PROMPT, "seed": 1, "frames": latent_frames}))
        while True:
            message = ws.recv(timeout=600)
            if isinstance(message, bytes):
                sizes.append(len(message))
            elif json.loads(message)["type"] in ("done", "error"):
                return sizes


def never_read(ws_url: str, address, latent_frames: int, pid: int) -> tuple[float, float]:
    """Server RSS when the device is done with a stream no one reads (and with the next), and its peak meanwhile
    (MiB)."""
    peak, finished = [0.0], threading.Event()

    def watch():
        while not finished.is_set():
            peak[0] = max(peak[0], rss_mib(pid))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(address)
    try:
        with connect(ws_url, sock=sock, max_queue=1, max_size=None, open_timeout=60, close_timeout=1) as never, \
                connect(ws_url, max_size=None, open_timeout=60) as second:
            never.send(json.dumps({"type": "start", "prompt": PROMPT, "seed": 2, "frames": latent_frames}))
            second.send(json.dumps({"type": "start", "prompt": PROMPT, "seed": 3, "frames": 3}))
            while (message := second.recv(timeout=3600)) and (isinstance(message, bytes) or
                                                              json.loads(message)["type"] != "done"):
                pass
            held = rss_mib(pid)
            finished.set()
            watcher.join()
            sock.shutdown(socket.SHUT_RDWR)  # leave without reading what was kept
    finally:
        finished.set()
        sock.close()
    return held, max(peak[0], held)


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        command = ([sys.executable, "-m", "reward_forcing.testing.noise_server", *args.overrides] if args.noise
                   else server_command(args, Path(workdir)))
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        try:
            line = server.stdout.readline()
            if not line.startswith("serving on "):
                raise UserError(f"the server did not start: {' '.join(command)}")
            url = line.split()[2]
            host, port = url.removeprefix("http://").split(":")
            ws_url = url.replace("http", "ws", 1) + "/ws"
            sizes = read_stream(ws_url, 2 * args.chunk)
            baseline = rss_mib(server.pid)
            held, peak = never_read(ws_url, (host, int(port)), args.latent_frames, server.pid)
        finally:
            server.terminate()
            server.wait(60)
    frame_kb = sum(sizes) / len(sizes) / 1024
    video_frames = 1 + 4 * (args.latent_frames - 1)
    print(f"frames: {frame_kb:.0f} KB JPEG on average; the never-read stream: {args.latent_frames} latent frames = "
          f"{video_frames} video frames = {video_frames * frame_kb / 1024:.0f} MiB")
    print(f"server RSS: baseline {baseline:.0f} MiB (after one stream read whole); with the never-read stream "
          f"done: +{held - baseline:.1f} MiB; peak meanwhile: +{peak - baseline:.1f} MiB")
    return 0

