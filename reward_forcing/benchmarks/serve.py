"""The streaming server's latency as a client sees it: time to first frame, the time between chunks while
streaming (p50/p99), and switch latency (switch message -> first frame under the new prompt).

Starts `python -m reward_forcing.serve` and talks to it over a real websocket.

    python scripts/benchmark_serve.py --tiny                  # random tiny weights (configs/tiny.yaml), CPU demo
    python scripts/benchmark_serve.py --config_path configs/reward_forcing.yaml \\
        --checkpoint_path checkpoints/Reward-Forcing-T2V-1.3B/rewardforcing.pt --use_ema
    python scripts/benchmark_serve.py --tiny --screenshot docs/serve.png   # also: the page streaming, in Chromium
    python scripts/benchmark_serve.py --tiny --screenshot docs/serve_picture.png --picture start.png
                                                              # instead: the page showing an uploaded picture
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from reward_forcing.errors import UserError


PROMPT = "a red fox trots through fresh snow in a pine forest at dawn"
SWITCH = "the fox leaps into the air, snow bursting around it"


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that say which server to start (server_command)."""
    p.add_argument("--config_path", help="as for the server (default with --tiny: configs/tiny.yaml)")
    p.add_argument("--checkpoint_path", help="as for the server")
    p.add_argument("--use_ema", action="store_true")
    p.add_argument("--tiny", action="store_true", help="use random tiny checkpoints, written to a temporary folder")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="server config overrides, e.g. decoder=taehv")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(p)
    p.add_argument("--runs", type=int, default=3, help="streams measured one after another")
    p.add_argument("--chunks", type=int, default=8, help="chunks per stream")
    p.add_argument("--switch_after", type=int, default=4, help="chunks received before the switch message is sent")
    p.add_argument("--screenshot", help="also save a PNG of the page streaming (Debian chromium + chromium-driver)")
    p.add_argument("--picture", help="with --screenshot: upload this picture on the page and take it showing the "
                                     "picture the next video starts from, instead of streaming")
    args = p.parse_args(argv)
    if args.runs < 1 or not 1 <= args.switch_after < args.chunks:
        raise UserError("need --runs >= 1 and 1 <= --switch_after < --chunks")
    return args


def server_command(args, workdir: Path) -> list[str]:
    config, checkpoint, overrides = args.config_path, args.checkpoint_path, list(args.overrides)
    if args.tiny:
        from reward_forcing.config import load_config
        from reward_forcing.testing.assets import write_tiny_checkpoint_dir

        config = config or "tiny"
        paths = write_tiny_checkpoint_dir(workdir / "tiny", load_config(config))
        checkpoint = checkpoint or str(paths["release"])
        overrides.insert(0, f"checkpoint_dir={workdir / 'tiny'}")
    command = [sys.executable, "-m", "reward_forcing.serve", "--port", "0"]
    command += ["--config_path", config] if config else []
    command += ["--checkpoint_path", checkpoint] if checkpoint else []
    command += ["--use_ema"] if args.use_ema or args.tiny else []
    return command + overrides


def measure_stream(url: str, seed: int, chunks: int, switch_after: int) -> dict:
    """One stream: chunk arrival times, server chunk times, and the switch latency."""
    from websockets.sync.client import connect

    arrivals, frames, generate = [], [], []
    first_frame = switch_sent = switch_frame = switch_latency = None
    with connect(url.replace("http", "ws", 1) + "/ws", max_size=None) as ws:
        hello = json.loads(ws.recv())
        sent = time.perf_counter()
        ws.send(json.dumps({"type": "start", "prompt": PROMPT, "seed": seed}))
        waiting_first_switched = False
        while True:
            message = ws.recv()
            now = time.perf_counter()
            if isinstance(message, bytes):
                if first_frame is None:
                    first_frame = now - sent
                if waiting_first_switched:
                    switch_latency, waiting_first_switched = now - switch_sent, False
                continue
            event = json.loads(message)
            if event["type"] == "chunk":
                arrivals.append(now)
                frames.append(event["video_frames"])
                generate.append(event["generate_s"])
                waiting_first_switched = waiting_first_switched or event["start_latent_frame"] == switch_frame
                if len(arrivals) == switch_after:
                    switch_sent = time.perf_counter()
                    ws.send(json.dumps({"type": "switch", "prompt": SWITCH}))
                if len(arrivals) == chunks:
                    ws.send(json.dumps({"type": "stop"}))
            elif event["type"] == "switched":
                switch_frame = event["start_latent_frame"]
            elif event["type"] == "done":
                break
            elif event["type"] == "error":
                raise RuntimeError(event["message"])
    return {"hello": hello, "ttff": first_frame, "between": np.diff(arrivals[1:]).tolist(), "generate": generate[1:],
            "switch": switch_latency, "rate": sum(frames[2:]) / (arrivals[-1] - arrivals[1])}


def take_screenshot(url: str, path: Path, picture: str | None = None) -> None:
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 120, poll_frequency=0.1)
        shown = lambda: int(driver.find_element("id", "frames-shown").text)  # noqa: E731
        wait.until(lambda d: d.find_element("id", "status").text == "idle")
        if picture is not None:
            driver.find_element("id", "picture").send_keys(str(Path(picture).resolve()))
            wait.until(lambda d: d.find_element("tag name", "body").get_attribute("data-picture") == "shown")
        else:
            driver.find_element("id", "start").click()
            wait.until(lambda d: shown() >= 33)
            driver.find_element("id", "switch").click()
            wait.until(lambda d: d.find_element("tag name", "body").get_attribute("data-switches") == "1")
            target = shown() + 24
            wait.until(lambda d: shown() >= target)
        path.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(path))
    finally:
        driver.quit()
    image = Image.open(path).convert("RGB")
    small = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)
    small.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)  # a small file for the README


def percentile_ms(values, q) -> str:
    return f"{1000 * np.percentile(values, q):.0f}" if len(values) else "-"


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        command = server_command(args, Path(workdir))
        started = time.perf_counter()
        server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
        try:
            line = server.stdout.readline()
            if not line.startswith("serving on "):
                raise UserError(f"the server did not start: {' '.join(command)}")
            url = line.split()[2]
            ready = time.perf_counter() - started
            runs = [measure_stream(url, seed, args.chunks, args.switch_after) for seed in range(args.runs)]
            if args.screenshot:
                take_screenshot(url, Path(args.screenshot), args.picture)
        finally:
            server.terminate()
            server.wait(60)
    hello = runs[0]["hello"]
    between = [t for run in runs for t in run["between"]]
    generate = [t for run in runs for t in run["generate"]]
    ttff = [run["ttff"] for run in runs]
    switch = [run["switch"] for run in runs if run["switch"] is not None]
    print(f"server: {hello['width']}x{hello['height']}, {hello['chunk_latent_frames']} latent frames per chunk, "
          f"decoder {hello['decoder']} (overlap_decode {hello['overlap_decode']}), switch_sink {hello['switch_sink']}; "
          f"ready {ready:.1f} s after launch")
    print(f"{args.runs} streams x {args.chunks} chunks, switch after chunk {args.switch_after}")
    print(f"time to first frame      p50 {percentile_ms(ttff, 50)} ms   max {1000 * max(ttff):.0f} ms")
    print(f"between chunks (client)  p50 {percentile_ms(between, 50)} ms   p99 {percentile_ms(between, 99)} ms")
    print(f"frames per second        {np.mean([run['rate'] for run in runs]):.1f} (streaming, after the first chunk)")
    print(f"chunk made (server)      p50 {percentile_ms(generate, 50)} ms   p99 {percentile_ms(generate, 99)} ms")
    print(f"switch -> new frame      p50 {percentile_ms(switch, 50)} ms   max "
          f"{1000 * max(switch) if switch else float('nan'):.0f} ms  ({len(switch)}/{args.runs} measured)")
    return 0

