// edgelm playground: runs a small model inside the browser with transformers.js.
//
// A module worker, so a forward pass never freezes the page and "Stop" stays responsive.
// Everything is loaded from the edgelm service itself: the library and the ONNX Runtime WASM
// binary from /static/vendor/transformers/, the model from /browser-models/<id>/. Remote model
// hubs and CDNs are switched off, so the page works offline.
//
// Messages in:  {type: "load", model, device: "webgpu" | "wasm", base}
//               {type: "generate", messages, max_tokens, temperature}
//               {type: "stop"}
// Messages out: {type: "status" | "progress" | "ready" | "start" | "token" | "done" | "error"}
import {
  AutoModelForCausalLM,
  AutoTokenizer,
  InterruptableStoppingCriteria,
  TextStreamer,
  env,
} from "./vendor/transformers/transformers.min.js";

const state = { model: null, tokenizer: null, id: null, device: null };
const stopping = new InterruptableStoppingCriteria();

function configure(base) {
  const vendor = new URL("/static/vendor/transformers/", base).href;
  if (new URL(base).origin === self.location.origin) {
    // transformers.js treats only scheme-less paths as local: "/browser-models/" on this origin.
    env.allowRemoteModels = false;
    env.allowLocalModels = true;
    env.localModelPath = "/browser-models/";
  } else {
    // The page is hosted elsewhere (?service=): the edgelm service is the only "remote" host
    // it may use; never a model hub.
    env.allowLocalModels = false;
    env.allowRemoteModels = true;
    env.remoteHost = new URL("/", base).href;
    env.remotePathTemplate = "browser-models/{model}/";
  }
  // A re-export keeps the file names; the browser cache would serve stale weights.
  env.useBrowserCache = false;
  const wasm = env.backends.onnx.wasm;
  wasm.wasmPaths = {
    mjs: `${vendor}ort-wasm-simd-threaded.asyncify.mjs`,
    wasm: `${vendor}ort-wasm-simd-threaded.asyncify.wasm`,
  };
  // Threads need cross-origin isolation (SharedArrayBuffer); without it ORT uses one.
  wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
}

async function loadOn(id, device) {
  const progress_callback = (p) => {
    if (p.status === "progress") {
      postMessage({ type: "progress", file: p.file, loaded: p.loaded, total: p.total });
    }
  };
  const tokenizer = await AutoTokenizer.from_pretrained(id, { progress_callback });
  // fp32: the export writes onnx/model.onnx only (q8 hurt this tiny model's answers).
  const model = await AutoModelForCausalLM.from_pretrained(id, {
    device,
    dtype: "fp32",
    progress_callback,
  });
  return { tokenizer, model };
}

async function load({ model: id, device, base }) {
  configure(base);
  if (state.id === id && state.model && state.device === device) {
    postMessage({ type: "ready", model: id, device, loadMs: 0, cached: true });
    return;
  }
  if (state.model) await state.model.dispose();
  state.model = state.tokenizer = state.id = null;
  if (device === "webgpu") {
    // Ask here, where the model would run, before fetching hundreds of MB for nothing.
    const adapter = navigator.gpu ? await navigator.gpu.requestAdapter() : null;
    if (!adapter) throw new Error("no WebGPU adapter is available to the worker");
  }
  const started = performance.now();
  postMessage({ type: "status", text: `loading ${id} on ${device === "webgpu" ? "WebGPU" : "WASM"}…` });
  const loaded = await loadOn(id, device);
  Object.assign(state, loaded, { id, device });
  postMessage({ type: "ready", model: id, device, loadMs: performance.now() - started });
}

async function generate({ messages, max_tokens, temperature }) {
  if (!state.model) throw new Error("no in-browser model is loaded");
  const { model, tokenizer } = state;
  const inputs = tokenizer.apply_chat_template(messages, {
    add_generation_prompt: true,
    return_dict: true,
  });
  const promptTokens = inputs.input_ids.dims.at(-1);
  postMessage({ type: "start", promptTokens, device: state.device });
  let first = null;
  let last = null;
  let count = 0;
  const streamer = new TextStreamer(tokenizer, {
    skip_prompt: true,
    skip_special_tokens: true,
    callback_function: (text) => postMessage({ type: "token", text }),
    token_callback_function: () => {
      last = performance.now();
      if (first === null) first = last;
      count += 1;
    },
  });
  stopping.reset();
  const started = performance.now();
  const sample = temperature > 0;
  await model.generate({
    ...inputs,
    max_new_tokens: max_tokens,
    do_sample: sample,
    ...(sample ? { temperature } : {}),
    streamer,
    stopping_criteria: stopping,
  });
  const end = performance.now();
  const decodeMs = first !== null && last > first ? last - first : null;
  postMessage({
    type: "done",
    device: state.device,
    promptTokens,
    completionTokens: count,
    ttftMs: first === null ? null : first - started,
    totalMs: end - started,
    tps: decodeMs ? ((count - 1) * 1000) / decodeMs : null,
    finish: stopping.interrupted ? "cancelled" : count >= max_tokens ? "length" : "stop",
  });
}

self.addEventListener("message", async ({ data }) => {
  if (data.type === "stop") {
    stopping.interrupt();
    return;
  }
  try {
    if (data.type === "load") await load(data);
    else if (data.type === "generate") await generate(data);
  } catch (err) {
    postMessage({ type: "error", during: data.type, message: String(err && err.message ? err.message : err) });
  }
});
