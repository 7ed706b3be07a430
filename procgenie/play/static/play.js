// procgenie play: draw the frames the server sends, send the keys held. Protocol: procgenie/play/server.py.
"use strict";

const $ = (id) => document.getElementById(id);
// Held keys are state: the server reads the latest at each frame, so nothing queues up.
const DIRS = { ArrowLeft: "left", KeyA: "left", ArrowRight: "right", KeyD: "right",
               ArrowUp: "up", KeyW: "up", Space: "up", ArrowDown: "down", KeyS: "down" };
const ONCE = { KeyR: { type: "reset" }, KeyP: { type: "pause" }, KeyE: { type: "step" }, KeyG: { type: "record" } };
const KIND_FRAME = 1, KIND_GIF = 2;
let ws = null, hello = null, size = 64, latent = null, gifUrl = null, closing = null;
const held = new Set();
const arrivals = [];  // when frames arrived over the last second: the fps the header shows

function setStatus(text) { $("status").textContent = text; }
function send(obj) { if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj)); }

function connect() {
  ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => setStatus("");
  // A server that refuses or ends a connection says why first ("closing"): show that, not a bare disconnect.
  ws.onclose = () => setStatus(closing ? `${closing} (reload the page to try again)`
    : "disconnected: reload the page to play again");
  ws.onmessage = (ev) => (typeof ev.data === "string" ? onText(JSON.parse(ev.data)) : onBinary(ev.data));
}

function onText(msg) {
  if (msg.type === "hello") onHello(msg);
  else if (msg.type === "state") showState(msg);
  else if (msg.type === "error") { setStatus(msg.message); if (msg.closing) closing = msg.message; }
}

function onHello(msg) {
  hello = msg;
  size = msg.size;
  for (const id of ["dream", "real"]) { $(id).width = size; $(id).height = size; }
  // What number keys do, as the server says: latent actions on a latent model, none on a real-action one.
  const labels = msg.number_keys;
  $("kmax").textContent = labels.length;
  $("numrow").style.display = labels.length ? "" : "none";
  $("latents").innerHTML = "";
  const recordings = msg.world === "recordings";  // learned from videos without actions: number keys only
  labels.forEach((label, k) => {
    const li = document.createElement("li");
    li.textContent = `key ${k + 1}: ${label}`;
    $("latents").appendChild(li);
  });
  if (recordings) {
    $("realcap").textContent = `the ${msg.name} recording it started from, replayed (keys do not change it)`;
    $("controls-note").textContent = msg.controls;
    $("keytable").style.display = "none";
    $("idle-note").textContent = "";
  }
}

// Binary: kind (uint8), meta length (uint32 BE), meta JSON, payload.
function onBinary(buf) {
  const view = new DataView(buf);
  const kind = view.getUint8(0), n = view.getUint32(1);
  const meta = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 5, n)));
  const body = new Uint8Array(buf, 5 + n);
  if (kind === KIND_FRAME) {
    const px = size * size * 3;
    draw("dream", body.subarray(0, px));
    draw("real", body.subarray(px, 2 * px));
    showState(meta);
    $("action").textContent = meta.latent === null ? meta.action
      : hello && hello.world === "recordings" ? `latent ${meta.latent}${meta.source === "idle" ? " (no key held)" : ""}`
      : meta.source === "latent" ? `latent ${meta.latent} (real: ${meta.action})` : `${meta.action} (latent ${meta.latent})`;
    $("ms").textContent = meta.model_ms.toFixed(0);
    $("batch").textContent = meta.batch > 1 ? ` (${meta.batch} players)` : "";
    $("queue").textContent = meta.queue_ms.toFixed(0);
    arrivals.push(performance.now());
    showFps();
  } else if (kind === KIND_GIF) {
    offerGif(body, meta);
  }
}

function showFps() {  // frames that arrived over the last second (paused: it falls to 0)
  const now = performance.now();
  while (arrivals.length && now - arrivals[0] > 1000) arrivals.shift();
  $("fps").textContent = arrivals.length;
}
setInterval(showFps, 250);

function draw(id, rgb) {  // rgb: (size, size, 3) bytes -> the 64x64 canvas; CSS scales it up, pixelated
  const ctx = $(id).getContext("2d");
  const img = ctx.createImageData(size, size);
  for (let i = 0, j = 0; i < rgb.length; i += 3, j += 4) {
    img.data[j] = rgb[i]; img.data[j + 1] = rgb[i + 1]; img.data[j + 2] = rgb[i + 2]; img.data[j + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

function showState(s) {
  $("step").textContent = s.step;
  $("level").textContent = s.level;
  let flags = "";
  if (s.paused) flags += '<span class="flag paused">paused (E steps)</span>';
  if (s.recording !== null) flags += `<span class="flag rec">REC ${s.recording}</span>`;
  if (s.episodes) flags += `<span class="flag done">${hello && hello.world === "recordings" ? "recording"
    : "real episode"} ended ${s.episodes}x, restarted</span>`;
  $("flags").innerHTML = flags;
}

function offerGif(bytes, meta) {
  if (gifUrl) URL.revokeObjectURL(gifUrl);
  gifUrl = URL.createObjectURL(new Blob([bytes], { type: "image/gif" }));
  $("download").innerHTML = "";
  const a = document.createElement("a");
  a.href = gifUrl; a.download = meta.name; a.id = "gif";
  a.textContent = `save the recording: ${meta.name} (${meta.frames} frames, ${(bytes.length / 1024).toFixed(0)} KiB)`;
  $("download").appendChild(a);
}

function sendInput() {
  const dirs = { left: false, right: false, up: false, down: false };
  for (const code of held) dirs[DIRS[code]] = true;
  send({ type: "input", ...dirs, latent });
}

document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const digit = /^Digit([1-9])$/.exec(e.code);
  if (DIRS[e.code]) {
    e.preventDefault();  // arrows and space would scroll the page
    if (!held.has(e.code)) { held.add(e.code); sendInput(); }
  } else if (digit && hello && +digit[1] <= hello.number_keys.length) {
    if (latent !== +digit[1] - 1) { latent = +digit[1] - 1; sendInput(); }
  } else if (ONCE[e.code] && !e.repeat) {
    send(ONCE[e.code]);
  }
});

document.addEventListener("keyup", (e) => {
  const digit = /^Digit([1-9])$/.exec(e.code);
  if (held.delete(e.code)) sendInput();
  else if (digit && latent === +digit[1] - 1) { latent = null; sendInput(); }
});

// Keys released while the page had no focus would stay held: let go of everything.
window.addEventListener("blur", () => { held.clear(); latent = null; sendInput(); });
// A hidden tab stops playing, so the model does not run for nobody.
document.addEventListener("visibilitychange", () => { if (document.hidden) send({ type: "pause", paused: true }); });

connect();
