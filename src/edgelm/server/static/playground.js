// edgelm playground: chat with the service's OpenAI-compatible API or with a model running in
// this browser, and see how fast each answers. No dependencies beyond the vendored
// transformers.js (loaded by the worker only when an in-browser model is picked); no CDN.
//
// The service is the page's own origin, or another one given as ?service=http://host:port
// (that service must list this page's origin in service.cors_origins).
import { LatencyChart, fmtMs } from "./latency-chart.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const SERVICE = new URL(params.get("service") || location.origin).origin;
const BROWSER_PREFIX = "browser:";
const RAG_RULE = "Answer using ONLY the provided context. If insufficient, say so.";

const chat = { history: [], busy: false, abort: null };
const browser = { worker: null, model: null, device: null, ready: null, webgpu: null, handlers: null };
const chart = new LatencyChart($("chart"), $("chart-legend"), $("chart-data"));
let lastModelsKey = "";

// ---------------------------------------------------------------- messages and status

function showError(message, kind = "") {
  const box = $("error");
  box.dataset.kind = kind;
  box.textContent = message || "";
  box.hidden = !message;
}

function showProgress(message) {
  const box = $("progress");
  box.textContent = message || "";
  box.hidden = !message;
}

function setServiceStatus(up, text) {
  const status = $("service-status");
  status.dataset.state = up ? "up" : "down";
  status.textContent = text;
}

function unreachable(err) {
  return `Cannot reach the edgelm service at ${SERVICE} (${err.message}). ` +
    "Is it running? Start it with: edgelm service start";
}

function addMessage(role, text) {
  const li = document.createElement("li");
  li.className = role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  li.append(body);
  $("messages").append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function answerBubble(label) {
  const li = addMessage("assistant", "");
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = label;
  li.prepend(who);
  li.dataset.state = "streaming";
  li.setAttribute("aria-busy", "true");
  return li;
}

function appendText(li, piece) {
  li.querySelector(".text").textContent += piece;
  if (li.live) li.live.piece(piece);
  const log = $("messages");
  if (log.scrollHeight - log.scrollTop - log.clientHeight < 80) log.scrollTop = log.scrollHeight;
}

function finishBubble(li, state, summary) {
  li.dataset.state = state;
  li.removeAttribute("aria-busy");
  if (summary) {
    const foot = document.createElement("div");
    foot.className = "meta";
    foot.textContent = summary;
    li.append(foot);
  }
}

function showCitations(li, citations, note) {
  const box = document.createElement("div");
  box.className = "citations";
  const title = document.createElement("p");
  title.textContent = note || (citations.length ? "Sources" : "No sources cited");
  box.append(title);
  if (citations.length) {
    const list = document.createElement("ul");
    for (const c of citations) {
      const item = document.createElement("li");
      const details = document.createElement("details");
      const summary = document.createElement("summary");
      summary.textContent = `[${c.n}] ${c.source}${c.location ? `, ${c.location}` : ""}`;
      const quote = document.createElement("blockquote");
      quote.textContent = c.text;
      details.append(summary, quote);
      item.append(details);
      list.append(item);
    }
    box.append(list);
  }
  li.append(box);
}

// ---------------------------------------------------------------- models

function option(value, label, disabled, title) {
  const opt = document.createElement("option");
  opt.value = value;
  opt.textContent = label;
  opt.disabled = Boolean(disabled);
  if (title) opt.title = title;
  return opt;
}

function virtualUsable(card, byId) {
  // hybrid names its tiers; it works only when both are downloaded.
  const needs = [card.slm, card.llm].filter(Boolean);
  return needs.every((id) => byId.get(id)?.cached);
}

async function fetchJson(path) {
  const res = await fetch(`${SERVICE}${path}`);
  if (!res.ok) {
    const body = await res.json().catch(() => ({}));
    throw new Error(body.error ? body.error.message : `HTTP ${res.status}`);
  }
  return res.json();
}

async function loadModels() {
  let models;
  let exported = { data: [] };
  try {
    models = await fetchJson("/v1/models");
    exported = await fetchJson("/browser-models").catch(() => exported);
  } catch (err) {
    setServiceStatus(false, "service: unreachable");
    showError(unreachable(err), "unreachable");
    return false;
  }
  setServiceStatus(true, "service: up");
  if ($("error").dataset.kind === "unreachable") showError("");
  const key = JSON.stringify([models.data.map((c) => [c.id, c.cached]), exported.data.map((c) => c.id)]);
  if (key === lastModelsKey) return true;
  lastModelsKey = key;

  const select = $("model");
  const previous = select.value;
  const byId = new Map(models.data.map((c) => [c.id, c]));
  const real = document.createElement("optgroup");
  real.label = "Service models";
  const virtual = document.createElement("optgroup");
  virtual.label = "Hybrid and RAG (service)";
  const local = document.createElement("optgroup");
  local.label = "In this browser";
  for (const card of models.data) {
    if (card.tier === "virtual") {
      const usable = virtualUsable(card, byId);
      const note = usable ? card.description || "" : `needs ${card.slm} and ${card.llm} downloaded`;
      virtual.append(option(card.id, `${card.id}${usable ? "" : " (unavailable)"}`, !usable, note));
    } else {
      const state = card.loaded ? "loaded" : card.cached ? "ready" : "not downloaded";
      const title = card.cached ? "" : `edgelm model download ${card.id}`;
      real.append(option(card.id, `${card.id} (${card.tier}, ${state})`, !card.cached, title));
    }
  }
  for (const card of exported.data) {
    const mb = card.bytes ? ` ${Math.round(card.bytes / 1e6)} MB` : "";
    local.append(option(`${BROWSER_PREFIX}${card.id}`, `${card.id} in browser (${card.dtype}${mb})`));
  }
  if (!exported.data.length) {
    local.append(option("", "none exported: edgelm model export-web smollm2-135m", true));
  }
  select.replaceChildren(...[real, virtual, local].filter((g) => g.children.length));
  const enabled = [...select.options].filter((o) => !o.disabled);
  const keep = enabled.find((o) => o.value === previous);
  const loaded = models.data.find((c) => c.loaded && c.tier !== "virtual");
  const preferred = keep || enabled.find((o) => loaded && o.value === loaded.id) || enabled[0];
  if (preferred) select.value = preferred.value;
  describeModel();
  return true;
}

function describeModel() {
  const value = $("model").value;
  const opt = $("model").selectedOptions[0];
  let note = opt && opt.title ? opt.title : "";
  if (value.startsWith(BROWSER_PREFIX)) {
    note = "Runs inside this page with transformers.js; the files come from this service.";
  } else if (value === "rag:inline") {
    note = "Answers from the Context box only.";
  }
  $("model-note").textContent = note;
}

// ---------------------------------------------------------------- WebGPU detection

async function detectWebGPU() {
  if (!navigator.gpu) return { usable: false, reason: "this browser has no WebGPU" };
  try {
    const adapter = await navigator.gpu.requestAdapter();
    if (!adapter) return { usable: false, reason: "no WebGPU adapter (no GPU, or it is disabled)" };
    const info = adapter.info || {};
    const name = [info.vendor, info.architecture, info.description].filter(Boolean).join(" ") || "an adapter";
    if (adapter.isFallbackAdapter || info.isFallbackAdapter) {
      return { usable: false, software: true, reason: `only a software adapter (${name}), slower than WASM` };
    }
    return { usable: true, reason: `adapter: ${name}` };
  } catch (err) {
    return { usable: false, reason: `adapter request failed: ${err.message}` };
  }
}

function chosenDevice() {
  const want = $("backend").value;
  if (want === "wasm") return "wasm";
  if (want === "webgpu") return browser.webgpu && (browser.webgpu.usable || browser.webgpu.software) ? "webgpu" : "wasm";
  return browser.webgpu && browser.webgpu.usable ? "webgpu" : "wasm";
}

// ---------------------------------------------------------------- in-browser model (worker)

function worker() {
  if (browser.worker) return browser.worker;
  const w = new Worker("/static/browser-worker.js", { type: "module" });
  w.addEventListener("message", ({ data }) => browser.handlers && browser.handlers(data));
  w.addEventListener("error", (e) => {
    const message = `The in-browser runtime failed to start: ${e.message || "worker error"}`;
    if (browser.handlers) browser.handlers({ type: "error", during: "worker", message });
    else showError(message);
  });
  browser.worker = w;
  return w;
}

function loadBrowserModel(id) {
  const device = chosenDevice();
  if (browser.ready && browser.model === id && browser.requested === device) return browser.ready;
  browser.model = id;
  browser.requested = device;
  browser.ready = loadOnDevice(id, device).catch((err) => {
    if (device !== "webgpu") throw err;
    // WebGPU was there but would not run the model (a software adapter, a driver, an adapter
    // the page sees but the worker does not): start a fresh runtime on WASM and say why.
    // A fresh worker, because ONNX Runtime remembers a backend that failed to start.
    browser.worker.terminate();
    browser.worker = null;
    const why = `WebGPU failed (${err.message}); running on WASM instead`;
    return loadOnDevice(id, "wasm", why);
  }).catch((err) => {
    browser.ready = null;
    showProgress("");
    throw new Error(`could not load ${id} in this browser: ${err.message}`);
  });
  return browser.ready;
}

function loadOnDevice(id, device, fallback = null) {
  return new Promise((resolve, reject) => {
    const files = new Map();
    browser.handlers = (msg) => {
      if (msg.type === "status") showProgress(fallback ? `${fallback}. ${msg.text}` : msg.text);
      else if (msg.type === "progress") {
        files.set(msg.file, [msg.loaded, msg.total]);
        let done = 0;
        let total = 0;
        for (const [a, b] of files.values()) { done += a || 0; total += b || 0; }
        showProgress(`loading ${id}: ${Math.round(done / 1e6)} / ${Math.round(total / 1e6)} MB`);
      } else if (msg.type === "ready") {
        browser.device = msg.device;
        const where = msg.device === "webgpu" ? "WebGPU" : "WASM";
        const took = msg.loadMs ? `, loaded in ${fmtMs(msg.loadMs)}` : "";
        showProgress(`${fallback ? `${fallback}. ` : ""}${id} ready in this browser (${where}${took}).`);
        $("webgpu-status").dataset.ran = msg.device;
        resolve(msg);
      } else if (msg.type === "error") {
        reject(new Error(msg.message));
      }
    };
    worker().postMessage({ type: "load", model: id, device, base: SERVICE });
  });
}

async function runInBrowser(id, messages, opts, li) {
  await loadBrowserModel(id);
  const where = browser.device === "webgpu" ? "WebGPU" : "WASM";
  li.querySelector(".who").textContent = `${id} · in browser (${where})`;
  return new Promise((resolve, reject) => {
    browser.handlers = (msg) => {
      if (msg.type === "token") appendText(li, msg.text);
      else if (msg.type === "done") resolve(msg);
      else if (msg.type === "error") reject(new Error(`${id} failed in this browser: ${msg.message}`));
    };
    chat.abort = () => browser.worker.postMessage({ type: "stop" });
    browser.worker.postMessage({ type: "generate", messages, ...opts });
  });
}

// ---------------------------------------------------------------- service streaming

function contextBlocks(text) {
  // The in-browser model has no retriever: the context is split into numbered blocks and
  // given whole, under the same rule the service's RAG uses.
  const parts = text.split(/\n\s*\n/).map((p) => p.trim()).filter(Boolean);
  return parts.slice(0, 8).map((p, i) => ({ n: i + 1, source: "context", location: `paragraph ${i + 1}`, text: p }));
}

async function streamService(model, messages, opts, li, started, out) {
  // ``out`` is filled as the stream goes, so a stopped answer still reports what it got.
  const controller = new AbortController();
  chat.abort = () => controller.abort();
  let res;
  try {
    res = await fetch(`${SERVICE}/v1/chat/completions`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      signal: controller.signal,
      body: JSON.stringify({
        model,
        messages,
        stream: true,
        stream_options: { include_usage: true },
        temperature: opts.temperature,
        max_tokens: opts.max_tokens,
      }),
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new Error(unreachable(err));
  }
  if (!res.ok) {
    const body = await res.json().catch(() => ({}));
    throw new Error(`${model}: ${body.error ? body.error.message : `HTTP ${res.status}`}`);
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") continue;
      const event = JSON.parse(data);
      if (event.error) throw new Error(`${model}: ${event.error.message}`);
      if (event.usage) out.usage = event.usage;
      if (event.timings) out.timings = event.timings;
      if (event.edgelm) out.extension = event.edgelm;
      for (const choice of event.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (out.first === null) out.first = performance.now() - started;
          appendText(li, piece);
        }
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------- one turn

function setBusy(busy) {
  chat.busy = busy;
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  if (!busy) chat.abort = null;
}

function liveMetrics(model, where, started) {
  // While an answer streams, the panel counts along (pieces ≈ tokens); the final figures,
  // from the service's usage and timings or the worker's counts, replace these at the end.
  let first = null;
  let pieces = 0;
  let queued = false;
  let stopped = false;
  $("m-model").textContent = model;
  $("m-where").textContent = where;
  for (const id of ["m-ttft", "m-tps", "m-total", "m-tokens"]) $(id).textContent = "…";
  const piece = () => {
    const now = performance.now();
    if (first === null) first = now;
    pieces += 1;
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => {
      queued = false;
      if (stopped) return;  // the final figures are already shown
      const t = performance.now();
      $("m-ttft").textContent = fmtMs(first - started);
      $("m-total").textContent = `${fmtMs(t - started)}…`;
      $("m-tokens").textContent = `… / ~${pieces}`;
      if (pieces > 1 && t > first) $("m-tps").textContent = `~${(((pieces - 1) * 1000) / (t - first)).toFixed(1)}`;
    });
  };
  return { piece, stop: () => { stopped = true; } };
}

function showMetrics(r) {
  $("m-model").textContent = r.model;
  $("m-where").textContent = r.where;
  $("m-ttft").textContent = fmtMs(r.ttftMs);
  $("m-tps").textContent = r.tps == null ? "–" : r.tps.toFixed(1);
  $("m-total").textContent = fmtMs(r.totalMs);
  $("m-tokens").textContent = `${r.promptTokens ?? "–"} / ${r.completionTokens ?? "–"}`;
}

async function send(question) {
  showError("");
  const selected = $("model").value;
  if (!selected) {
    showError("No model to answer with: download one (edgelm model download smollm2-135m).");
    return;
  }
  const context = $("context").value.trim();
  const inBrowser = selected.startsWith(BROWSER_PREFIX);
  if (selected === "rag:inline" && !context) {
    showError("rag:inline answers from the Context box: paste some text there first.");
    return;
  }
  const opts = {
    temperature: Number($("temperature").value),
    max_tokens: Math.max(1, Math.min(4096, Number($("max-tokens").value) || 128)),
  };
  addMessage("user", question);
  let model = selected;
  let messages;
  let blocks = null;
  if (inBrowser) {
    model = selected.slice(BROWSER_PREFIX.length);
    if (context) {
      blocks = contextBlocks(context);
      const numbered = blocks.map((b) => `[${b.n}] ${b.text}`).join("\n\n");
      messages = [
        { role: "system", content: `${RAG_RULE} Cite the blocks you use like [1]. Be concise.` },
        ...chat.history,
        { role: "user", content: `Context:\n${numbered}\n\nQuestion: ${question}` },
      ];
    } else {
      messages = [...chat.history, { role: "user", content: question }];
    }
  } else {
    if (context && !selected.startsWith("rag:")) model = `rag:inline@${selected}`;
    const user = context && model.startsWith("rag:inline")
      ? { role: "user", content: [{ type: "text", text: question }, { type: "document", id: "context", text: context }] }
      : { role: "user", content: question };
    messages = [...chat.history, user];
  }
  chat.history.push({ role: "user", content: question });
  const li = answerBubble(inBrowser ? `${model} · in browser` : `${model} · service`);
  setBusy(true);
  const started = performance.now();
  li.live = liveMetrics(model, inBrowser ? "browser" : "service", started);
  let record = null;
  let state = "done";
  const partial = { first: null, usage: null, timings: null, extension: null };
  try {
    if (inBrowser) {
      const r = await runInBrowser(model, messages, opts, li);
      const where = r.device === "webgpu" ? "browser (WebGPU)" : "browser (WASM)";
      record = {
        series: `${model} · ${where}`, model, where, ttftMs: r.ttftMs, tps: r.tps,
        totalMs: r.totalMs, promptTokens: r.promptTokens, completionTokens: r.completionTokens,
        finish: r.finish,
      };
      if (r.finish === "cancelled") state = "stopped";
      if (blocks) {
        const text = li.querySelector(".text").textContent;
        const cited = [...new Set([...text.matchAll(/\[(\d{1,2})\]/g)].map((m) => Number(m[1])))]
          .filter((n) => n >= 1 && n <= blocks.length);
        const shown = cited.length ? blocks.filter((b) => cited.includes(b.n)) : blocks;
        showCitations(li, shown, cited.length ? "Sources" : "Context given (no block cited)");
      }
    } else {
      const r = await streamService(model, messages, opts, li, started, partial);
      const totalMs = performance.now() - started;
      const t = r.timings || {};
      record = {
        series: model, model, where: "service", ttftMs: r.first, tps: t.predicted_per_second ?? null,
        totalMs, promptTokens: r.usage?.prompt_tokens, completionTokens: r.usage?.completion_tokens,
        finish: "stop",
      };
      const ext = r.extension;
      if (ext && Array.isArray(ext.citations)) {
        const note = ext.refused ? "Refused: nothing relevant in the context"
          : ext.citations.length ? `Sources${ext.model ? ` (answered by ${ext.model}${ext.escalated ? ", escalated" : ""})` : ""}`
          : "No sources cited";
        showCitations(li, ext.citations, note);
      } else if (ext && ext.route) {
        const foot = document.createElement("div");
        foot.className = "route";
        foot.textContent = `route: ${ext.route}${ext.reason ? ` (${ext.reason})` : ""}`;
        li.append(foot);
      }
    }
  } catch (err) {
    if (err.name === "AbortError") {
      state = "stopped";
      record = {
        series: model, model, where: "service", ttftMs: partial.first, tps: null,
        totalMs: performance.now() - started, finish: "cancelled",
      };
    } else {
      state = "error";
      showError(err.message);
    }
  } finally {
    li.live.stop();
    li.live = null;
    for (const id of ["m-ttft", "m-tps", "m-total", "m-tokens"]) $(id).textContent = "–";
    const text = li.querySelector(".text").textContent;
    if (text) chat.history.push({ role: "assistant", content: text });
    else chat.history.pop();  // an answer that never came: drop the question from history
    let summary = "";
    if (record) {
      showMetrics(record);
      if (record.finish !== "cancelled") chart.add(record);  // a cut-short answer would mislead
      summary = `TTFT ${fmtMs(record.ttftMs)} · ${record.tps == null ? "–" : record.tps.toFixed(1)} tok/s · total ${fmtMs(record.totalMs)}`;
      if (record.completionTokens != null) summary += ` · ${record.promptTokens} / ${record.completionTokens} tokens`;
    }
    if (state === "stopped") summary = `stopped${summary ? ` · ${summary}` : ""}`;
    finishBubble(li, state, summary);
    setBusy(false);
    $("prompt").focus();
  }
}

// ---------------------------------------------------------------- wiring

$("prompt-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || chat.busy) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("prompt-form").requestSubmit();
  }
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && chat.busy && chat.abort) chat.abort();
});
$("stop").addEventListener("click", () => chat.abort && chat.abort());
$("reset").addEventListener("click", () => {
  if (chat.busy && chat.abort) chat.abort();
  chat.history.length = 0;
  $("messages").replaceChildren();
  $("prompt").focus();
});
$("clear-chart").addEventListener("click", () => chart.clear());
$("temperature").addEventListener("input", () => {
  $("temperature-value").textContent = $("temperature").value;
});
$("model").addEventListener("change", () => {
  describeModel();
  const value = $("model").value;
  if (value.startsWith(BROWSER_PREFIX)) {
    loadBrowserModel(value.slice(BROWSER_PREFIX.length)).catch((err) => showError(err.message));
  }
});
$("backend").addEventListener("change", () => {
  const value = $("model").value;
  if (value.startsWith(BROWSER_PREFIX) && !chat.busy) {
    loadBrowserModel(value.slice(BROWSER_PREFIX.length)).catch((err) => showError(err.message));
  }
});

async function start() {
  chart.draw();
  const gpu = await detectWebGPU();
  browser.webgpu = gpu;
  const status = $("webgpu-status");
  status.dataset.usable = String(gpu.usable);
  status.textContent = gpu.usable ? `WebGPU: available (${gpu.reason})` : `WebGPU: not used, ${gpu.reason}; WASM runs instead`;
  await loadModels();
  // Keep the status honest: notice the service going away or coming back.
  setInterval(async () => {
    try {
      const res = await fetch(`${SERVICE}/health`, { cache: "no-store" });
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      if ($("service-status").dataset.state !== "up") await loadModels();
    } catch (err) {
      if ($("service-status").dataset.state !== "down") {
        setServiceStatus(false, "service: unreachable");
        showError(unreachable(err), "unreachable");
      }
    }
  }, 5000);
}

start();
