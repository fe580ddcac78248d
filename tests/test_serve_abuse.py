"""An abuse run against the real server (`python -m reward_forcing.serve` on tiny random assets, loopback only):
malformed and oversized messages, websocket protocol violations, HTTP path and token tricks, many clients at
once, disconnects at every phase and protocol misuse. Every bad input must get a specific answer (an error event,
a close code or an HTTP status), the log must hold at most one line for it, and afterwards a fresh client must get
a whole stream and a working mp4. Bounded: each case is a few messages or at most two short streams."""
import base64
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager

import imageio.v3 as iio
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from reward_forcing.testing.server import serve_process

# serve.max_prompt_chars=400: a message may have 12 * 400 + 1024 = 5824 characters (reward_forcing/serve/protocol.py),
# enough for a number of 5000 digits; the websocket layer takes at most 4 * 5824 = 23296 bytes a message.
SETTINGS = ["serve.max_prompt_chars=400", "serve.max_queue=2", "serve.max_frames=30", "serve.keep_videos=4"]
MAX_MESSAGE_CHARS, MAX_MESSAGE_BYTES = 5824, 23296
WAIT_S = 60  # a guard against a hang, never a measure: each case takes a second or two
PROMPT = "a cat walks on the grass"
bad_inputs = []  # one entry per bad input sent, in order: the log may hold at most this many lines


@pytest.fixture(scope="module")
def server(tmp_path_factory, write_inference_assets):
    folder = tmp_path_factory.mktemp("abuse")
    assets = write_inference_assets(folder / "tiny")
    with open(folder / "server.log", "w+") as log, serve_process(assets, *SETTINGS, stderr=log) as url:
        host, port = url.removeprefix("http://").split(":")
        yield {"url": url, "ws": url.replace("http", "ws", 1) + "/ws", "address": (host, int(port)),
               "log": folder / "server.log"}


def bad(what):
    bad_inputs.append(what)
    return what


def log_lines(server):
    return server["log"].read_text().splitlines()


def events_until(ws, kind):
    """JSON events up to and including the first of type `kind`, and the number of frames meanwhile."""
    events, frames = [], 0
    while True:
        message = ws.recv(timeout=WAIT_S)
        if isinstance(message, bytes):
            frames += 1
            continue
        events.append(json.loads(message))
        if events[-1]["type"] == kind:
            return events, frames


@contextmanager
def hello(server):
    with connect(server["ws"], open_timeout=WAIT_S, max_size=None) as ws:
        assert json.loads(ws.recv(timeout=WAIT_S))["type"] == "hello"
        yield ws


def closed_with(ws) -> int | None:
    """The close code the server sent (reading whatever came before it)."""
    try:
        while True:
            ws.recv(timeout=WAIT_S)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None


# ---- raw sockets: what no well-behaved client library sends ----------------------------------------------------

def raw_socket(server) -> socket.socket:
    sock = socket.create_connection(server["address"], timeout=WAIT_S)
    return sock


def raw_handshake(server, path="/ws", version="13", key=None) -> tuple[socket.socket, bytes]:
    sock = raw_socket(server)
    key = key if key is not None else base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {server['address'][0]}\r\nUpgrade: websocket\r\nConnection: Upgrade"
                 f"\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n\r\n".encode())
    return sock, read_head(sock)


def read_head(sock) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def frame(opcode: int, payload: bytes, fin=True, mask=True, rsv1=False) -> bytes:
    """One websocket frame as RFC 6455 section 5.2 lays it out."""
    head = bytes([(0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode])
    size, masked = len(payload), 0x80 if mask else 0
    if size < 126:
        head += bytes([masked | size])
    elif size < 2**16:
        head += bytes([masked | 126]) + struct.pack("!H", size)
    else:
        head += bytes([masked | 127]) + struct.pack("!Q", size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def raw_close_code(sock, data: bytes) -> int | None:
    """Read server frames (unmasked, unfragmented) to its close frame: its code, or None when the socket closes
    without one."""
    while True:
        while len(data) >= 2:
            size, start = data[1] & 0x7F, 2
            if size == 126:
                size, start = struct.unpack("!H", data[2:4])[0], 4
            elif size == 127:
                size, start = struct.unpack("!Q", data[2:10])[0], 10
            if len(data) < start + size:
                break
            if data[0] & 0x0F == 0x8:
                return struct.unpack("!H", data[start:start + 2])[0] if size >= 2 else None
            data = data[start + size:]
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk


def abort(sock) -> None:
    """Close with a TCP reset: no close frame, no FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def http_status(server, request: bytes) -> int | None:
    """The status code of the answer to one raw HTTP request (None when the server closes without one)."""
    with raw_socket(server) as sock:
        sock.sendall(request)
        head = read_head(sock)
    return int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else None


def get(server, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(server["url"] + path, timeout=WAIT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


# ---- the cases ---------------------------------------------------------------------------------------------------

DIGITS = "7" * 5_000  # more digits than Python converts to an int
MALFORMED = [  # (message, fragment of its one error event)
    ("[" * 5_000, "malformed JSON: nested too deeply"),
    ('{"type": "start", "prompt": "x", "frames": ' + DIGITS + "}", "malformed JSON: a number with too many digits"),
    ('{"type": "start", "prompt": "x", "seed": -' + DIGITS + "}", "malformed JSON: a number with too many digits"),
    ('{"type": "start", "prompt": "x", "seed": "' + DIGITS + '"}', "seed must be a whole number in [0, 2^63)"),
    ("x" * (MAX_MESSAGE_CHARS + 1), f"more than the {MAX_MESSAGE_CHARS} a message may have"),
    ("", "malformed JSON"),
    ("null", 'a JSON object with a "type"'),
    ('"start"', 'a JSON object with a "type"'),
    ("{}", 'a JSON object with a "type"'),
    ('{"type": null}', 'a JSON object with a "type"'),
    ('{"type": "\\ud83d"}', "unknown message type '\\ud83d'"),
    ('{"type": "pause", "type": "dance"}', "unknown message type 'dance'"),
    ('{"type": "pause", "\\udc00": 1}', "pause: unknown field(s) '\\udc00'"),
    ('{"type": "start", "prompt": "\\ud83d"}', "start: prompt holds a lone UTF-16 surrogate"),
    ('{"type": "start", "prompt": "ok \\udc00 x"}', "start: prompt holds a lone UTF-16 surrogate '\\udc00' at char"),
    ('{"type": "start", "prompt": null}', "start: prompt must be a non-empty string"),
    ('{"type": "start", "prompt": ["x"]}', "start: prompt must be a non-empty string"),
    ('{"type": "start", "prompt": "' + "p" * 401 + '"}', "401 characters, more than serve.max_prompt_chars=400"),
    ('{"type": "start", "prompt": "x", "seed": NaN}', "got nan"),
    ('{"type": "start", "prompt": "x", "seed": Infinity}', "got inf"),
    ('{"type": "start", "prompt": "x", "seed": 1e400}', "got inf"),
    ('{"type": "start", "prompt": "x", "seed": true}', "got True"),
    ('{"type": "start", "prompt": "x", "seed": "0x10"}', "got '0x10'"),
    ('{"type": "start", "prompt": "x", "seed": " 1"}', "got ' 1'"),
    ('{"type": "start", "prompt": "x", "frames": 3.0}', "start: frames must be a positive multiple"),
    ('{"type": "start", "prompt": "x", "frames": 0}', "start: frames must be a positive multiple"),
    ('{"type": "start", "prompt": "x", "frames": "3"}', "start: frames must be a positive multiple"),
    ('{"type": "start", "prompt": "x", "frames": {"a": 1}}', "got an object"),
    ('{"type": "start", "prompt": "x", "frames": 33}', "33 latent frames is more than serve.max_frames=30"),
    ('{"type": "switch", "prompt": "x", "at_frame": -3}', "switch: at_frame must be a positive multiple"),
    (b"\x00" * 20_000, "messages must be JSON text, not binary"),
]


def test_malformed_and_oversized_messages_get_one_short_error_each(server):
    with hello(server) as ws:
        for message, fragment in MALFORMED:
            ws.send(bad(message))
            error = json.loads(ws.recv(timeout=WAIT_S))
            assert error["type"] == "error" and fragment in error["message"], (message[:80], error)
            assert len(error["message"]) < 200
        ws.send(['{"type": ', '"pa', 'use"}'])  # one message in three fragments
        assert "pause: no stream is running" in json.loads(ws.recv(timeout=WAIT_S))["message"]
        ws.send(bad('{"type": "stop"}' * 10))
        for _ in range(200):  # a burst of bad messages, read afterwards: each answered, in order
            ws.send(bad('{"type": "resume"}'))
        assert "malformed JSON: Extra data" in json.loads(ws.recv(timeout=WAIT_S))["message"]
        answers = [json.loads(ws.recv(timeout=WAIT_S))["message"] for _ in range(200)]
        assert all(a.startswith("resume: no stream is running") for a in answers)


def test_a_text_frame_of_invalid_utf8_is_closed_with_1007_and_costs_the_log_one_line(server):
    before = len(log_lines(server))
    for payload in (b"\xff", b'{"type": "start", "prompt": "\xed\xa0\xbd"}', b"\xc3"):  # a CESU surrogate; cut short
        with hello(server) as ws:
            ws.send(bad(payload), text=True)
            assert closed_with(ws) == 1007
    new = log_lines(server)[before:]
    assert len(new) <= 3 and not any("Traceback" in line for line in new), new


@pytest.mark.parametrize("data, code", [
    (frame(0x1, b'{"type": "pause"}', mask=False), 1002),  # a client's frames must be masked
    (frame(0x0, b"more"), 1002),  # a continuation with nothing to continue
    (frame(0x1, b'{"type": ', fin=False) + frame(0x1, b'"pause"}'), 1002),  # a new message inside a fragmented one
    (frame(0x3, b"x"), 1002),  # a reserved opcode
    (frame(0x9, b"p" * 126), 1002),  # a control frame longer than 125 bytes
    (frame(0x8, struct.pack("!H", 999)), 1002),  # a close code no one may send
    (frame(0x1, b"{}", rsv1=True), 1002),  # a reserved bit no extension was agreed for
    (frame(0x1, b"x" * (MAX_MESSAGE_BYTES + 1))[:16], 1009),  # longer than any valid message: refused by its header
    (b"GET / HTTP/1.1\r\n\r\n", 1002),  # not a frame: 'G' sets a reserved bit
])
def test_websocket_protocol_violations_are_closed_with_their_code(server, data, code):
    sock, head = raw_handshake(server)
    with sock:
        assert head.startswith(b"HTTP/1.1 101")
        sock.sendall(bad(data))
        received = raw_close_code(sock, head.split(b"\r\n\r\n", 1)[1])
    assert received == code


def test_http_paths_and_tokens_cannot_reach_a_file_they_should_not(server):
    with hello(server) as ws:
        ws.send(json.dumps({"type": "start", "prompt": PROMPT, "seed": 1, "frames": 3}))
        token = events_until(ws, "done")[0][-1]["video"].removeprefix("/video/").removesuffix(".mp4")
    assert get(server, f"/video/{token}.mp4")[0] == 200
    for path in ["/video/../../../../etc/passwd", "/video/..%2F..%2F..%2F..%2Fetc%2Fpasswd.mp4",
                 "/video/%2e%2e/%2e%2e/etc/passwd.mp4", f"/video/{token.upper()}.mp4", f"/video/{token}0.mp4",
                 f"/video/{token[:-1]}.mp4", f"/video/{token}.MP4", f"/video/{token}%00.mp4", "/video/.mp4",
                 f"/video//{token}.mp4", "/video/" + "0" * 32 + ".mp4", "/ws", "/nope",
                 "/page.js/..%2F..%2Fapp.py", "/static/page.js", "/%2e%2e/%2e%2e/etc/passwd"]:
        status, body = get(server, bad(path))
        assert status == 404 and b"root:" not in body, path
    raw = [  # (request, expected status)
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
        (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 20_000, 400),  # a head longer than h11 waits for (16 KiB)
        (b"\x00\x01\x02 garbage\r\n\r\n", 400),
        (b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without a Host
        (b"GET http://elsewhere/etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    ]
    for request, status in raw:
        assert http_status(server, bad(request)) == status, request[:60]
    for path, version, key, status in [("/nope", "13", None, 403), ("/ws", "8", None, 400), ("/ws", "13", "", 400)]:
        sock, head = raw_handshake(server, bad(path), version, key)
        sock.close()
        assert head.startswith(f"HTTP/1.1 {status}".encode()), (path, version, key, head[:40])
    with connect(server["ws"] + "?token=../../etc/passwd", open_timeout=WAIT_S) as ws:  # a query is ignored
        assert json.loads(ws.recv(timeout=WAIT_S))["type"] == "hello"


def test_protocol_misuse_gets_errors_and_the_stream_goes_on(server):
    with hello(server) as ws:
        for message, fragment in [({"type": "switch", "prompt": "y"}, "switch: no stream is running"),
                                  ({"type": "resume"}, "resume: no stream is running"),
                                  ({"type": "stop"}, "stop: no stream is running")]:
            ws.send(json.dumps(bad(message)))
            assert fragment in json.loads(ws.recv(timeout=WAIT_S))["message"]
        ws.send(json.dumps({"type": "start", "prompt": PROMPT, "seed": 2}))  # until stopped
        events_until(ws, "chunk")
        events_until(ws, "chunk")  # chunk [3, 6) is made
        for message, fragment in [({"type": "start", "prompt": PROMPT}, "a stream is already running"),
                                  ({"type": "switch", "prompt": "y", "at_frame": 3}, "latent frame 3 is already"),
                                  ({"type": "switch", "prompt": "y", "at_frame": 4}, "positive multiple of the chunk")]:
            ws.send(json.dumps(bad(message)))
            assert fragment in events_until(ws, "error")[0][-1]["message"]
        for message in ({"type": "pause"}, {"type": "pause"}, {"type": "resume"}, {"type": "resume"}):
            ws.send(json.dumps(message))  # pausing twice or resuming a running stream is harmless
        ws.send(json.dumps({"type": "stop"}))
        events, _ = events_until(ws, "done")
        assert events[-1]["reason"] == "stopped"
        ws.send(json.dumps({"type": "start", "prompt": PROMPT, "seed": 2, "frames": 6}))
        ws.send(json.dumps(bad({"type": "switch", "prompt": "y", "at_frame": 6})))
        error = events_until(ws, "error")[0][-1]["message"]
        assert "at_frame=6 is not before the video's end (6 latent frames)" in error
        events, _ = events_until(ws, "done")
        assert events[-1]["reason"] == "finished" and events[-1]["latent_frames"] == 6
        ws.send(json.dumps(bad({"type": "stop"})))
        assert "stop: no stream is running" in json.loads(ws.recv(timeout=WAIT_S))["message"]


def test_many_clients_at_once_are_queued_or_refused(server):
    answers, lock = [], threading.Lock()

    def client(index):
        with hello(server) as ws:
            ws.send(json.dumps({"type": "start", "prompt": PROMPT, "seed": index, "frames": 3}))
            first = json.loads(ws.recv(timeout=WAIT_S))
            if first["type"] != "error":
                first = events_until(ws, "done")[0][-1]
            with lock:
                answers.append(first)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2 * WAIT_S)
    refused = [a for a in answers if a["type"] == "error"]
    served = [a for a in answers if a["type"] == "done"]
    assert len(answers) == 16 and len(served) >= 2 and len(served) + len(refused) == 16
    assert all("the queue is full (2 streams waiting, serve.max_queue=2)" in a["message"] for a in refused)
    assert all(a["video_frames"] == 9 for a in served)
    bad_inputs.extend(refused)  # refusals are not faults, but count them as inputs the log may mention


def test_disconnects_at_every_phase_leave_the_device_free(server):
    raw_socket(server).close()  # connected, nothing sent
    with raw_socket(server) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpg")  # half a request
    sock, _ = raw_handshake(server)
    abort(sock)  # right after the handshake, with a reset
    start = json.dumps({"type": "start", "prompt": PROMPT, "seed": 3})  # until stopped

    with hello(server) as holder:  # holds the device while others queue behind it and leave
        holder.send(start)
        events_until(holder, "chunk")
        for leave in ("after hello", "right after start", "while queued"):
            with hello(server) as ws:
                if leave != "after hello":
                    ws.send(start)
                if leave == "while queued":
                    assert json.loads(ws.recv(timeout=WAIT_S))["type"] == "queued"
        holder.send(json.dumps({"type": "pause"}))
        events_until(holder, "paused")
    # the holder left while paused

    for phase in ("first chunk", "mid-frames", "switch sent", "stop sent"):
        sock, head = raw_handshake(server)
        sock.sendall(frame(0x1, start.encode()))
        seen = head
        while b'"type":"chunk"' not in seen:
            received = sock.recv(65536)
            assert received, f"the server closed the connection ({phase})"
            seen += received
        if phase == "switch sent":
            sock.sendall(frame(0x1, b'{"type": "switch", "prompt": "waves"}'))
        if phase == "stop sent":
            sock.sendall(frame(0x1, b'{"type": "stop"}'))
        if phase == "mid-frames":
            sock.shutdown(socket.SHUT_WR)  # half-closed: the server reads EOF while it still sends
            sock.recv(100)
        abort(sock)
    with hello(server) as ws:  # after done, with a proper close
        ws.send(json.dumps({"type": "start", "prompt": PROMPT, "seed": 4, "frames": 3}))
        events_until(ws, "done")


def test_a_switch_to_a_prompt_with_a_lone_surrogate_is_refused_and_the_stream_goes_on(server):
    with hello(server) as ws:
        ws.send(json.dumps({"type": "start", "prompt": PROMPT, "seed": 6}))  # until stopped
        events_until(ws, "chunk")
        ws.send(bad('{"type": "switch", "prompt": "a fox \\ud83d leaps"}'))
        events, _ = events_until(ws, "error")
        assert "switch: prompt holds a lone UTF-16 surrogate '\\ud83d' at character 6" in events[-1]["message"]
        ws.send(json.dumps({"type": "stop"}))
        events, _ = events_until(ws, "done")
    assert events[-1]["reason"] == "stopped" and events[-1]["video_frames"] >= 9


# ---- clients that read slowly or not at all: at the released model's frame size ----------------------------------

@contextmanager
def noise_server(tmp_path, *overrides):
    """reward_forcing/testing/noise_server.py (this server's app over large frames of noise) in its own process. glibc's
    dynamic mmap threshold is pinned, so that freed frames leave its resident memory and RSS counts what is held."""
    log = tmp_path / "noise_server.log"
    with open(log, "w") as stderr:
        server = subprocess.Popen([sys.executable, "-m", "reward_forcing.testing.noise_server", *overrides], stdout=subprocess.PIPE, stderr=stderr, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"})
    try:
        url = server.stdout.readline().split()[2]
        host, port = url.removeprefix("http://").split(":")
        yield {"url": url, "ws": url.replace("http", "ws", 1) + "/ws", "address": (host, int(port)),
               "pid": server.pid, "log": log}
    finally:
        server.terminate()
        server.wait(30)


def rss_bytes(pid) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


@contextmanager
def never_reading_client(server, start: dict):
    """A websocket client that sends `start` and then reads nothing until the test does: the client library stops
    taking data off the socket once it holds one message (max_queue=1), the socket's receive window is 4 KB, and
    the library sends no pings of its own (unanswered, they would make it close the connection itself)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(server["address"])
    with connect(server["ws"], sock=sock, max_queue=1, max_size=None, open_timeout=WAIT_S, ping_interval=None) as ws:
        ws.send(json.dumps(start))
        yield ws


def dropped(events) -> int:
    return sum(e["video_frames"] for e in events if e["type"] == "dropped")


def test_a_client_that_never_reads_large_frames_costs_the_server_its_limit_not_the_stream(tmp_path):
    # 45 latent frames are 177 video frames of ~350 KB: ~63 MB, where serve.max_unsent_mib is 8
    with noise_server(tmp_path, "serve.max_unsent_mib=8", "serve.stall_timeout_s=600") as server:
        with hello(server) as ws:  # a stream read first: what generating and sending one costs
            ws.send(json.dumps({"type": "start", "prompt": PROMPT, "seed": 1, "frames": 6}))
            events_until(ws, "done")
        baseline = rss_bytes(server["pid"])
        never = {"type": "start", "prompt": PROMPT, "seed": 2, "frames": 45}
        with never_reading_client(server, never) as ws, hello(server) as second:
            second.send(json.dumps({"type": "start", "prompt": PROMPT, "seed": 3, "frames": 3}))
            events_until(second, "done")  # the device is done with the never-read stream (and this one)
            growth_mib = (rss_bytes(server["pid"]) - baseline) / 2**20
            events, frames = events_until(ws, "done")  # now read what the server kept for it
    assert growth_mib < 8 + 4, f"the server holds {growth_mib:.0f} MiB more for a client that does not read"
    assert events[-1]["video_frames"] == 177 and dropped(events) > 100 and frames + dropped(events) == 177


def test_a_client_that_stopped_reading_is_let_go_and_the_device_freed(tmp_path):
    with noise_server(tmp_path, "serve.max_unsent_mib=8", "serve.stall_timeout_s=1") as server:
        never = {"type": "start", "prompt": PROMPT, "seed": 2}  # until stopped
        with never_reading_client(server, never), hello(server) as second:
            second.send(json.dumps({"type": "start", "prompt": PROMPT, "seed": 3, "frames": 3}))
            events, frames = events_until(second, "done")
        lines = server["log"].read_text().splitlines()
    assert events[-1]["video_frames"] == 9 == frames + dropped(events)
    assert len(lines) == 1 and lines[0].startswith("WARNING:  127.0.0.1:") and lines[0].endswith(
        "stopped reading (took no message for 1 s (serve.stall_timeout_s)): its stream is stopped"), lines


def test_after_the_abuse_a_fresh_client_gets_a_whole_stream_and_the_log_one_line_per_bad_input_at_most(server):
    with hello(server) as ws:
        ws.send(json.dumps({"type": "start", "prompt": PROMPT, "seed": 5, "frames": 6}))
        events, frames = events_until(ws, "done")
    assert [e["type"] for e in events] == ["queued", "started", "chunk", "chunk", "done"]
    assert frames == events[-1]["video_frames"] == 21 and events[-1]["reason"] == "finished"
    status, mp4 = get(server, events[-1]["video"])
    assert status == 200 and iio.imread(mp4, extension=".mp4", plugin="FFMPEG").shape == (21, 16, 32, 3)
    lines = log_lines(server)
    assert len(lines) <= len(bad_inputs), lines
    # and each line is about a bad input: nothing failed inside the server
    assert all(line.startswith(("WARNING:  Invalid HTTP request received.",
                                "ERROR:    Invalid UTF-8 sequence received from client. (UnicodeDecodeError: "))
               for line in lines), lines
