// coinserve console: plain JavaScript, served by the gateway, talking only to the gateway.
//   GET /v1/examples       the bundle's example inputs (ready-to-send V2 `inputs`)
//   GET /v1/status         the cluster, polled every second
//   POST /v1/requests      then GET /v1/requests/{id}/events: the answer as it refines (SSE)
// The event stream is followed with an EventSource: on a gateway with a token, the events_url that
// POST /v1/requests returns carries a ticket for that request, which stands in for the bearer header
// an EventSource cannot send. A dropped stream is resumed with Last-Event-ID by the browser.
"use strict";

const TOKEN_KEY = "coinserve-token";
const POLL_MS = 1000;
const POLL_TIMEOUT_MS = 2000; // a status slower than this counts as no answer
const RETRY_MS = 2000; // loading the examples again after a failure
const MAX_BARS = 12; // more classes than this: the top MAX_BARS of each answer are drawn

const el = (id) => document.getElementById(id);
const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  examples: [],
  labels: [],
  input: null, // {name, shape, datatype}
  range: [0, 1], // the examples' value range: drawings and files are scaled onto it
  darkBackground: true,
  run: null, // the request being shown: {controller, clicked}
  poller: null,
  unreachableSince: null, // when /v1/status stopped answering (the panel then shows the last state seen)
  runs: [], // timings of finished runs, for people and benchmarks: {what, final_ms, events}
};
window.coinserveConsole = state;

class AuthError extends Error {}

function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  if (state.token) headers.Authorization = "Bearer " + state.token;
  return headers;
}

function showError(message) {
  const banner = el("banner");
  banner.textContent = message;
  banner.hidden = !message;
}

function needToken() {
  const form = el("token-form");
  form.hidden = false;
  showError(
    state.token
      ? "The gateway refused this token (401 unauthorized). Enter the gateway's COINSERVE_AUTH_TOKEN."
      : "This gateway needs a token (COINSERVE_AUTH_TOKEN): enter it to use the console."
  );
  el("token").focus();
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = authHeaders(opts.headers);
  const response = await fetch(path, opts);
  if (response.status === 401) {
    throw new AuthError("unauthorized");
  }
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error || JSON.stringify(body);
  } catch (_) {
    return response.statusText || "HTTP " + response.status;
  }
}

// ---- input: examples, drawing, files -------------------------------------------------------------

function imageLayout(shape) {
  // → {channels, height, width} when the input is an image ((H, W), (1, H, W), (3, H, W)), else null
  if (shape.length === 2 && shape[0] >= 4 && shape[1] >= 4) return { channels: 1, height: shape[0], width: shape[1] };
  if (shape.length === 3 && (shape[0] === 1 || shape[0] === 3) && shape[1] >= 4 && shape[2] >= 4) {
    return { channels: shape[0], height: shape[1], width: shape[2] };
  }
  return null;
}

function toUnit(value) {
  const [lo, hi] = state.range;
  return hi > lo ? Math.min(1, Math.max(0, (value - lo) / (hi - lo))) : 0;
}

function paint(canvas, data, layout) {
  // draws one input (flat values, channel-major) onto a canvas of the input's own size
  canvas.width = layout.width;
  canvas.height = layout.height;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(layout.width, layout.height);
  const plane = layout.width * layout.height;
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) {
      const v = data[(layout.channels === 3 ? c : 0) * plane + i];
      image.data[4 * i + c] = Math.round(255 * toUnit(v));
    }
    image.data[4 * i + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
}

function renderExamples(body) {
  state.examples = body.examples || [];
  state.labels = body.labels || [];
  state.input = body.input;
  if (body.range) state.range = body.range;
  el("group").textContent = body.model_name ? "group " + body.model_name : "";
  const layout = imageLayout(state.input.shape);
  const box = el("examples");
  box.replaceChildren();
  for (const example of state.examples) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.testid = "example-" + example.index;
    button.dataset.index = example.index;
    button.title = "run example " + example.index + (example.label_name ? " (labelled " + example.label_name + ")" : "");
    if (layout) {
      const canvas = document.createElement("canvas");
      paint(canvas, example.inputs[0].data, layout);
      button.append(canvas);
    }
    const caption = document.createElement("span");
    caption.textContent = "#" + example.index + (example.label_name ? " · " + example.label_name : "");
    button.append(caption);
    button.addEventListener("click", () => runExample(example.index));
    box.append(button);
  }
  const note = el("examples-note");
  note.hidden = !body.note;
  note.textContent = body.note ? "No examples: " + body.note : "";
  if (layout) setUpDrawing(layout);
  for (const span of document.querySelectorAll(".if-image")) span.hidden = !layout;
}

function examplesBackground() {
  // whether the examples are light on a dark background (Fashion-MNIST, digits) or the reverse
  const layout = imageLayout(state.input.shape);
  if (!layout || !state.examples.length) return true;
  let border = 0;
  let count = 0;
  for (const example of state.examples) {
    const data = example.inputs[0].data;
    for (const [y, x] of [[0, 0], [0, layout.width - 1], [layout.height - 1, 0], [layout.height - 1, layout.width - 1]]) {
      border += toUnit(data[y * layout.width + x]);
      count++;
    }
  }
  return border / count < 0.5;
}

let padReady = false;
function setUpDrawing(layout) {
  el("draw").hidden = false;
  el("input-shape").textContent = state.input.shape.join("×");
  state.darkBackground = examplesBackground();
  const pad = el("pad");
  clearPad();
  if (padReady) return;
  padReady = true;
  const ctx = pad.getContext("2d");
  let drawing = false;
  const at = (event) => {
    const box = pad.getBoundingClientRect();
    return [((event.clientX - box.left) * pad.width) / box.width, ((event.clientY - box.top) * pad.height) / box.height];
  };
  pad.addEventListener("pointerdown", (event) => {
    drawing = true;
    pad.setPointerCapture(event.pointerId);
    ctx.beginPath();
    ctx.moveTo(...at(event));
  });
  pad.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    ctx.lineTo(...at(event));
    ctx.stroke();
  });
  pad.addEventListener("pointerup", () => { drawing = false; });
  pad.addEventListener("dragover", (event) => { event.preventDefault(); pad.classList.add("over"); });
  pad.addEventListener("dragleave", () => pad.classList.remove("over"));
  pad.addEventListener("drop", (event) => {
    event.preventDefault();
    pad.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) loadFile(file);
  });
  el("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) loadFile(file);
  });
  el("clear-pad").addEventListener("click", clearPad);
  el("run-drawing").addEventListener("click", () => runInputs(padInputs(layout), "drawing"));
}

function clearPad() {
  const pad = el("pad");
  const ctx = pad.getContext("2d");
  ctx.fillStyle = state.darkBackground ? "#000" : "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  ctx.strokeStyle = state.darkBackground ? "#fff" : "#000";
  ctx.lineWidth = pad.width / 12;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
}

function loadFile(file) {
  if (!file.type.startsWith("image/")) {
    showError("Not an image file: " + (file.name || file.type));
    return;
  }
  const url = URL.createObjectURL(file);
  const image = new Image();
  image.onload = () => {
    // scaled to fit the pad, its background matched to the examples', then centred on the pad
    const pad = el("pad");
    const scale = Math.min(pad.width / image.width, pad.height / image.height);
    const fitted = document.createElement("canvas");
    fitted.width = Math.max(1, Math.round(image.width * scale));
    fitted.height = Math.max(1, Math.round(image.height * scale));
    fitted.getContext("2d").drawImage(image, 0, 0, fitted.width, fitted.height);
    URL.revokeObjectURL(url);
    matchBackground(fitted);
    clearPad();
    pad.getContext("2d").drawImage(fitted, (pad.width - fitted.width) / 2, (pad.height - fitted.height) / 2);
    showError("");
  };
  image.onerror = () => {
    URL.revokeObjectURL(url);
    showError("The browser cannot read this image: " + file.name);
  };
  image.src = url;
}

function matchBackground(pad) {
  // a photo of a dark object on a light background is inverted to look like the examples
  const ctx = pad.getContext("2d", { willReadFrequently: true });
  const pixels = ctx.getImageData(0, 0, pad.width, pad.height);
  const d = pixels.data;
  let border = 0;
  let count = 0;
  for (let x = 0; x < pad.width; x++) {
    for (const y of [0, pad.height - 1]) {
      const i = 4 * (y * pad.width + x);
      border += (d[i] + d[i + 1] + d[i + 2]) / 765;
      count++;
    }
  }
  const light = border / count >= 0.5;
  if (light === state.darkBackground) {
    for (let i = 0; i < d.length; i += 4) {
      d[i] = 255 - d[i];
      d[i + 1] = 255 - d[i + 1];
      d[i + 2] = 255 - d[i + 2];
    }
    ctx.putImageData(pixels, 0, 0);
  }
}

function padInputs(layout) {
  // the drawing pad resized (area-averaged by the browser) to the input's H×W and scaled onto the
  // examples' value range
  const small = document.createElement("canvas");
  small.width = layout.width;
  small.height = layout.height;
  const ctx = small.getContext("2d");
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(el("pad"), 0, 0, layout.width, layout.height);
  const d = ctx.getImageData(0, 0, layout.width, layout.height).data;
  const plane = layout.width * layout.height;
  const [lo, hi] = state.range;
  const data = new Array(layout.channels * plane);
  for (let i = 0; i < plane; i++) {
    if (layout.channels === 3) {
      for (let c = 0; c < 3; c++) data[c * plane + i] = lo + ((hi - lo) * d[4 * i + c]) / 255;
    } else {
      data[i] = lo + ((hi - lo) * (d[4 * i] + d[4 * i + 1] + d[4 * i + 2])) / 765;
    }
  }
  const integer = !state.input.datatype.startsWith("FP");
  return [{
    name: state.input.name,
    shape: [1, ...state.input.shape],
    datatype: state.input.datatype,
    data: integer ? data.map(Math.round) : data,
  }];
}

// ---- the answer: one request's events -------------------------------------------------------------

function runExample(index) {
  const example = state.examples.find((e) => e.index === index);
  if (!example) {
    showError("There is no example " + index + " (the bundle has " + state.examples.length + ").");
    return;
  }
  for (const button of el("examples").children) button.classList.toggle("active", Number(button.dataset.index) === index);
  runInputs(example.inputs, "example " + index);
}

function requestParameters() {
  const parameters = {};
  const deadline = el("deadline").value;
  const margin = el("stop-margin").value;
  if (deadline) parameters.deadline_ms = Number(deadline);
  if (margin) parameters.stop_margin = Number(margin);
  return parameters;
}

async function runInputs(inputs, what) {
  if (state.run) state.run.controller.abort();
  const run = { controller: new AbortController(), clicked: performance.now(), what, events: 0 };
  state.run = run;
  resetAnswer(what);
  try {
    const created = await api("/v1/requests", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ inputs, parameters: requestParameters() }),
      signal: run.controller.signal,
    });
    if (created.status !== 202) {
      failed(run, "the gateway refused the request (" + created.status + "): " + (await errorText(created)));
      return;
    }
    const { events_url: url } = await created.json();
    await follow(run, url);
  } catch (error) {
    if (error.name === "AbortError") return;
    if (error instanceof AuthError) {
      failed(run, "unauthorized");
      needToken(); // its banner says what to do, so it comes last
      return;
    }
    failed(run, (error instanceof SyntaxError ? "unreadable answer from the gateway: " : "cannot reach the gateway: ") + error.message);
  }
}

function follow(run, url) {
  // resolves once the request's terminal event has been shown, the stream failed, or the run was replaced
  return new Promise((resolve) => {
    const source = new EventSource(url);
    const stop = () => {
      source.close();
      resolve();
    };
    if (run.controller.signal.aborted) return stop();
    run.controller.signal.addEventListener("abort", stop);
    for (const name of ["coarse", "refined", "final", "error"]) {
      source.addEventListener(name, (e) => {
        if (!(e instanceof MessageEvent)) return; // a connection error, not the request's error event
        show(run, { id: Number(e.lastEventId), name, data: JSON.parse(e.data) });
        if (name === "final" || name === "error") stop();
      });
    }
    source.onerror = (e) => {
      if (e instanceof MessageEvent || source.readyState !== EventSource.CLOSED) return; // reconnecting
      failed(run, "cannot follow the request: the gateway refused its event stream or ended it without a final answer");
      stop();
    };
  });
}

function resetAnswer(what) {
  const label = el("final-label");
  label.textContent = "";
  label.dataset.state = "pending";
  delete label.dataset.index;
  delete label.dataset.elapsedMs;
  el("answer-meta").textContent = what + ": waiting for the first answer…";
  el("members").replaceChildren();
  el("event-log").replaceChildren();
  showError("");
}

function labelOf(index) {
  return state.labels[index] !== undefined ? state.labels[index] : String(index);
}

function argmax(values) {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

function show(run, event) {
  if (state.run !== run) return;
  run.events++;
  const ms = performance.now() - run.clicked;
  const p = event.data.parameters || {};
  const item = document.createElement("li");
  item.dataset.event = event.name;
  if (event.name === "error") {
    item.textContent = `error · ${fmt(ms)} ms · ${event.data.error}`;
    el("event-log").append(item);
    failed(run, event.data.error);
    return;
  }
  const planes = p.planes === null || p.planes === undefined ? "float32" : p.planes + " planes";
  const decoded = (p.decoded_members || []).length ? " · decoded: " + p.decoded_members.join(", ") : "";
  item.textContent = `${event.name} · ${fmt(p.elapsed_ms)} ms at the gateway (${fmt(ms)} ms here) · resolution ${p.resolution} (${planes})${decoded}`;
  el("event-log").append(item);
  renderOutputs(event.data, p);
  const ensemble = event.data.outputs[event.data.outputs.length - 1];
  const top = argmax(ensemble.data.slice(0, ensemble.shape[1]));
  const exact = !p.approximate;
  el("answer-meta").textContent =
    `${run.what} · ${event.name} after ${fmt(ms)} ms · ${exact ? "exact" : "approximate"}` +
    (event.name === "final" ? "" : ": refining…");
  if (event.name === "final") {
    const label = el("final-label");
    label.textContent = labelOf(top);
    label.dataset.index = String(top);
    label.dataset.state = exact ? "exact" : "approximate";
    label.dataset.elapsedMs = String(Math.round(ms * 10) / 10);
    state.runs.push({ what: run.what, final_ms: ms, events: run.events, label: labelOf(top) });
    state.run = null;
  }
}

function failed(run, message) {
  if (state.run !== run) return;
  const label = el("final-label");
  label.textContent = "error";
  label.dataset.state = "error";
  el("answer-meta").textContent = message;
  showError(message);
  state.run = null;
}

function memberState(name, p) {
  if ((p.decoded_members || []).includes(name)) return "decoded";
  if ((p.exact_members || []).includes(name)) return "exact";
  return "coarse";
}

function renderOutputs(data, p) {
  const box = el("members");
  box.replaceChildren();
  for (const output of data.outputs) {
    const ensemble = output.name === "ensemble";
    const probs = output.data.slice(0, output.shape[1]);
    const top = argmax(probs);
    const card = document.createElement("div");
    card.className = "member";
    card.dataset.testid = ensemble ? "ensemble" : "member-" + output.name;
    card.dataset.state = ensemble ? "ensemble" : memberState(output.name, p);
    card.dataset.label = labelOf(top);
    const head = document.createElement("div");
    head.className = "head";
    const name = document.createElement("span");
    name.textContent = output.name;
    const badge = document.createElement("span");
    badge.className = "badge " + card.dataset.state;
    badge.textContent = ensemble ? "mean" : card.dataset.state;
    const answer = document.createElement("span");
    answer.textContent = labelOf(top) + " " + (100 * probs[top]).toFixed(0) + "%";
    answer.title = labelOf(top) + ": " + (100 * probs[top]).toFixed(2) + "%";
    head.append(name, badge, answer);
    card.append(head, bars(probs, top));
    box.append(card);
  }
}

function bars(probs, top) {
  const order = probs.map((_, i) => i);
  const shown = probs.length <= MAX_BARS ? order : order.sort((a, b) => probs[b] - probs[a]).slice(0, MAX_BARS);
  const grid = document.createElement("div");
  grid.className = "bars";
  for (const i of shown) {
    const name = document.createElement("span");
    name.textContent = labelOf(i);
    const track = document.createElement("span");
    const bar = document.createElement("div");
    bar.className = i === top ? "bar top" : "bar";
    bar.style.width = (100 * probs[i]).toFixed(1) + "%";
    track.append(bar);
    const num = document.createElement("span");
    num.className = "num";
    num.textContent = (100 * probs[i]).toFixed(1);
    grid.append(name, track, num);
  }
  return grid;
}

function fmt(ms) {
  return ms === undefined || ms === null ? "?" : ms < 10 ? ms.toFixed(1) : Math.round(ms).toLocaleString("en-US");
}

// A count as people write it (2,048); `exact` false: estimated from the recent rate ("about 5,300").
function count(n, exact = true) {
  return (exact ? "" : "about ") + Number(n).toLocaleString("en-US");
}

function plural(n, word) {
  return n === 1 ? word : word + "s";
}

// 60 → "minute", 90 → "90 s"
function period(seconds) {
  return seconds === 60 ? "minute" : `${seconds} s`;
}

// ---- the cluster ----------------------------------------------------------------------------------

function renderStatus(status) {
  const pill = el("gateway-state");
  pill.textContent = status.draining ? "draining" : status.ready ? "ready" : "not ready";
  pill.className = "pill " + (status.ready ? "ok" : "bad");
  pill.dataset.ready = String(status.ready);
  const box = el("replicas");
  const cards = [];
  for (const r of status.replicas) {
    const card = document.createElement("div");
    card.className = "replica";
    card.dataset.testid = "replica-" + r.name;
    card.dataset.ready = String(r.ready);
    card.dataset.role = r.role;
    const head = document.createElement("div");
    head.className = "head";
    const name = document.createElement("span");
    name.textContent = r.name;
    const role = document.createElement("span");
    role.className = "hint";
    role.textContent = r.role + " · " + (r.ready ? "ready" : "down");
    head.append(name, role);
    card.append(head);
    if (!r.ready && r.reason) {
      const why = document.createElement("div");
      why.className = "why";
      why.textContent = r.reason;
      card.append(why);
    }
    const facts = [
      [
        "answer time",
        r.p50_ms === null ? "no answers yet" : `typically ${fmt(r.p50_ms)} ms, 99 in 100 within ${fmt(r.p99_ms)} ms`,
      ],
      [
        "answered",
        `${count(r.calls, r.calls_exact)} ${plural(r.calls, "request")} in the last ${period(status.window_s)}` +
          (r.errors ? `; ${count(r.errors)} failed` : ""),
      ],
    ];
    if (r.cut)
      facts.push([
        "stopped early",
        `${count(r.cut, r.cut_exact)} ${plural(r.cut, "call")} stopped because the answer was already final; ` +
          `the longest ran ${fmt(r.cut_max_ms)} ms`,
      ]);
    if (r.role === "member") {
      facts.push([
        "rebuilt",
        `${count(r.decoded)} ${plural(r.decoded, "answer")} rebuilt from the coded replica instead of waiting for it`,
      ]);
      if (r.patience_ms !== null && r.patience_ms !== undefined)
        facts.push(["waits up to", `${fmt(r.patience_ms)} ms before its answer is rebuilt`]);
    }
    if (r.circuit_open) facts.push(["unreachable", "requests go on without it"]);
    const list = document.createElement("dl");
    for (const [term, value] of facts) {
      const dt = document.createElement("dt");
      dt.textContent = term;
      const dd = document.createElement("dd");
      dd.textContent = value;
      list.append(dt, dd);
    }
    card.append(list);
    if (r.resolutions && r.resolutions.live) card.append(resolutionsTable(r.resolutions));
    cards.push(card);
  }
  box.replaceChildren(...cards);
  box.classList.remove("stale");
  state.unreachableSince = null;
  el("cluster-meta").textContent =
    `${status.decode_policy} decoding · ${count(status.inflight)} ${plural(status.inflight, "request")} in progress · ` +
    `${count(status.open_streams)} open ${plural(status.open_streams, "stream")} · ` +
    `${count(status.finals)} answered, ${count(status.approximate_finals)} of them approximate · ` +
    `each replica checked every ${status.health.interval_s} s: one that stops answering is shown down ` +
    `within ${fmt(status.health.window_s)} s`;
}

// Which resolutions the replica's worker serves, as it measured them on its machine (issue 31): a
// coarse one costing no less than float32 is skipped, and the reason says by how much.
function resolutionsTable(res) {
  const table = document.createElement("table");
  table.className = "resolutions";
  table.dataset.testid = "replica-resolutions";
  const head = document.createElement("tr");
  for (const name of ["resolution", "kernel", "cost at batch 1", `at batch ${res.typical_batch}`, "served"]) {
    const th = document.createElement("th");
    th.textContent = name;
    head.append(th);
  }
  table.append(head);
  const ratio = (x) => (x === null || x === undefined ? "?" : `${x.toFixed(2)}×`);
  res.kernels.forEach((kernel, i) => {
    const tr = document.createElement("tr");
    const live = res.live.includes(i);
    const cells = [String(i), kernel, ratio(res.batch_1[i]), ratio(res.typical[i]), live ? "yes" : "skipped"];
    for (const text of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    tr.title = res.reasons[i] || "";
    if (!live) tr.className = "skipped";
    table.append(tr);
  });
  return table;
}

let polling = false;
async function poll() {
  if (polling) return; // the last poll is still out: a stalled gateway gets one request at a time
  polling = true;
  try {
    const response = await api("/v1/status", { signal: AbortSignal.timeout(POLL_TIMEOUT_MS) });
    if (response.status !== 200) throw new Error(await errorText(response));
    renderStatus(await response.json());
  } catch (error) {
    if (error instanceof AuthError) {
      stopPolling();
      needToken();
      return;
    }
    const pill = el("gateway-state");
    pill.textContent = "unreachable";
    pill.className = "pill bad";
    pill.dataset.ready = "false";
    el("replicas").classList.add("stale");
    state.unreachableSince = state.unreachableSince || new Date().toLocaleTimeString();
    const why = error.name === "TimeoutError" ? `no status within ${POLL_TIMEOUT_MS / 1000} s` : error.message;
    el("cluster-meta").textContent =
      `the gateway does not answer (${why}) since ${state.unreachableSince}: replicas as last seen`;
  } finally {
    polling = false;
  }
}

function stopPolling() {
  if (state.poller !== null) clearInterval(state.poller);
  state.poller = null;
}

// ---- start ------------------------------------------------------------------------------------------

async function start() {
  // the cluster panel starts at once; the examples are loaded, retried until the gateway answers
  el("token-form").hidden = true;
  showError("");
  stopPolling();
  state.poller = setInterval(poll, POLL_MS);
  poll();
  for (;;) {
    try {
      const response = await api("/v1/examples");
      if (response.status !== 200) throw new Error(await errorText(response));
      renderExamples(await response.json());
      break;
    } catch (error) {
      if (error instanceof AuthError) {
        stopPolling();
        needToken();
        return;
      }
      showError(`Cannot load the bundle's examples (${error.message}): trying again every ${RETRY_MS / 1000} s.`);
      await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
    }
  }
  showError("");
  const asked = new URLSearchParams(location.search).get("example");
  if (asked !== null && /^\d+$/.test(asked)) runExample(Number(asked));
}

el("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = el("token").value.trim() || null;
  if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token);
  else sessionStorage.removeItem(TOKEN_KEY);
  start();
});

start();
