// The playground's wiring: the key, the projector's card, the chosen users, the columns and (for admins) the store
// panel and the map. Everything goes through the server's public API (api.js), as any other client's requests do.

import { ApiError, call, forgetKey, storeKey, storedKey, userPath } from "./api.js";
import { Column } from "./columns.js";
import { loadMap, loadUsers, renderMap, renderUsers } from "./admin.js";

const MAX_USERS = 4;
const MAP_HELP = "PCA of the users' embeddings, computed on the server. Click a point to pick or drop that user; " +
  "keyboard: Tab reaches the map, the arrow keys move between points, Enter or Space picks or drops one.";
const $ = (id) => document.getElementById(id);
const state = { card: null, chosen: new Map(), columns: [], columnsKey: "", running: null, map: null, page: null,
                adminPrefix: "", adminAfter: [], embedded: { text: null, vector: null } };

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function keyTrouble(err) {  // a refused key is the page's problem, not one column's
  if (err instanceof ApiError && err.status === 401) showError(`The server refused the key: ${err.message}`);
  else if (err instanceof ApiError && err.status === 0) showError(err.message);
}

// --- the key and the card ---------------------------------------------------------------------------------
async function useKey(key) {
  storeKey(key);
  showError("");
  $("key-status").textContent = "checking the key…";
  try {
    state.card = await call("GET", "/v1/projector");
  } catch (err) {
    state.card = null;
    $("key-status").textContent = "no valid key yet";
    showError(err.status === 401 ? `The server refused the key: ${err.message}` : err.message);
    setAdmin(false);
    return;
  }
  const who = state.card.caller;
  $("key-status").textContent = `key of tenant ${who.tenant}${who.admin ? " (admin)" : ""}, kept in this tab only`;
  renderCard(state.card);
  setAdmin(who.admin);
}

function fact(dl, name, value) {
  const dt = document.createElement("dt");
  const dd = document.createElement("dd");
  dt.textContent = name;
  dd.textContent = value === null || value === undefined ? "none" : String(value);
  dl.append(dt, dd);
}

function renderCard(card) {
  const dl = $("card-facts");
  dl.replaceChildren();
  fact(dl, "model", card.model);
  fact(dl, "backbone", `${card.backbone} (${card.engine})`);
  if (card.personalized) {
    fact(dl, "prefix", `k = ${card.num_prefix_tokens}, ${card.injection} injection, at ${card.prefix_position}`);
    fact(dl, "embedding", `${card.embedding_dim} values${card.text_encoder ? `, text by ${card.text_encoder}` : ""}`);
  } else {
    fact(dl, "prefix", "none: this server does not personalize (users make no difference)");
  }
  const verdict = $("verdict");
  const report = card.report;
  verdict.className = "verdict " + (report ? (report.carries_person ? "yes" : "no") : "unmeasured");
  verdict.textContent = report ? report.text : `Not measured: ${card.report_note}.`;
  const table = $("intervals");
  const rows = report ? Object.entries(report.comparisons) : [];
  table.tBodies[0].replaceChildren(...rows.map(([name, c]) => {
    const tr = document.createElement("tr");
    const pct = (v) => `${v >= 0 ? "+" : ""}${(v * 100).toFixed(2)}%`;
    for (const text of [name.replace(/^e2p_vs_/, ""), pct(c.relative_change), `[${pct(c.ci95[0])}, ${pct(c.ci95[1])}]`]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    return tr;
  }));
  table.hidden = rows.length === 0;
  $("report-note").textContent = report ? card.report_note : "";
  $("max-tokens").max = String(card.max_tokens_limit);
  if (Number($("max-tokens").value) > card.max_tokens_limit) $("max-tokens").value = String(card.max_tokens_limit);
}

// --- choosing users ---------------------------------------------------------------------------------------
async function userExists(id) {
  if (state.card && state.card.caller.admin) {  // admins: the listing (GET of a user would send its vector)
    const page = await call("GET", `/v1/users?${new URLSearchParams({ prefix: id, limit: "1" })}`);
    return page.data.length > 0 && page.data[0].user === id;
  }
  try {
    await call("GET", userPath(id));  // metadata only for a non-admin key
    return true;
  } catch (err) {
    if (err.status === 404) return false;
    throw err;
  }
}

async function addUser(id) {
  const status = $("pick-status");
  if (!id) return;
  if (state.chosen.has(id)) { status.textContent = `${id} is chosen already`; return; }
  if (state.chosen.size >= MAX_USERS) { status.textContent = `at most ${MAX_USERS} users: remove one first`; return; }
  try {
    if (!(await userExists(id))) { status.textContent = `no stored user ${id}`; return; }
  } catch (err) {
    status.textContent = `cannot check ${id}: ${err.message}`;
    keyTrouble(err);
    return;
  }
  if (state.chosen.size >= MAX_USERS) {  // again: other picks may have landed while this one was checked
    status.textContent = `at most ${MAX_USERS} users: remove one first`;
    return;
  }
  state.chosen.set(id, true);
  status.textContent = `added ${id}`;
  renderChosen();
}

function dropUser(id) {
  state.chosen.delete(id);
  $("pick-status").textContent = `removed ${id}`;
  renderChosen();
}

function toggleUser(id) {
  if (state.chosen.has(id)) dropUser(id);
  else addUser(id);
}

function renderChosen() {
  const list = $("chosen");
  list.replaceChildren(...[...state.chosen.keys()].map((id) => {
    const li = document.createElement("li");
    li.className = "chip";
    li.dataset.user = id;
    const name = document.createElement("span");
    name.textContent = id;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove user ${id}`);
    remove.addEventListener("click", () => { dropUser(id); $("user-id").focus(); });
    li.append(name, remove);
    return li;
  }));
  // a redraw replaces the map's points and the table's buttons: focus goes back to the same user's element
  const active = document.activeElement;
  const focused = active && active.dataset ? active.dataset.user : undefined;
  const where = focused === undefined ? null : active.closest("#map") ? "#map circle" : active.closest("#admin-users") ? "#admin-users button" : null;
  if (state.map) renderMap($("map"), state.map, state.chosen, toggleUser, where === "#map circle" ? focused : null);
  if (state.page) renderUsers($("admin-users").tBodies[0], state.page, state.chosen, toggleUser);
  if (where) {
    const again = [...document.querySelectorAll(where)].find((el) => el.dataset.user === focused);
    if (again) again.focus();
  }
}

let suggestTimer = null;
function suggest() {
  clearTimeout(suggestTimer);
  const prefix = $("user-id").value.trim();
  if (!state.card || !state.card.caller.admin || !prefix) return;
  suggestTimer = setTimeout(async () => {
    try {
      const page = await call("GET", `/v1/users?${new URLSearchParams({ prefix, limit: "10" })}`);
      $("user-suggestions").replaceChildren(...page.data.map((row) => {
        const option = document.createElement("option");
        option.value = row.user;
        return option;
      }));
    } catch (_) {
      // suggestions are a convenience: adding the user reports any problem
    }
  }, 200);
}

// --- admin: the store's users and the map -----------------------------------------------------------------
function setAdmin(on) {
  $("admin-panel").hidden = !on;
  $("map-panel").hidden = !on;
  if (!on) { state.map = null; state.page = null; return; }
  refreshUsers();
  refreshMap();
}

async function refreshUsers() {
  try {
    const after = state.adminAfter[state.adminAfter.length - 1] || "";
    state.page = await loadUsers(state.adminPrefix, after);
    renderUsers($("admin-users").tBodies[0], state.page, state.chosen, toggleUser);
    const from = state.adminAfter.length * 20 + 1;
    $("admin-count").textContent = state.page.data.length
      ? `users ${from}–${from + state.page.data.length - 1}${state.adminPrefix ? ` starting with ${state.adminPrefix}` : ""} (${state.page.total} in the store)`
      : `no users${state.adminPrefix ? ` starting with ${state.adminPrefix}` : ""} (${state.page.total} in the store)`;
    $("admin-next").disabled = !state.page.has_more;
  } catch (err) {
    $("admin-count").textContent = `cannot list users: ${err.message}`;
  }
}

async function refreshMap() {
  try {
    state.map = await loadMap();
    renderMap($("map"), state.map, state.chosen, toggleUser);
    $("map-desc").textContent = MAP_HELP;
  } catch (err) {
    $("map-desc").textContent = `cannot draw the map: ${err.message}`;
  }
}

// --- sending ----------------------------------------------------------------------------------------------
function settings() {
  const seed = $("seed").value.trim();
  return {
    model: state.card.model,
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
    ...(seed === "" ? {} : { seed: Number(seed) }),
  };
}

function columnSpecs(profile) {
  const specs = [...state.chosen.keys()].map((id) => ({
    key: `user:${id}`, title: id, note: "stored embedding, picked by the user field", request: { user: id }, system: null }));
  specs.push({ key: "none", title: "No personalization", note: "no user: the backbone alone", request: {}, system: null });
  if (profile && state.card.personalized && state.card.text_encoder) {
    specs.push({ key: "profile-embedded", title: "Profile, embedded", request: {}, system: null, embed: true,
                 note: `the profile embedded by ${state.card.text_encoder}, sent inline (e2p.embedding)` });
  }
  if (profile) {
    const system = state.card.system_prompt ? `${state.card.system_prompt}\nYour persona: ${profile}` : `Your persona: ${profile}`;
    specs.push({ key: "profile-text", title: "Profile as text", request: {}, system,
                 note: "no embedding: the profile in the system message (e2p eval's text condition)" });
  }
  return specs;
}

function layColumns(specs, profile) {
  const key = JSON.stringify([specs.map((s) => s.key), profile]);
  if (key === state.columnsKey) return;  // the same columns: the chat goes on
  state.columnsKey = key;
  state.columns = specs.map((spec) => new Column(spec));
  $("columns").replaceChildren(...state.columns.map((c) => c.root));
}

async function embedded(profile) {
  if (state.embedded.text !== profile) {
    const answer = await call("POST", "/v1/embeddings", { model: state.card.model, input: profile });
    state.embedded = { text: profile, vector: answer.data[0].embedding };
  }
  return state.embedded.vector;
}

async function sendMessage() {
  const form = $("chat-form");
  if (state.running || !form.reportValidity()) return;
  const typed = $("key").value;
  if (typed !== (storedKey() || "") || !state.card) await useKey(typed);
  if (!state.card) {
    $("columns").replaceChildren();
    state.columnsKey = "";
    return;
  }
  showError("");
  const message = $("message").value.trim();
  const profile = $("profile").value.trim();
  layColumns(columnSpecs(profile), profile);
  const controller = new AbortController();
  state.running = controller;
  $("send").disabled = true;
  $("stop").disabled = false;
  const base = settings();
  const runs = state.columns.map(async (column) => {
    let extra = {};
    if (column.spec.embed) {
      try {
        extra = { e2p: { embedding: await embedded(profile) } };
      } catch (err) {
        column.fail(`cannot embed the profile: ${err.message}`);
        throw err;
      }
    }
    return column.send(message, base, extra, controller.signal);
  });
  const results = await Promise.allSettled(runs);
  for (const r of results) if (r.status === "rejected") keyTrouble(r.reason);
  state.running = null;
  $("send").disabled = false;
  $("stop").disabled = true;
  if (results.some((r) => r.status === "fulfilled")) $("message").value = "";  // a message nobody answered stays
  $("message").focus();
}

// --- wiring -----------------------------------------------------------------------------------------------
function wire() {
  $("key-form").addEventListener("submit", (event) => { event.preventDefault(); useKey($("key").value); });
  $("forget-key").addEventListener("click", () => {
    forgetKey();
    $("key").value = "";
    state.card = null;
    setAdmin(false);
    $("key-status").textContent = "key forgotten: type it again to go on";
  });
  $("pick-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = $("user-id").value.trim();
    $("user-id").value = "";
    addUser(id);
  });
  $("user-id").addEventListener("input", suggest);
  $("chat-form").addEventListener("submit", (event) => { event.preventDefault(); sendMessage(); });
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendMessage();
    }
  });
  $("stop").addEventListener("click", () => state.running && state.running.abort());
  $("new-chat").addEventListener("click", () => { state.columnsKey = ""; $("columns").replaceChildren(); });
  $("admin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.adminPrefix = $("admin-prefix").value.trim();
    state.adminAfter = [];
    refreshUsers();
  });
  $("admin-first").addEventListener("click", () => { state.adminAfter = []; refreshUsers(); });
  $("admin-next").addEventListener("click", () => {
    if (state.page && state.page.next_after) state.adminAfter.push(state.page.next_after);
    refreshUsers();
  });
  $("map-refresh").addEventListener("click", refreshMap);
  const key = storedKey();
  if (key !== null) {
    $("key").value = key;
    useKey(key);
  }
}

wire();
