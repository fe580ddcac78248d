"""python -m reward_forcing.serve: load the model once (as inference.py does) and serve the page and websocket.

    python -m reward_forcing.serve --config_path configs/reward_forcing.yaml \\
        --checkpoint_path checkpoints/Reward-Forcing-T2V-1.3B/rewardforcing.pt --use_ema [--port 7860]
"""
import argparse
import socket
import tempfile

from reward_forcing.config import load_config
from reward_forcing.errors import ConfigError
from reward_forcing.inference.cli import OneLineParser, apply_flags, validate_model
from reward_forcing.inference.pipeline import VideoPipeline, resolve_device

POSITIVE_KEYS = ("max_prompt_chars", "max_queue", "max_frames", "keep_videos", "max_unsent_mib", "stall_timeout_s",
                 "max_image_bytes", "keep_images")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Serve real-time streaming text-to-video: a web page and a websocket.")
    p.add_argument("--config_path", help="YAML merged over the packaged defaults (as for inference.py)")
    p.add_argument("--checkpoint_path", help="student weights: flat, or with generator / generator_ema sections")
    p.add_argument("--use_ema", action="store_true", default=None, help="load the generator_ema section")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on; 0 picks a free one")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. decoder=taehv")
    return p


def load_serve_config(argv=None):
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config_path, args.overrides)
    apply_flags(cfg, args)
    validate_model(cfg)
    for key in POSITIVE_KEYS:  # whole numbers by their type (reward_forcing/settings.py ServeSettings)
        if cfg.serve[key] < 1:
            raise ConfigError(f"serve.{key} must be a whole number >= 1, got {cfg.serve[key]!r}")
    if not 1 <= cfg.serve.jpeg_quality <= 95:
        raise ConfigError(f"serve.jpeg_quality must be a whole number in [1, 95], got {cfg.serve.jpeg_quality!r}")
    check_image_types(cfg.serve.image_types)
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    return args, cfg


def check_image_types(image_types) -> None:
    """serve.image_types: a non-empty list of the file formats PIL reads (its names, any case)."""
    from PIL import Image

    Image.init()
    unknown = [kind for kind in image_types if str(kind).upper() not in Image.OPEN]
    if not image_types or unknown:
        raise ConfigError(f"serve.image_types must name file formats PIL reads (png, jpeg, webp, ...), got "
                          f"{list(image_types)}")


def listen(host: str, port: int) -> socket.socket:
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as err:
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def run_server(app, cfg, sock: socket.socket) -> None:
    """Serve `app` on the listening `sock` until Ctrl+C: one-line log records, and the websocket layer refuses a
    message longer than any valid one (close code 1009) before it is read."""
    import uvicorn

    from reward_forcing.serve.log import log_config
    from reward_forcing.serve.protocol import max_message_chars

    max_message_bytes = 4 * max_message_chars(int(cfg.serve.max_prompt_chars))  # UTF-8: <= 4 bytes a character
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", log_config=log_config(),
                                           ws="websockets-sansio", ws_max_size=max_message_bytes))
    server.run(sockets=[sock])


def main(argv=None) -> int:
    args, cfg = load_serve_config(argv)
    sock = listen(args.host, args.port)  # before loading, so a taken port fails fast
    from reward_forcing.serve.app import create_app

    with sock, tempfile.TemporaryDirectory(prefix="reward-forcing-videos-") as videos:
        device = resolve_device(str(cfg.inference.device))
        pipeline = VideoPipeline.from_config(cfg, cfg.inference.checkpoint_path, bool(cfg.inference.use_ema), device)
        app = create_app(pipeline, cfg, videos)
        host, port = sock.getsockname()[:2]
        print(f"serving on http://{host}:{port} ({device}); open it in a browser, Ctrl+C stops", flush=True)
        run_server(app, cfg, sock)
    return 0
