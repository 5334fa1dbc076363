// The server's public API, called as any client calls it: a bearer key, JSON bodies, OpenAI-shaped errors and
// server-sent event streams read with fetch + ReadableStream. The key lives in this tab's sessionStorage only.

const KEY = "e2p-playground-key";

export function storedKey() {
  return sessionStorage.getItem(KEY);  // null: no key typed in this tab yet ("" : an open server, no key)
}

export function storeKey(key) {
  sessionStorage.setItem(KEY, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(json) {
  const out = {};
  const key = storedKey();
  if (key) out.Authorization = `Bearer ${key}`;
  if (json) out["Content-Type"] = "application/json";
  return out;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message;
      code = body.error.code;
    }
  } catch (_) {
    // not an OpenAI-shaped error body: keep the status line
  }
  return new ApiError(response.status, message, code);
}

async function send(method, path, body, signal) {
  try {
    return await fetch(path, {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, `the server cannot be reached (${err.message})`, "network");
  }
}

// One JSON call: the parsed body, or an ApiError with the server's message.
export async function call(method, path, body, signal) {
  const response = await send(method, path, body, signal);
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

// A user id in /v1/users/{id}/embedding: percent-encoded, dots too (URL clients drop `.` and `..` segments).
export function userPath(id) {
  return `/v1/users/${encodeURIComponent(id).replace(/\./g, "%2E")}/embedding`;
}

// A streamed chat completion. `onText(delta)` gets each text delta as it arrives; resolves with the usage, the
// finish reason, the x-e2p-embedding headers and the times (ms: sent, first text, end).
export async function streamChat(body, onText, signal) {
  const sent = performance.now();
  const request = { ...body, stream: true, stream_options: { include_usage: true } };
  const response = await send("POST", "/v1/chat/completions", request, signal);
  if (!response.ok) throw await errorOf(response);
  const source = response.headers.get("x-e2p-embedding");
  const version = response.headers.get("x-e2p-embedding-version");
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let usage = null;
  let finish = null;
  let first = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") {
          return { usage, finish, source, version, sent, first, ended: performance.now() };
        }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk.error.message, chunk.error.code);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const text = choice.delta && choice.delta.content;
          if (text) {
            if (first === null) first = performance.now();
            onText(text);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  }
  throw new ApiError(0, "the stream ended before its end event ([DONE])", "stream_cut");
}
