"""The web app: the page, the websocket that streams video chunks, and finished videos as mp4.

One StreamRunner per device behind a DeviceWorker queue; each websocket is a Session that holds at most one
stream at a time, and its last one, which a start may continue. Pictures to start from are uploaded by HTTP
(POST /picture) and named in the start message by token. A bad message gets one error event and the connection
carries on. Each connection runs two tasks, one reading the client's messages and one sending it events through its Outbox; when either ends, for
whatever reason, the connection's stream is stopped and the device freed, and a failure is told to the client
(an error event) and to the log (one line).
"""
import asyncio
import secrets
from contextlib import asynccontextmanager, suppress
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.websockets import WebSocketDisconnect

from reward_forcing.inference.conditioning import Conditioning, ConditioningError
from reward_forcing.serve.log import LOG, one_line
from reward_forcing.serve.outbox import ClientStalled, Outbox
from reward_forcing.serve.pictures import PictureStore
from reward_forcing.serve.protocol import MAX_SEED, Control, Limits, ProtocolError, Start, parse_message
from reward_forcing.serve.stream import Stream, StreamRunner, encoded
from reward_forcing.serve.videos import VideoStore
from reward_forcing.serve.worker import DeviceWorker

STATIC = Path(__file__).with_name("static")
PAGE_FILES = {"/": ("index.html", "text/html"), "/page.js": ("page.js", "text/javascript"),
              "/page.css": ("page.css", "text/css")}


class Session:
    """One websocket: parses its messages and drives its current stream."""

    def __init__(self, worker: DeviceWorker, limits: Limits, emit, pictures: PictureStore):
        self.worker = worker
        self.limits = limits
        self.emit = emit
        self.pictures = pictures
        self.stream = None

    @property
    def busy(self) -> bool:
        return self.stream is not None and not self.stream.finished.is_set()

    def handle(self, text) -> None:
        try:
            self._dispatch(parse_message(text, self.limits))
        except ProtocolError as err:
            self.emit({"type": "error", "message": str(err)})

    def _dispatch(self, message) -> None:
        if isinstance(message, Start):
            if self.busy:
                raise ProtocolError("start: a stream is already running on this connection; stop it first")
            seed = message.seed if message.seed is not None else secrets.randbelow(MAX_SEED + 1)
            stream = Stream(message, seed, self.emit, self._picture(message), self._prefix(message))
            self.worker.submit(stream)
            self.stream = stream
            return
        kind = message.action if isinstance(message, Control) else "switch"
        if not self.busy:
            raise ProtocolError(f"{kind}: no stream is running on this connection; send start first")
        if kind == "switch":
            self.stream.request_switch(message.prompt, message.at_frame)
        else:
            getattr(self.stream, kind)()

    def _picture(self, message: Start):
        if message.picture is None:
            return None
        picture = self.pictures.get(message.picture)
        if picture is None:
            raise ProtocolError("start: no such picture (uploaded pictures are kept for a while only); upload it "
                                "again")
        return picture

    def _prefix(self, message: Start):
        if not message.continues:
            return None
        if self.stream is None:
            raise ProtocolError("start: nothing to continue: this connection has made no video yet")
        if self.stream.latents is None:
            raise ProtocolError(f"start: the last video cannot be continued (longer than serve.max_frames="
                                f"{self.limits.max_frames} latent frames, or it failed)")
        return self.stream.latents

    def close(self) -> None:
        """The connection is over: a waiting stream leaves the queue, a running one stops at its next chunk."""
        if self.busy:
            self.worker.withdraw(self.stream)
            self.stream.cancel()


async def _receive_messages(websocket: WebSocket, session: Session) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        session.handle(message.get("text") if message.get("text") is not None else message.get("bytes"))


async def _send_events(websocket: WebSocket, outbox: Outbox, stall_s: float) -> None:
    while True:
        message = await outbox.get()
        send = websocket.send_bytes(message) if isinstance(message, bytes) else websocket.send_text(message)
        try:
            await asyncio.wait_for(send, stall_s)
        except asyncio.TimeoutError:
            raise ClientStalled(f"took no message for {stall_s:g} s (serve.stall_timeout_s)") from None
        except RuntimeError:  # the websocket layer has closed the connection (a protocol violation): the client is gone
            return


async def _report(websocket: WebSocket, failure: BaseException, stall_s: float) -> None:
    """One log line for a connection that ended by `failure`, and an error event if the client still reads."""
    client = "{}:{}".format(*websocket.client) if websocket.client else "a client"
    if isinstance(failure, ClientStalled):
        LOG.warning("%s stopped reading (%s): its stream is stopped", client, failure)
        return
    LOG.error("%s: its stream is stopped by an internal error: %s", client, one_line(failure))
    with suppress(Exception):
        await asyncio.wait_for(websocket.send_json({"type": "error", "ends_stream": True, "message":
                                                    f"internal error ({type(failure).__name__}); the stream is "
                                                    "stopped"}), stall_s)
        await asyncio.wait_for(websocket.close(1011), stall_s)


def create_app(pipeline, cfg, video_folder) -> FastAPI:
    """The app for one loaded VideoPipeline; finished videos are kept under `video_folder`."""
    serve = cfg.serve
    limits = Limits(int(serve.max_prompt_chars), int(serve.max_frames), int(cfg.num_frame_per_block))
    runner = StreamRunner(pipeline, cfg, VideoStore(video_folder, int(serve.keep_videos)))
    pictures, fitting = PictureStore(int(serve.keep_images)), Conditioning.from_config(cfg)
    image_types, max_image_bytes = tuple(str(kind) for kind in serve.image_types), int(serve.max_image_bytes)
    worker = DeviceWorker(runner.run, int(serve.max_queue))
    max_unsent_bytes, stall_s = int(serve.max_unsent_mib) * 2**20, float(serve.stall_timeout_s)
    hello = {"type": "hello", "chunk_latent_frames": limits.chunk_frames, "fps": int(cfg.fps),
             "height": int(cfg.height), "width": int(cfg.width), "max_prompt_chars": limits.max_prompt_chars,
             "max_latent_frames": limits.max_frames,
             "decoder": str(cfg.decoder), "overlap_decode": bool(cfg.overlap_decode),
             "switch_sink": str(cfg.switch_sink), "max_image_bytes": max_image_bytes, "image_types": image_types}
    pages = {route: ((STATIC / name).read_bytes(), media) for route, (name, media) in PAGE_FILES.items()}

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        await asyncio.to_thread(worker.close)

    app = FastAPI(title="reward-forcing stream", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.runner, app.state.pictures = worker, runner, pictures
    app.state.video_folder = Path(video_folder)

    def page(route):
        body, media = pages[route]
        return lambda: Response(body, media_type=media)

    for route in pages:
        app.get(route, response_class=HTMLResponse if route == "/" else Response)(page(route))

    @app.get("/video/{token}.mp4")
    def video(token: str):
        path = runner.store.path(token)
        if path is None or not path.is_file():
            return JSONResponse({"error": "no such video (finished videos are kept for a while only)"}, 404)
        return FileResponse(path, media_type="video/mp4", filename=f"reward-forcing-{token[:8]}.mp4")

    @app.post("/picture")
    async def upload_picture(request: Request):
        """The body is a picture file: refused unread beyond max_image_bytes, then checked and fitted as
        inference.py fits one (off the event loop)."""
        too_large = JSONResponse({"error": f"the picture is larger than serve.max_image_bytes={max_image_bytes}"},
                                 413)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_image_bytes:
            return too_large
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > max_image_bytes:
                return too_large
        try:
            picture = await asyncio.to_thread(fitting.read_image, bytes(body), image_types)
        except ConditioningError as err:
            return JSONResponse({"error": str(err)}, 400)
        token = pictures.add(picture)
        return {"picture": token, "width": fitting.width, "height": fitting.height,
                "preview": f"/picture/{token}.png"}

    @app.get("/picture/{token}.png")
    def picture_preview(token: str):
        picture = pictures.get(token)
        if picture is None:
            return JSONResponse({"error": "no such picture (uploaded pictures are kept for a while only)"}, 404)
        return Response(encoded(picture, "PNG"), media_type="image/png")

    @app.websocket("/ws")
    async def stream_socket(websocket: WebSocket):
        await websocket.accept()
        loop = asyncio.get_running_loop()
        outbox = Outbox(max_unsent_bytes)

        def emit(event):  # from any thread
            try:
                loop.call_soon_threadsafe(outbox.put, event)
            except RuntimeError:  # the loop has closed: the client is gone anyway
                pass

        session = Session(worker, limits, emit, pictures)
        outbox.put(hello)
        tasks = {asyncio.create_task(_receive_messages(websocket, session)),
                 asyncio.create_task(_send_events(websocket, outbox, stall_s))}
        for task in tasks:  # one that fails after the connection ended has no one to tell: asyncio must not log it
            task.add_done_callback(lambda task: task.cancelled() or task.exception())
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            session.close()
            for task in tasks:
                task.cancel()
        failure = next((task.exception() for task in done if task.exception() is not None), None)
        if failure is not None and not isinstance(failure, WebSocketDisconnect):
            await _report(websocket, failure, stall_s)

    return app
