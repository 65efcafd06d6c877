// The prompt page: posts the form to /api/generate and draws every step it streams back
// (server-sent events, read from fetch so that the request can be a JSON POST). See serve.py for the API.
"use strict";

const SIZE = 28; // pixels per digit, as the model makes them
const SCALE = 4; // canvas pixels per digit pixel
const GAP = 4; // canvas pixels between digits and around the grid
const MAX_COLUMNS = 8;
const NUMBER_FIELDS = ["guidance_scale", "steps", "seed", "num_samples"];

const $ = (id) => document.getElementById(id);
const form = $("form");
const canvas = $("grid");

// The grid of digits: its layout, the latest x_t and x0 of every digit, and drawing them.
const grid = {
  count: 0,
  columns: 1,
  frames: { x_t: null, x0: null },

  reset(count) {
    this.count = count;
    this.columns = Math.min(count, MAX_COLUMNS);
    this.frames = { x_t: null, x0: null };
    const rows = Math.ceil(count / this.columns);
    canvas.width = GAP + this.columns * (SIZE * SCALE + GAP);
    canvas.height = GAP + rows * (SIZE * SCALE + GAP);
    Object.assign(canvas.dataset, { frames: "0", columns: this.columns, scale: SCALE, gap: GAP });
    this.draw();
  },

  set(x_t, x0) {
    this.frames = { x_t, x0 };
    this.draw();
  },

  view() {
    return document.querySelector('input[name="view"]:checked').value;
  },

  // Each digit at SCALE x SCALE pixels per model pixel, grey levels exact (so the PNG holds the model's output).
  draw() {
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#151922";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    const pixels = this.frames[this.view()];
    const side = SIZE * SCALE;
    const tile = ctx.createImageData(side, side);
    for (let k = 0; k < this.count; k++) {
      const x = GAP + (k % this.columns) * (side + GAP);
      const y = GAP + Math.floor(k / this.columns) * (side + GAP);
      if (!pixels) {
        ctx.fillStyle = "#0b0d12";
        ctx.fillRect(x, y, side, side);
        continue;
      }
      paintTile(tile.data, pixels.subarray(k * SIZE * SIZE, (k + 1) * SIZE * SIZE));
      ctx.putImageData(tile, x, y);
    }
  },
};

function paintTile(rgba, digit) {
  const side = SIZE * SCALE;
  for (let py = 0; py < side; py++) {
    const row = Math.floor(py / SCALE) * SIZE;
    for (let px = 0; px < side; px++) {
      const v = digit[row + Math.floor(px / SCALE)];
      const o = (py * side + px) * 4;
      rgba[o] = rgba[o + 1] = rgba[o + 2] = v;
      rgba[o + 3] = 255;
    }
  }
}

function decodeImages(base64) {
  const text = atob(base64);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  return bytes;
}

// (event, data) pairs of a server-sent event stream, read from a fetch response.
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield [event, JSON.parse(data.join("\n"))];
    }
  }
}

function formBody() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    sampler: $("sampler").value,
    allow_truncation: $("allow_truncation").checked,
  };
  for (const name of NUMBER_FIELDS) {
    const text = $(name).value.trim();
    body[name] = text === "" ? null : Number(text); // the server says what is wrong with it
  }
  return body;
}

function showError(message, field) {
  $("error").textContent = message;
  $("error").hidden = false;
  if (field && $(field)) $(field).setAttribute("aria-invalid", "true");
}

function clearError() {
  $("error").hidden = true;
  form.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
}

function setStatus(text, state, progress) {
  $("status").textContent = text;
  if (state) canvas.dataset.state = state;
  if (progress !== undefined) $("bar").style.width = `${Math.round(progress * 100)}%`;
}

function setDownload(body) {
  const link = $("download");
  if (!body) {
    link.removeAttribute("href");
    link.classList.add("disabled");
    link.setAttribute("aria-disabled", "true");
    return;
  }
  const slug = body.prompt.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "") || "prompt";
  link.href = canvas.toDataURL("image/png");
  link.download = `text2digit_${slug.slice(0, 40)}_seed${body.seed}.png`;
  link.classList.remove("disabled");
  link.removeAttribute("aria-disabled");
}

let running = null; // the AbortController of the request being streamed
let maxDigits = 64; // from /api/config
let sketchSteps = null; // the fast model's steps, from /api/config (null: no fast model)
let sketching = null; // the AbortController of the sketch in flight
let sketchTimer = null; // the pending keystroke's sketch
let sketchDelay = 10; // ms: keystrokes closer than this make one sketch (from /api/config)
let sketchNegative = false; // whether the fast model reads the negative prompt (from /api/config)

function handle(event, data, body, started) {
  const seconds = ((performance.now() - started) / 1000).toFixed(2);
  if (event === "queued" && data.ahead > 0) {
    setStatus(`queued behind ${data.ahead} request${data.ahead > 1 ? "s" : ""}…`, "queued", 0);
  } else if (event === "start") {
    setStatus("denoising…", "running", 0);
  } else if (event === "frame") {
    grid.set(decodeImages(data.x_t), decodeImages(data.x0));
    const frames = Number(canvas.dataset.frames) + 1;
    canvas.dataset.frames = String(frames);
    setStatus(`step ${frames} / ${body.steps} · t = ${data.t} · ${seconds} s`, "running", frames / body.steps);
  } else if (event === "done") {
    const digits = decodeImages(data.images);
    grid.set(digits, digits); // sampling ends at x_0: both views show the result
    setDownload(body);
    setStatus(`${body.num_samples} digits in ${body.steps} steps · ${data.seconds} s sampling, ${seconds} s in all`, "done", 1);
  } else if (event === "error") {
    showError(data.error);
    setStatus("failed", "error");
  }
}

function post(path, body, signal) {
  return fetch(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal });
}

// The server's one-line refusal {error, field} of a request it did not take.
function refusalOf(response) {
  return response.json().catch(() => ({ error: `the server answered ${response.status}` }));
}

// While the prompt is typed, the fast model draws the grid: one request per pause in the typing, the one
// before it cancelled. A prompt it refuses (no digit named yet) only says why in the status line.
function scheduleSketch() {
  clearTimeout(sketchTimer);
  sketching?.abort(); // whatever it draws is stale now, even when the prompt is erased
  if (sketchSteps === null || !$("as_you_type").checked || running || !$("prompt").value.trim()) return;
  // the fast model samples its own way: the prompt, negative prompt (if it reads one), scale, seed and count go
  const negative = sketchNegative ? $("negative_prompt").value : undefined;
  const body = { ...formBody(), sampler: undefined, negative_prompt: negative, steps: sketchSteps };
  sketchTimer = setTimeout(() => sketch(body), sketchDelay);
}

async function sketch(body) {
  const controller = new AbortController();
  sketching = controller;
  const started = performance.now();
  try {
    const response = await post("api/sketch", body, controller.signal);
    if (!response.ok) {
      const refusal = await refusalOf(response);
      setStatus(refusal.error);
      return;
    }
    for await (const [event, data] of serverSentEvents(response)) {
      if (event !== "done" || running) continue;
      const digits = decodeImages(data.images);
      clearError();
      grid.reset(digits.length / (SIZE * SIZE));
      grid.set(digits, digits);
      setDownload(body);
      canvas.dataset.sketches = String(Number(canvas.dataset.sketches || 0) + 1);
      const seconds = ((performance.now() - started) / 1000).toFixed(2);
      setStatus(`sketched in ${sketchSteps} passes · ${seconds} s · Generate for the live denoising`, "sketched", 1);
    }
  } catch (err) {
    if (!controller.signal.aborted) setStatus(`sketch failed: ${err.message}`);
  } finally {
    if (sketching === controller) sketching = null;
  }
}

async function generate(body) {
  clearTimeout(sketchTimer);
  sketching?.abort();
  running?.abort();
  const controller = new AbortController();
  running = controller;
  clearError();
  setDownload(null);
  const count = Number.isInteger(body.num_samples) && body.num_samples >= 1 ? Math.min(body.num_samples, maxDigits) : 8;
  grid.reset(count); // the grid appears at once, before the first step comes back
  setStatus("sending…", "queued", 0);
  $("stop").disabled = false;
  const started = performance.now();
  try {
    const response = await post("api/generate", body, controller.signal);
    if (!response.ok) {
      const refusal = await refusalOf(response);
      showError(refusal.error, refusal.field);
      setStatus("refused", "error", 0);
      return;
    }
    let last = null;
    for await (const [event, data] of serverSentEvents(response)) {
      handle(event, data, body, started);
      last = event;
    }
    if (last !== "done" && last !== "error") throw new Error("the connection closed before the grid was finished");
  } catch (err) {
    if (controller.signal.aborted) {
      if (running === controller) setStatus("stopped", "cancelled");
    } else {
      showError(err.message);
      setStatus("failed", "error");
    }
  } finally {
    if (running === controller) {
      running = null;
      $("stop").disabled = true;
    }
  }
}

async function loadConfig() {
  const config = await (await fetch("api/config")).json();
  for (const name of config.samplers) $("sampler").add(new Option(name, name));
  for (const [name, value] of Object.entries(config.defaults)) {
    const input = $(name);
    if (input?.type === "checkbox") input.checked = value;
    else if (input) input.value = value;
  }
  for (const [name, [low, high]] of Object.entries(config.limits.ranges)) {
    const input = $(name);
    if (input && low !== null) input.min = low;
    if (input && high !== null) input.max = high;
  }
  $("steps").max = config.limits.max_steps;
  $("num_samples").max = maxDigits = config.limits.max_digits;
  $("model").textContent = config.model;
  if (config.sketch) {
    sketchSteps = config.sketch.steps;
    sketchDelay = config.sketch.delay_ms;
    sketchNegative = config.sketch.negative_prompt;
    $("sketch_model").textContent = config.sketch.model;
    $("sketch_steps").textContent = sketchSteps;
    $("as_you_type_label").hidden = $("sketch_footer").hidden = false;
  }
  $("prompt").placeholder = "e.g. " + config.examples.map((p) => `"${p}"`).join(", ").replace(/, ([^,]*)$/, " or $1");
  grid.reset(config.defaults.num_samples);
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  generate(formBody());
});
$("stop").addEventListener("click", () => running?.abort());
$("dice").addEventListener("click", () => {
  $("seed").value = Math.floor(Math.random() * 2 ** 31);
});
$("view").addEventListener("change", () => grid.draw());
form.addEventListener("input", (event) => {
  event.target.removeAttribute("aria-invalid");
  if (["prompt", "negative_prompt", "guidance_scale", "seed", "num_samples"].includes(event.target.id)) scheduleSketch();
});
loadConfig().catch((err) => showError(`cannot load the page's settings: ${err.message}`));
