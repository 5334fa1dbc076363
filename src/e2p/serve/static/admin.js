// Admin-only views: a page of the store's users (metadata from GET /v1/users, never a vector) and the 2-D map of
// their embeddings (GET /v1/users/map: coordinates computed on the server), with the chosen users highlighted.

import { call } from "./api.js";

const SVG = "http://www.w3.org/2000/svg";  // the SVG namespace name, not a URL that is fetched

export async function loadUsers(prefix, after) {
  const query = new URLSearchParams({ limit: "20" });
  if (prefix) query.set("prefix", prefix);
  if (after) query.set("after", after);
  return call("GET", `/v1/users?${query}`);
}

export function renderUsers(tbody, page, chosen, onPick) {
  tbody.replaceChildren();
  for (const row of page.data) {
    const tr = document.createElement("tr");
    const updated = new Date(row.updated_at * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
    for (const value of [row.user, row.version, row.dim, updated]) {
      const td = document.createElement("td");
      td.textContent = String(value);
      tr.append(td);
    }
    const td = document.createElement("td");
    const button = document.createElement("button");
    button.type = "button";
    const picked = chosen.has(row.user);
    button.textContent = picked ? "Drop" : "Pick";
    button.setAttribute("aria-label", `${picked ? "Drop" : "Pick"} user ${row.user}`);
    button.dataset.user = row.user;  // so a redraw can give focus back to the same row's button
    button.addEventListener("click", () => onPick(row.user));
    td.append(button);
    tr.append(td);
    tbody.append(tr);
  }
}

export async function loadMap() {
  return call("GET", "/v1/users/map?limit=2000");
}

// One Tab stop for the whole map (a roving tabindex): Tab reaches the map once, the arrow keys move between its
// points, Enter or Space picks or drops the focused one. `focusUser`: the point that holds the Tab stop.
export function renderMap(svg, map, chosen, onPick, focusUser = null) {
  svg.replaceChildren();
  const stop = map.points.some((p) => p.user === focusUser) ? focusUser
    : (map.points.find((p) => chosen.has(p.user)) || map.points[0] || {}).user;
  const [width, height, pad] = [320, 220, 14];
  const xs = map.points.map((p) => p.x);
  const ys = map.points.map((p) => p.y);
  const [x0, x1] = [Math.min(...xs, 0), Math.max(...xs, 0)];
  const [y0, y1] = [Math.min(...ys, 0), Math.max(...ys, 0)];
  const sx = (x) => pad + ((x - x0) / (x1 - x0 || 1)) * (width - 2 * pad);
  const sy = (y) => height - pad - ((y - y0) / (y1 - y0 || 1)) * (height - 2 * pad);
  const later = [];
  for (const point of map.points) {
    const circle = document.createElementNS(SVG, "circle");
    circle.setAttribute("cx", sx(point.x).toFixed(1));
    circle.setAttribute("cy", sy(point.y).toFixed(1));
    circle.setAttribute("r", chosen.has(point.user) ? "6" : "3.5");
    circle.setAttribute("class", chosen.has(point.user) ? "point chosen" : "point");
    circle.dataset.user = point.user;
    const title = document.createElementNS(SVG, "title");
    title.textContent = point.user;
    circle.append(title);
    circle.setAttribute("tabindex", point.user === stop ? "0" : "-1");
    circle.setAttribute("role", "button");
    circle.setAttribute("aria-label", `${chosen.has(point.user) ? "drop" : "pick"} user ${point.user}`);
    circle.addEventListener("click", () => onPick(point.user));
    circle.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); onPick(point.user); return; }
      const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[event.key];
      if (!step) return;
      event.preventDefault();
      const all = [...svg.querySelectorAll("circle.point")];
      const next = all[(all.indexOf(circle) + step + all.length) % all.length];
      for (const c of all) c.setAttribute("tabindex", c === next ? "0" : "-1");
      next.focus();
    });
    if (chosen.has(point.user)) later.push([circle, point]);
    else svg.append(circle);
  }
  for (const [circle, point] of later) {  // chosen users on top, with their ids
    const label = document.createElementNS(SVG, "text");
    const left = sx(point.x) > width * 0.7;  // near the right edge: the id goes to the left of its point
    label.setAttribute("x", (sx(point.x) + (left ? -8 : 8)).toFixed(1));
    label.setAttribute("text-anchor", left ? "end" : "start");
    label.setAttribute("y", (sy(point.y) + 4).toFixed(1));
    label.setAttribute("class", "point-label");
    label.textContent = point.user;
    svg.append(circle, label);
  }
  const share = map.explained_variance.map((v) => `${(v * 100).toFixed(0)}%`).join(" / ");
  const caption = document.createElementNS(SVG, "text");
  caption.setAttribute("x", String(pad));
  caption.setAttribute("y", String(height - 2));
  caption.setAttribute("class", "map-caption");
  caption.textContent = `${map.shown} of ${map.total} users · variance on x / y ${share}`;
  svg.append(caption);
}
