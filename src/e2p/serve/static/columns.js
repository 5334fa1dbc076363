// The reply columns: one conversation per user (or per condition) with the same user messages, each reply
// streamed into its own column with its prompt tokens, time to first token and tokens per second.

import { streamChat } from "./api.js";

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export class Column {
  // spec: { key, title, note, request (fields added to every chat request), system (a system message or null) }
  constructor(spec) {
    this.spec = spec;
    this.history = [];
    this.root = element("article", "column");
    this.root.dataset.column = spec.key;
    this.root.dataset.state = "idle";
    this.root.setAttribute("aria-label", spec.title);
    this.root.append(element("h3", "column-title", spec.title), element("p", "column-note", spec.note));
    this.turns = element("ol", "turns");
    this.stats = element("p", "stats");
    this.error = element("p", "column-error");
    this.error.setAttribute("role", "alert");
    this.error.hidden = true;
    this.root.append(this.turns, this.stats, this.error);
  }

  // Send `message` after this column's own earlier turns; `extra` (e.g. an inline embedding) joins the request.
  async send(message, settings, extra, signal) {
    const asked = element("li", "turn user", message);
    const reply = element("li", "turn assistant reply");
    reply.setAttribute("aria-live", "polite");
    this.turns.append(asked, reply);
    this.root.dataset.state = "running";
    this.stats.textContent = "waiting for the first token…";
    this.error.hidden = true;
    const system = this.spec.system ? [{ role: "system", content: this.spec.system }] : [];
    const messages = [...system, ...this.history, { role: "user", content: message }];
    try {
      const result = await streamChat({ ...settings, ...this.spec.request, ...extra, messages },
        (text) => { reply.textContent += text; }, signal);
      this.history.push({ role: "user", content: message }, { role: "assistant", content: reply.textContent });
      this.stats.textContent = describe(result);
      this.root.dataset.state = "done";
    } catch (err) {
      // what stays on screen is what the next request sends: a cut reply stays (marked) in the history, and a
      // turn without any reply leaves both, so the conversation never holds a turn the user cannot see
      if (reply.textContent) {
        reply.classList.add("cut");
        this.history.push({ role: "user", content: message }, { role: "assistant", content: reply.textContent });
      } else {
        asked.remove();
      }
      this.fail(err.name === "AbortError" ? "stopped" : err.message, reply);
      if (err.name !== "AbortError") throw err;
    }
  }

  fail(message, reply) {
    if (reply && !reply.textContent) reply.remove();
    this.stats.textContent = "";
    this.error.textContent = message;
    this.error.hidden = false;
    this.root.dataset.state = "error";
  }
}

function describe(result) {
  const parts = [];
  if (result.usage) parts.push(`prompt ${result.usage.prompt_tokens} tokens`);
  if (result.first !== null) parts.push(`first token ${((result.first - result.sent) / 1000).toFixed(2)} s`);
  const tokens = result.usage ? result.usage.completion_tokens : 0;
  const seconds = result.first !== null ? (result.ended - result.first) / 1000 : 0;
  if (tokens > 1 && seconds > 0) parts.push(`${((tokens - 1) / seconds).toFixed(1)} tokens/s`);
  if (result.usage) parts.push(`${tokens} tokens, ${result.finish || "?"}`);
  if (result.source) parts.push(`embedding: ${result.source}${result.version ? ` v${result.version}` : ""}`);
  return parts.join(" · ");
}
