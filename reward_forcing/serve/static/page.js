// The streaming page: one websocket (protocol in reward_forcing/serve/protocol.py); video frames arrive as JPEG
// messages after each chunk event and are played on the canvas at the video's frame rate. Counts say their unit:
// the server works in latent frames (a chunk is a few), the canvas shows video frames. Seeds stay strings: they
// reach 2^63, and JavaScript numbers round above 2^53. A picture to start from is uploaded first (POST /picture,
// which fits it to the video's size) and shown on the canvas; its token goes in the start message. After Stop or
// its end, a video may be continued: a start with "continue" goes on from it (the canvas keeps playing).
"use strict";

const $ = (id) => document.getElementById(id);
const view = $("view");
const ctx = view.getContext("2d");

const state = {
  socket: null, hello: null, streaming: false, paused: false,
  pending: [],        // decoded frames waiting for their turn on the canvas
  started: false, shown: 0, received: 0, dropped: 0, arrivals: [], chunkTimes: [], startClicked: 0, firstFrame: false,
  timer: null,
  picture: null,      // the uploaded picture's token
  continuable: false, // the last video may be continued
};

function setState(name, text) {
  document.body.dataset.state = name;
  $("status").textContent = text || name;
}

function say(text, isError) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

function buttons() {
  const connected = state.socket && state.socket.readyState === WebSocket.OPEN;
  $("start").disabled = !connected || state.streaming;
  $("continue").disabled = !connected || state.streaming || !state.continuable;
  $("picture").disabled = !connected || state.streaming;
  $("clear-picture").disabled = state.streaming || !state.picture;
  $("pause").disabled = !state.streaming;
  $("stop").disabled = !state.streaming;
  $("switch").disabled = !state.streaming;
  $("pause").textContent = state.paused ? "Resume" : "Pause";
  $("frames").disabled = $("endless").checked;
}

function send(message) {
  state.socket.send(JSON.stringify(message));
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted.length ? sorted[Math.floor((sorted.length - 1) / 2)] : 0;
}

function updateFps(frames) {
  // frames arrive a chunk at a time: the rate is the frames of the last chunks over the time they took
  state.arrivals.push({ time: performance.now(), frames });
  state.arrivals = state.arrivals.slice(-9);
  const [first, last] = [state.arrivals[0], state.arrivals[state.arrivals.length - 1]];
  const framesAfter = state.arrivals.slice(1).reduce((sum, a) => sum + a.frames, 0);
  $("fps").textContent = last.time > first.time ? (framesAfter / ((last.time - first.time) / 1000)).toFixed(1) : "–";
}

function draw() {
  const frame = state.pending.shift();
  if (!frame) return;
  ctx.drawImage(frame, 0, 0, view.width, view.height);
  frame.close();
  state.shown += 1;
  $("frames-shown").textContent = String(state.shown);
  if (!state.firstFrame) {
    state.firstFrame = true;
    $("ttff").textContent = ((performance.now() - state.startClicked) / 1000).toFixed(2) + " s";
  }
}

function startPlayback(fps) {
  clearInterval(state.timer);
  state.timer = setInterval(draw, 1000 / fps);
}

async function onFrame(blob) {
  state.received += 1;
  state.pending.push(await createImageBitmap(blob));
}

const handlers = {
  hello(event) {
    state.hello = event;
    view.width = event.width;
    view.height = event.height;
    $("model-info").textContent = `${event.width}×${event.height} at ${event.fps} fps · ` +
      `${event.chunk_latent_frames} latent frames per chunk · decoder ${event.decoder} · ` +
      `sink on switch: ${event.switch_sink}`;
    $("frames").step = event.chunk_latent_frames;
    $("frames").min = event.chunk_latent_frames;
    $("frames").max = event.max_latent_frames;
    $("prompt").maxLength = event.max_prompt_chars;
    $("picture").accept = event.image_types.map((kind) => `image/${kind}`).join(",");
    $("picture-limits").textContent = `(${event.image_types.join(", ")}; up to ` +
      `${(event.max_image_bytes / 2 ** 20).toFixed(0)} MiB; cropped to ${event.width}×${event.height})`;
    $("switch-prompt").maxLength = event.max_prompt_chars;
    startPlayback(event.fps);
    setState("idle");
  },
  queued(event) {
    $("queue").textContent = String(event.position);
    setState("queued", event.busy ? `waiting (#${event.position})` : "starting");
  },
  started(event) {
    state.started = true;
    $("queue").textContent = "–";
    $("seed-used").textContent = event.seed;  // a string of digits, shown as sent
    setState("streaming");
  },
  chunk(event) {
    updateFps(event.video_frames);
    state.chunkTimes.push(event.generate_s);
    $("chunk").textContent = `${(median(state.chunkTimes) * 1000).toFixed(0)} ms`;
  },
  switched(event) {
    $("current-prompt").textContent = `Now: ${event.prompt}`;
    say(`switched at latent frame ${event.start_latent_frame}`);
    document.body.dataset.switches = String(Number(document.body.dataset.switches || 0) + 1);
  },
  paused(event) {
    state.paused = true;
    setState("paused", `paused · goes on at latent frame ${event.latent_frame}`);
    buttons();
  },
  resumed(event) { state.paused = false; setState("streaming"); buttons(); },
  dropped(event) {
    state.dropped += event.video_frames;
    say(`${state.dropped} video frames not shown: this connection is slower than the stream (the mp4 has them all)`,
      true);
  },
  done(event) {
    state.streaming = false;
    state.paused = false;
    state.continuable = event.continuable;
    const link = $("download");
    link.href = event.video;
    link.classList.remove("disabled");
    link.setAttribute("aria-disabled", "false");
    link.setAttribute("download", "");
    setState("done", `${event.reason} · ${event.video_frames} video frames (${event.latent_frames} latent frames)`);
    buttons();
  },
  error(event) {
    say(event.message, true);
    if (state.streaming && (!state.started || event.ends_stream)) {
      state.streaming = false;
      setState("error");
    }
    buttons();
  },
};

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}/ws`);
  socket.binaryType = "blob";
  state.socket = socket;
  socket.onopen = buttons;
  socket.onmessage = (message) => {
    if (typeof message.data !== "string") {
      onFrame(message.data);
      return;
    }
    const event = JSON.parse(message.data);
    if (handlers[event.type]) handlers[event.type](event);
  };
  socket.onclose = () => {
    state.streaming = false;
    setState("disconnected");
    say("connection lost — reload the page to reconnect", true);
    buttons();
  };
}

function start(continues) {
  const message = { type: "start", prompt: $("prompt").value };
  const seed = $("seed").value.trim();
  if (seed !== "") message.seed = seed;  // the server checks it: digits, below 2^63
  if (!$("endless").checked) message.frames = Number($("frames").value);
  if (continues) message.continue = true;
  else if (state.picture) message.picture = state.picture;
  state.streaming = true;
  state.continuable = false;
  state.started = false;
  state.paused = false;
  state.firstFrame = false;
  state.dropped = 0;
  state.chunkTimes = [];
  state.arrivals = [];
  state.startClicked = performance.now();
  $("current-prompt").textContent = `Now: ${$("prompt").value.trim()}`;
  $("seed-used").textContent = "…";
  $("download").classList.add("disabled");
  $("ttff").textContent = "…";
  say("");
  setState("queued", "sent");
  send(message);
  buttons();
}

function clearPicture() {
  state.picture = null;
  $("picture").value = "";
  delete document.body.dataset.picture;
  buttons();
}

async function uploadPicture() {
  const file = $("picture").files[0];
  if (!file) return;
  if (file.size > state.hello.max_image_bytes) {
    say(`the picture has ${file.size} bytes, more than the server takes (${state.hello.max_image_bytes})`, true);
    clearPicture();
    return;
  }
  say("uploading the picture…");
  const response = await fetch("/picture", { method: "POST", body: file });
  const reply = await response.json();
  if (!response.ok) {
    say(reply.error, true);
    clearPicture();
    return;
  }
  const preview = new Image();
  preview.src = reply.preview;  // the picture as the model gets it: centred crop, resized
  await preview.decode();
  state.pending.forEach((frame) => frame.close());
  state.pending = [];
  ctx.drawImage(preview, 0, 0, view.width, view.height);
  state.picture = reply.picture;
  state.continuable = false;
  document.body.dataset.picture = "shown";
  say("the next video starts from this picture (frame 0)");
  buttons();
}

$("start").onclick = () => start(false);
$("continue").onclick = () => start(true);
$("picture").onchange = uploadPicture;
$("clear-picture").onclick = clearPicture;
$("pause").onclick = () => send({ type: state.paused ? "resume" : "pause" });
$("stop").onclick = () => send({ type: "stop" });
$("switch").onclick = () => {
  send({ type: "switch", prompt: $("switch-prompt").value });
  say("switching at the next chunk…");
};
$("endless").onchange = buttons;

connect();
buttons();
