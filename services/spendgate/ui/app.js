// spendgate dashboard (issue 17): plain JavaScript, no build step, no external requests.
// The token lives in sessionStorage (this tab only) and goes in the Authorization header only.
"use strict";

const TOKEN_KEY = "spendgate.token";
const POLL_MS = 3000;       // how often the current page is refreshed
const STALE_MS = 10000;     // no successful refresh for this long: the page says it is stale
const PAGE_SIZE = 50;

const $ = (sel) => document.querySelector(sel);
let lastOk = 0;             // time of the last successful refresh (ms)
let gateHealth = null;      // the overview's health block, when known
let pollTimer = null;
let renderSeq = 0;          // a refresh for a page the user left is dropped

function esc(text) {
  return String(text ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const resp = await fetch(path, { headers: { Authorization: `Bearer ${token}`, Accept: "application/json" } });
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const err = body.error || {};
    throw new ApiError(resp.status, err.code || "error", err.message || `HTTP ${resp.status}`);
  }
  return body;
}

// --- sign-in ------------------------------------------------------------------------------------

function signinMessage(err) {
  if (err.status === 401) return "This token is not valid: it is unknown or has been revoked. Check it and try again.";
  if (err.status === 403) return `This token may not open the dashboard: ${err.message}`;
  return `Could not reach spendgate (${err.message}). Try again.`;
}

async function signIn(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    await api("/v1/spend/overview?limit=1");
  } catch (err) {
    sessionStorage.removeItem(TOKEN_KEY);
    showSignin(signinMessage(err));
    return;
  }
  if (!location.hash || location.hash === "#/signin") history.replaceState(null, "", "#/overview");
  start();
}

function showSignin(message) {
  stopPolling();
  $("#page").hidden = true; $("#nav").hidden = true; $("#signout").hidden = true;
  $("#signin").hidden = false;
  $("#freshness").textContent = "";
  $("#signin-error").textContent = message || "";
  $("#token").value = "";
  $("#token").focus();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  showSignin(message);
}

// --- routing and polling -----------------------------------------------------------------------

function route() {
  const [path, query] = (location.hash.replace(/^#/, "") || "/overview").split("?");
  const params = new URLSearchParams(query || "");
  if (path.startsWith("/scope/")) {
    let scope = path.slice(7);
    try { scope = decodeURIComponent(scope); } catch (_) { /* shown as typed; the API says what is wrong */ }
    return { page: "scope", scope, params };
  }
  if (path === "/top") return { page: "top", params };
  return { page: "overview", params };
}

const PAGES = { overview: renderOverview, scope: renderScope, top: renderTop };

// A poll while the same page is still loading is skipped (a slow answer is never thrown away
// by the next poll); a navigation supersedes whatever is in flight.
let inFlight = null;
async function refresh(fromPoll) {
  const key = location.hash;
  if (fromPoll === true && inFlight === key) return;
  const seq = ++renderSeq;
  inFlight = key;
  const r = route();
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === r.page));
  try {
    const html = await PAGES[r.page](r);
    if (seq !== renderSeq) return;
    if (html !== null) patch(html);
    lastOk = Date.now();
  } catch (err) {
    if (seq !== renderSeq) return;
    if (err instanceof ApiError && err.status === 401) { signOut(signinMessage(err)); return; }
    if (err instanceof ApiError && (err.status === 403 || err.status === 404 || err.status === 422)) {
      patch(`<p class="error" role="alert" data-testid="page-error">${esc(refusal(err, r))}</p>`);
      lastOk = Date.now();
    }
    // other errors (network, 5xx): keep what is shown; the freshness line turns stale
  } finally {
    if (seq === renderSeq) inFlight = null;
  }
  freshness();
}

function refusal(err, r) {
  const what = r.page === "scope" ? `scope ${r.scope}` : "this page";
  if (err.status === 403) return `You may not open ${what}: ${err.message}`;
  return `Cannot show ${what}: ${err.message}`;
}

function patch(html) {
  const page = $("#page");
  const focused = document.activeElement && document.activeElement.id;
  const caret = focused && document.activeElement.selectionStart;
  page.innerHTML = html;
  wire(page);
  if (focused) {
    const el = document.getElementById(focused);
    if (el) { el.focus(); if (caret != null && el.setSelectionRange) el.setSelectionRange(caret, caret); }
  }
  tick();
}

function freshness() {
  const el = $("#freshness");
  if (!lastOk) { el.textContent = "loading…"; return; }
  const age = Date.now() - lastOk;
  const parts = [];
  const stale = age > STALE_MS;
  parts.push(stale ? `STALE: last update ${Math.round(age / 1000)} s ago` : `updated ${Math.round(age / 1000)} s ago`);
  if (gateHealth && gateHealth.degraded) parts.push("gate degraded");
  el.textContent = parts.join(" · ");
  el.classList.toggle("stale", stale || Boolean(gateHealth && gateHealth.degraded));
}

function startPolling() {
  stopPolling();
  pollTimer = setInterval(() => refresh(true), POLL_MS);
}
function stopPolling() { if (pollTimer) clearInterval(pollTimer); pollTimer = null; }

function start() {
  $("#signin").hidden = true; $("#page").hidden = false; $("#nav").hidden = false; $("#signout").hidden = false;
  refresh(false);
  startPolling();
}

// --- countdowns (updated every second, from the resets_at the API gave) ------------------------

function countdownText(resetsAt) {
  const ms = Date.parse(resetsAt) - Date.now();
  if (!(ms > 0)) return "unblocking now";
  let s = Math.floor(ms / 1000);
  const d = Math.floor(s / 86400); s -= d * 86400;
  const h = Math.floor(s / 3600); s -= h * 3600;
  const m = Math.floor(s / 60); s -= m * 60;
  const pad = (n) => String(n).padStart(2, "0");
  return `unblocks in ${d ? d + "d " : ""}${pad(h)}:${pad(m)}:${pad(s)}`;
}

function tick() {
  document.querySelectorAll("[data-resets-at]").forEach((el) => { el.textContent = countdownText(el.dataset.resetsAt); });
  freshness();
}

// --- pages ------------------------------------------------------------------------------------

function scopeLink(scope) {
  return `<a href="#/scope/${encodeURIComponent(scope)}" data-scope="${esc(scope)}">${esc(scope)}</a>`;
}

function pctBar(pct) {
  const n = Math.min(100, Number(pct));
  return `<span class="bar${n >= 100 ? " hot" : ""}"><span style="width:${n}%"></span></span>`;
}

async function renderOverview(r) {
  const offset = Math.max(0, parseInt(r.params.get("offset") || "0", 10) || 0);
  const q = r.params.get("q") || "";
  const data = await api(`/v1/spend/overview?offset=${offset}&limit=${PAGE_SIZE}${q ? "&q=" + encodeURIComponent(q) : ""}`);
  gateHealth = data.health;
  const h = data.health;
  const rows = data.items.map((it) => `
    <tr class="${it.blocked ? "blocked" : ""}" data-testid="overview-row">
      <td>${scopeLink(it.scope)}</td>
      <td>${it.blocked ? `<span class="badge blocked">BLOCKED</span> ${it.resets_at ? `<span class="countdown" data-resets-at="${esc(it.resets_at)}"></span>` : ""}`
                        : `<span class="badge ok">allowed</span>`}
          ${it.soft_crossed ? ' <span class="badge soft">soft limit</span>' : ""}</td>
      <td>${esc(it.window || "")}</td>
      <td class="num">$${esc(it.spend_usd)}</td>
      <td class="num">${it.limit_usd === null ? "" : "$" + esc(it.limit_usd)}</td>
      <td class="num">${esc(it.used_pct)}%</td><td>${pctBar(it.used_pct)}</td>
    </tr>`).join("");
  const last = Math.min(offset + PAGE_SIZE, data.total);
  return `
    <h1>Overview</h1>
    <div class="cards">
      <div class="card ${h.degraded ? "bad" : "ok"}" data-testid="gate-health"><div class="n">${h.degraded ? "degraded" : "healthy"}</div>
        <div class="l">gate (fail mode ${esc(h.fail_mode)}${h.ready ? "" : ", catching up"})</div></div>
      <div class="card ${h.state_lag_ms > h.max_staleness_ms ? "bad" : ""}"><div class="n" data-testid="state-lag">${esc(h.state_lag_ms)} ms</div><div class="l">state lag</div></div>
      <div class="card"><div class="n" data-testid="budgeted-count">${esc(data.total)}</div><div class="l">budgeted scopes</div></div>
      <div class="card ${data.blocked ? "bad" : ""}"><div class="n" data-testid="blocked-count">${esc(data.blocked)}</div><div class="l">blocked</div></div>
      <div class="card ${data.soft_crossed ? "warn" : ""}"><div class="n">${esc(data.soft_crossed)}</div><div class="l">over a soft limit</div></div>
    </div>
    <div class="toolbar">
      <input id="overview-q" placeholder="filter scopes (e.g. team:ml)" value="${esc(q)}" data-testid="overview-filter">
      <button id="prev" ${offset <= 0 ? "disabled" : ""} data-offset="${Math.max(0, offset - PAGE_SIZE)}">‹ previous</button>
      <span class="muted" data-testid="overview-range">${data.total ? offset + 1 : 0}–${last} of ${data.total}</span>
      <button id="next" ${last >= data.total ? "disabled" : ""} data-offset="${offset + PAGE_SIZE}">next ›</button>
    </div>
    <table data-testid="overview-table">
      <thead><tr><th>scope</th><th>status</th><th>window</th><th class="num">spend</th><th class="num">limit</th>
        <th class="num">used</th><th></th></tr></thead>
      <tbody>${rows || '<tr><td colspan="7" class="muted">no budgeted scope</td></tr>'}</tbody>
    </table>`;
}

// A scope's text is "kind:part[/part]" with each part percent-encoded (CONTRACT §1): it goes into
// the API path as it is. Anything else from the URL fragment (a "?", a "#", a ".." segment) could
// send this token to another API path: refused here.
const SCOPE_TEXT = /^[a-z_]+:[^?#\s]*$/;

async function renderScope(r) {
  const scope = r.scope;
  if (!SCOPE_TEXT.test(scope) || scope.split("/").some((part) => part === ".." || part === ".")) {
    throw new ApiError(422, "invalid", "not a scope (kind:id, e.g. team:t1)");
  }
  const path = `/v1/spend/${scope}`;
  const [now, hourly, daily] = await Promise.all([
    api(path), api(`${path}/series?bucket=1h`), api(`${path}/series?bucket=1d`),
  ]);
  const windows = now.windows.map((w) => `
    <tr><td>${esc(w.window)}</td><td class="num">$${esc(w.spend_usd)}</td>
      <td class="num">${w.limit_usd === null ? "—" : "$" + esc(w.limit_usd)}</td>
      <td class="num">${w.soft_usd === null ? "—" : "$" + esc(w.soft_usd)}</td>
      <td class="num">${w.remaining_usd === null ? "—" : "$" + esc(w.remaining_usd)}</td>
      <td>${w.resets_at ? esc(w.resets_at) : "never"}</td></tr>`).join("");
  const blockedWindows = now.blocked
    ? now.windows.filter((w) => w.limit_usd !== null && Number(w.spend_usd) >= Number(w.limit_usd) && w.resets_at) : [];
  const unblockAt = blockedWindows.map((w) => w.resets_at).sort().pop();
  const status = now.blocked
    ? `<span class="badge blocked" data-testid="scope-status">BLOCKED</span>
       ${unblockAt ? `<span class="countdown" data-testid="countdown" data-resets-at="${esc(unblockAt)}"></span>` : ""}`
    : `<span class="badge ok" data-testid="scope-status">allowed</span>`;
  const children = hourly.children.length
    ? `<table data-testid="children"><thead><tr><th>scope below</th><th class="num">spend, last 48 h</th></tr></thead><tbody>
        ${hourly.children.map((c) => `<tr><td>${scopeLink(c.scope)}</td><td class="num">$${esc(c.spend_usd)}</td></tr>`).join("")}
       </tbody></table>`
    : '<p class="muted">No spend below this scope in the last 48 hours.</p>';
  return `
    <p><a href="#/overview">‹ overview</a></p>
    <h1 data-testid="scope-title">${esc(scope)} ${status}</h1>
    <table><thead><tr><th>window</th><th class="num">spend</th><th class="num">limit</th><th class="num">soft</th>
      <th class="num">remaining</th><th>resets at</th></tr></thead><tbody>${windows}</tbody></table>
    <h2>Hourly, last 48 hours <span class="muted">($${esc(hourly.range_usd)})</span></h2>
    ${chart(hourly, "1h")}
    <h2>Daily, last 90 days <span class="muted">($${esc(daily.range_usd)})</span></h2>
    ${chart(daily, "1d")}
    <p class="legend">Bars: spend per hour / day (UTC, by when the spend was published).
      Line: spend so far in the UTC day (hourly chart) or month (daily chart).
      Dashed: the budget's limits (red) and soft limits (orange). Shaded: blocked.</p>
    <h2>Breakdown</h2>
    ${children}`;
}

// --- a plain SVG chart -------------------------------------------------------------------------

function chartLimits(limits, bucket) {
  // limits comparable with this chart: hourly shows minute/hour/1-day windows, daily the longer ones
  return limits.filter((l) => {
    const m = /^(\d+)(m|h|d|w|mo)$/.exec(l.window);
    if (!m) return false; // total: a lifetime limit is not comparable with a bucket
    if (bucket === "1h") return m[2] === "m" || m[2] === "h" || (m[2] === "d" && m[1] === "1");
    return m[2] === "d" || m[2] === "w" || m[2] === "mo";
  });
}

function chart(series, bucket) {
  const W = 1100, H = 200, L = 56, B = 22, T = 16;
  const pts = series.points;
  const n = pts.length || 1;
  const vals = pts.map((p) => Number(p.spend_usd));
  const cum = []; let run = 0, prevKey = null;
  pts.forEach((p, i) => {
    const key = bucket === "1h" ? p.start.slice(0, 10) : p.start.slice(0, 7);
    if (key !== prevKey) { run = 0; prevKey = key; }
    run += vals[i]; cum.push(run);
  });
  const limits = chartLimits(series.limits, bucket);
  const top = Math.max(1e-9, ...vals, ...cum, ...limits.map((l) => Number(l.max_usd)));
  const x = (i) => L + (i * (W - L - 4)) / n;
  const y = (v) => T + (H - T - B) * (1 - v / top);
  const t0 = Date.parse(series.from), t1 = Date.parse(series.to);
  const xt = (iso) => L + ((Math.min(Math.max(Date.parse(iso), t0), t1) - t0) / (t1 - t0)) * (W - L - 4);
  const bw = Math.max(1, (W - L - 4) / n - 1);
  const shades = series.blocked_periods.map((b) =>
    `<rect class="blk" x="${xt(b.from)}" y="${T}" width="${Math.max(2, xt(b.to || series.to) - xt(b.from))}" height="${H - T - B}"></rect>`).join("");
  const bars = vals.map((v, i) => v > 0 ? `<rect class="barr" x="${x(i)}" y="${y(v)}" width="${bw}" height="${H - B - y(v)}"><title>${esc(pts[i].start)}: $${esc(pts[i].spend_usd)}</title></rect>` : "").join("");
  const line = `<polyline class="cum" points="${cum.map((v, i) => `${x(i) + bw / 2},${y(v)}`).join(" ")}"></polyline>`;
  const lims = limits.flatMap((l) => {
    const out = [`<line class="lim" x1="${L}" x2="${W - 4}" y1="${y(Number(l.max_usd))}" y2="${y(Number(l.max_usd))}"></line>
      <text x="${W - 8}" y="${y(Number(l.max_usd)) - 3}" text-anchor="end">${esc(l.window)} limit $${esc(l.max_usd)}</text>`];
    if (l.soft_usd !== null) out.push(`<line class="soft" x1="${L}" x2="${W - 4}" y1="${y(Number(l.soft_usd))}" y2="${y(Number(l.soft_usd))}"></line>`);
    return out;
  }).join("");
  const step = Math.max(1, Math.ceil(n / 8));
  const labels = pts.map((p, i) => i % step === 0
    ? `<text x="${x(i)}" y="${H - 6}">${esc(bucket === "1h" ? p.start.slice(5, 13).replace("T", " ") + "h" : p.start.slice(5, 10))}</text>` : "").join("");
  const axis = `<text x="4" y="${T + 8}">$${esc(fmt(top))}</text><text x="4" y="${H - B}">$0</text>`;
  return `<svg class="chart" data-testid="chart-${bucket}" viewBox="0 0 ${W} ${H}" width="100%" role="img"
    aria-label="spend per ${bucket === "1h" ? "hour" : "day"}">${shades}${bars}${line}${lims}${labels}${axis}</svg>`;
}

function fmt(v) { return v >= 100 ? v.toFixed(0) : v >= 1 ? v.toFixed(2) : v.toPrecision(2); }

const KINDS = ["key", "user", "team", "member", "end_user", "model", "key_model", "tag", "org"];
const WINDOWS = ["1h", "1d", "7d", "30d", "90d", "total"];

async function renderTop(r) {
  const kind = KINDS.includes(r.params.get("kind")) ? r.params.get("kind") : "key";
  const windowName = WINDOWS.includes(r.params.get("window")) ? r.params.get("window") : "1d";
  const data = await api(`/v1/spend/top?kind=${kind}&window=${windowName}&limit=25`);
  const max = Math.max(1e-12, ...data.items.map((i) => Number(i.spend_usd)));
  const rows = data.items.map((it, i) => `<tr data-testid="top-row"><td class="num">${i + 1}</td><td>${scopeLink(it.scope)}</td>
    <td class="num">$${esc(it.spend_usd)}</td><td>${pctBar((Number(it.spend_usd) / max) * 100)}</td></tr>`).join("");
  const opt = (list, cur) => list.map((v) => `<option ${v === cur ? "selected" : ""}>${v}</option>`).join("");
  return `
    <h1>Top spenders</h1>
    <div class="toolbar">
      <label>kind <select id="top-kind" data-testid="top-kind">${opt(KINDS, kind)}</select></label>
      <label>window <select id="top-window" data-testid="top-window">${opt(WINDOWS, windowName)}</select></label>
      <span class="muted">${data.from ? "since " + esc(data.from) : "lifetime"} (UTC)</span>
    </div>
    <table data-testid="top-table"><thead><tr><th class="num">#</th><th>scope</th><th class="num">spend</th><th></th></tr></thead>
      <tbody>${rows || '<tr><td colspan="4" class="muted">no spend in this window</td></tr>'}</tbody></table>`;
}

// --- events -----------------------------------------------------------------------------------

let filterTimer = null;
function wire(page) {
  const q = page.querySelector("#overview-q");
  if (q) q.addEventListener("input", () => {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(() => { location.hash = `#/overview?q=${encodeURIComponent(q.value)}`; }, 250);
  });
  page.querySelectorAll("#prev, #next").forEach((b) => b.addEventListener("click", () => {
    const params = route().params; params.set("offset", b.dataset.offset);
    location.hash = `#/overview?${params}`;
  }));
  const kind = page.querySelector("#top-kind"), win = page.querySelector("#top-window");
  const go = () => { location.hash = `#/top?kind=${kind.value}&window=${win.value}`; };
  if (kind) { kind.addEventListener("change", go); win.addEventListener("change", go); }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#signin-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = $("#token").value.trim();
    if (!token) { showSignin("Paste a token first."); return; }
    signIn(token);
  });
  $("#signout").addEventListener("click", () => signOut("Signed out."));
  window.addEventListener("hashchange", () => { if (sessionStorage.getItem(TOKEN_KEY)) refresh(false); });
  setInterval(tick, 1000);
  if (sessionStorage.getItem(TOKEN_KEY)) start(); else showSignin("");
});
