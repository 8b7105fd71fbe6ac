// The dashboard. Everything shown comes from the daemon through the app's commands:
//   invoke("app_state")                     → {link, tray, autostart}   (the app's own view)
//   invoke("daemon_call", {method, params}) → the daemon's JSON-RPC result (docs/protocol.md)
//   invoke("start_daemon")                  → spawns tilewised when it is not running
// and live updates arrive as the "daemon-event" (one protocol event) and "link-state" events.
// Nothing polls: the page refreshes on an event, on reconnect, and when it becomes visible again.
"use strict";
const T = window.__TAURI__;
const $ = (id) => document.getElementById(id);
const MAX_EVENTS = 100;
const state = { events: [], eventsLoaded: false, lastRefresh: 0, pending: null, connected: false, status: null };

const call = (method, params) => T.core.invoke("daemon_call", { method, params: params ?? null });

/** Calls a method; an error becomes {error} so one missing method never blanks the whole page. */
async function tryCall(method, params) {
  try { return { ok: await call(method, params) }; } catch (e) { return { error: errText(e) }; }
}
function errText(e) {
  if (e && typeof e === "object") return e.message || JSON.stringify(e);
  return String(e);
}
function h(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v); else e[k] = v;
  }
  for (const k of kids.flat()) if (k !== null && k !== undefined) e.append(k instanceof Node ? k : String(k));
  return e;
}
/** A standing notice about the current state (redrawn on every refresh). */
function notice(text, kind, action) {
  const n = h("div", { class: `notice ${kind || ""}` }, text);
  if (action) n.append(" ", action);
  $("notices").append(n);
}
/** A failed action: stays until dismissed or for 20 s, across refreshes. */
function alertError(text) {
  const close = h("button", { class: "close", title: "Dismiss", onclick: () => a.remove() }, "×");
  const a = h("div", { class: "notice error", "data-testid": "alert" }, text, " ", close);
  $("alerts").append(a);
  setTimeout(() => a.remove(), 20000);
}

// ---- device -------------------------------------------------------------------------------------
/** The device card: the probe's `Device` (daemon/src/probe/mod.rs) as served in status.device. */
function renderDevice(status) {
  const d = status.device || {};
  const dl = $("device");
  dl.replaceChildren();
  const row = (label, value, key) => {
    if (value === undefined || value === null || value === "") return;
    dl.append(h("dt", {}, label), h("dd", { "data-key": key }, value));
  };
  const chip = [d.chip, d.variant && d.family && !String(d.chip || "").includes(d.variant) ? d.variant : null].filter(Boolean).join(" ");
  row("Chip", chip || `${d.os || "?"} ${d.arch || ""}`.trim(), "chip");
  row("CPU cores", coresText(d), "cores");
  if (d.gpu_cores !== undefined && d.gpu_cores !== null) row("GPU cores", d.gpu_cores, "gpu_cores");
  if (d.nvidia) row("GPU", `${d.nvidia.name}${d.nvidia.memory_bytes ? ", " + fmt.bytes(d.nvidia.memory_bytes) : ""}`, "gpu");
  row("Caches", cacheText(d), "caches");
  row("Memory", typeof d.memory_bytes === "number" ? fmt.bytes(d.memory_bytes) : null, "memory");
  row("Bandwidth", typeof d.memory_bandwidth_gbs === "number" ? `${d.memory_bandwidth_gbs.toFixed(0)} GB/s` : "unknown", "bandwidth");
  row("Backend", d.backend, "backend");
  row("OS", [d.os, d.arch].filter(Boolean).join(" / "), "os");
  row("Fingerprint", h("span", { class: "mono", title: status.device_fingerprint || "" }, status.device_fingerprint || "—"), "fingerprint");
}
/** "4 performance + 4 efficiency" (Apple) or "2" (one level), from the probe's perf levels. */
function coresText(d) {
  if (typeof d.p_cores !== "number") return null;
  if (d.e_cores > 0) return `${d.p_cores} performance + ${d.e_cores} efficiency`;
  const logical = (d.perf_levels || []).reduce((n, l) => n + (l.logical_cores || 0), 0);
  return `${d.p_cores}` + (logical && logical !== d.p_cores ? ` (${logical} threads)` : "");
}
/** "P: L1d 128 KiB, L2 16 MiB · E: ..." from each perf level's caches, plus the cache line. */
function cacheText(d) {
  const levels = (d.perf_levels || []).map((l) => {
    const parts = [];
    if (typeof l.l1d_bytes === "number") parts.push(`L1d ${fmt.bytes(l.l1d_bytes)}`);
    if (typeof l.l2_bytes === "number") parts.push(`L2 ${fmt.bytes(l.l2_bytes)}` + (l.cpus_per_l2 > 1 ? ` per ${l.cpus_per_l2} CPUs` : ""));
    return parts.length ? ((d.perf_levels.length > 1 ? `${l.name}: ` : "") + parts.join(", ")) : null;
  }).filter(Boolean);
  if (typeof d.cache_line_bytes === "number") levels.push(`line ${d.cache_line_bytes} B`);
  return levels.join(" · ") || null;
}

// ---- tuning / session ---------------------------------------------------------------------------
function renderTuning(status) {
  const t = status.tuning || {};
  const pill = $("tuning");
  const label = { idle: "Idle", tuning: "Tuning", paused: "Paused" }[t.state] || t.state || "—";
  pill.textContent = label + (t.reason ? ` — ${t.reason}` : "");
  pill.className = "pill " + ({ tuning: "busy", paused: "paused" }[t.state] || "");
  $("start-tuning").disabled = t.state === "tuning";
  $("stop-tuning").disabled = t.state !== "tuning" && t.state !== "paused";
}

// ---- usage -------------------------------------------------------------------------------------
/** "3 processes, 2 models" from status.processes (live processes that fetched a policy). */
function processesText(processes) {
  if (!processes || !processes.length) return "No process using the plugin runs now.";
  const pids = new Set(processes.map((p) => p.pid)), models = new Set(processes.map((p) => p.model));
  const n = (k, one, many) => `${k} ${k === 1 ? one : many}`;
  return `${n(pids.size, "process", "processes")}, ${n(models.size, "model", "models")} running now.`;
}
/** The last path component of a model name (`/models/Qwen2.5-0.5B` → `Qwen2.5-0.5B`). */
function shortName(name) {
  const parts = String(name || "").replace(/\/+$/, "").split("/");
  return parts[parts.length - 1] || name;
}
/** The models card: models.list (every model seen) with status.processes (which run now). */
function renderUsage(models, error, processes) {
  $("usage-summary").textContent = error ? `models: ${error}` : processesText(processes);
  const body = $("models").querySelector("tbody");
  body.replaceChildren();
  for (const m of (models && models.models) || []) {
    const running = (processes || []).filter((p) => p.model === m.fingerprint);
    const u = m.usage || {};
    const used = u.reports ? `${u.generations} generations${u.main_batch ? `, mostly batch ${u.main_batch}` : ""}` : "no usage reported";
    const served = m.best ? `best ${fmt.pct(m.best.ratio)} (${m.best.hash.slice(0, 15)}…)` : "native, not tuned yet";
    body.append(h("tr", { "data-model": m.fingerprint },
      h("td", { title: `${m.name || ""}\n${m.fingerprint}` }, m.name ? shortName(m.name) : m.fingerprint),
      h("td", {}, m.dtype || "—"),
      h("td", {}, used),
      h("td", { "data-key": "served" }, served),
      h("td", { "data-key": "running" }, running.length ? running.map((p) => `pid ${p.pid ?? "?"}`).join(", ") : "—")));
  }
}

/** Picks the session to show: the one status names, else the most recent (highest id). */
function pickSession(status, list) {
  const sessions = (list && list.sessions) || [];
  const id = status.tuning && status.tuning.session_id;
  return sessions.find((s) => s.id === id) || sessions.reduce((a, b) => (!a || b.id > a.id ? b : a), null);
}

/** The session card: `session.show` (Session, its best, its candidates) plus status.tuning.detail. */
function renderSession(show, error, tuning) {
  const box = $("session");
  box.replaceChildren();
  if (error) { box.append(h("p", { class: "muted" }, error)); return; }
  if (!show) { box.append(h("p", { class: "muted" }, "No session yet. Start tuning to begin one.")); return; }
  const s = show.session || {};
  const dl = h("dl");
  const row = (label, v, key) => { if (v !== undefined && v !== null && v !== "") dl.append(h("dt", {}, label), h("dd", { "data-key": key }, v)); };
  const detail = (tuning && tuning.session_id === s.id && tuning.detail) || {};
  const generation = detail.generation ?? sessionGeneration(show);
  row("Session", s.id, "session_id");
  row("State", s.state + (s.reason ? ` — ${s.reason}` : ""), "state");
  row("Model", h("span", { class: "mono", title: s.model }, short(s.model)), "model");
  row("MLX", s.mlx && `${s.mlx} (${s.backend})`, "mlx");
  row("Generation", generation, "generation");
  const budget = s.budget || {};
  row("Evaluations", budget.evaluations ? `${s.evaluations} / ${budget.evaluations}` : s.evaluations, "evaluations");
  row("Failed", s.failures, "failures");
  row("Promotions", s.promotions, "promotions");
  row("Shape memo", show.memo_size, "memo_size");
  const llm = show.search && show.search.llm;
  if (llm && llm.requests) row("LLM", llmSummary(llm), "llm");
  row("Started", fmt.toDate(s.created_at) ? fmt.toDate(s.created_at).toLocaleString() : s.created_at, "started_at");
  box.append(dl);
  if (budget.evaluations > 0) {
    const bar = h("div");
    bar.style.width = `${Math.min(100, (100 * s.evaluations) / budget.evaluations)}%`;
    box.append(h("div", { class: "progress", "data-testid": "session-progress" }, bar));
  }
  const best = show.best || detail.best;
  if (best && typeof best.ratio === "number") {
    box.append(h("div", { class: "big " + (best.lo > 1 ? "good" : ""), "data-testid": "session-best" },
      fmt.pctInterval(best.ratio, best.lo, best.hi)));
    box.append(h("div", { class: "muted" }, show.best ? "promoted: proven faster than stock" : "best so far (not promoted)"));
  } else {
    box.append(h("div", { class: "muted", "data-testid": "session-best" }, "nothing proven faster than stock yet"));
  }
}
/** "3 requests (1 failed), 2 used, 4 refused: code proposals are not run 3, bad JSON block 1". */
function llmSummary(llm) {
  const refused = Object.entries(llm.refused || {}).sort((a, b) => b[1] - a[1]).map(([r, n]) => `${r} ${n}`);
  let text = `${llm.requests} request${llm.requests === 1 ? "" : "s"}`;
  if (llm.requests_failed) text += ` (${llm.requests_failed} failed)`;
  text += `, ${llm.valid || 0} used`;
  if (llm.screened) text += `, ${llm.screened} screened out`;
  if (refused.length) text += `, ${llm.invalid} refused: ${refused.join(", ")}`;
  return text;
}
/** The session's generation: the search's own counter, else the highest among its candidates. */
function sessionGeneration(show) {
  if (show.search && typeof show.search.generation === "number") return show.search.generation;
  const gens = (show.candidates || []).map((c) => c.generation).filter((g) => typeof g === "number");
  return gens.length ? Math.max(...gens) : null;
}
/** "sha256:0123456789ab…" for long fingerprints. */
function short(s) { return typeof s === "string" && s.length > 24 ? s.slice(0, 19) + "…" : s; }

// ---- policy -------------------------------------------------------------------------------------
function renderPolicy(got, error) {
  const tbody = $("rules").querySelector("tbody");
  tbody.replaceChildren();
  $("policy-what").replaceChildren();
  $("policy-source").textContent = got ? got.source : "";
  // Where a served policy came from: proven by a session here, or imported and verified here.
  const origin = got && got.source === "best" && got.evidence ? got.evidence.origin : null;
  $("policy-origin").textContent = got && got.source === "best" ? (origin ? "imported · verified here" : "proven here") : "";
  $("policy-origin").title = origin || "";
  if (error || !got) { $("policy-summary").textContent = error || "No model has been tuned yet."; return; }
  const p = got.policy || {}, ev = got.evidence;
  const summary = [h("span", { class: "mono" }, got.hash)];
  if (ev) summary.push(` · ${fmt.pctInterval(ev.ratio, ev.lo, ev.hi)} (session ${ev.session_id})`);
  if (got.reason) summary.push(` · ${got.reason}`);
  $("policy-summary").replaceChildren(...summary);
  // What it changes and what each workload measured (the daemon's summary; the policy's own fusion
  // for promotions recorded before summaries existed).
  const what = ev && ev.summary ? ev.summary.text : fmt.fusion(p);
  if (what) $("policy-what").append(h("div", { "data-testid": "policy-what-text" }, what));
  if (origin) $("policy-what").append(h("div", { class: "muted", "data-testid": "policy-origin-text" }, origin));
  const workloads = (ev && ev.summary && ev.summary.workloads) || {};
  const measured = ["decode", "prefill", "inference", "training"].filter((k) => workloads[k])
    .map((k) => `${k} ${fmt.pctInterval(workloads[k].ratio, workloads[k].lo, workloads[k].hi)}`);
  if (measured.length) $("policy-what").append(h("div", { class: "muted", "data-testid": "policy-measured" }, measured.join(" · ")));
  const rules = (p.matmul && p.matmul.rules) || [];
  rules.forEach((r, i) => tbody.append(h("tr", { "data-rule": i },
    h("td", {}, i + 1), h("td", {}, fmt.range(r.m)), h("td", {}, fmt.range(r.n)), h("td", {}, fmt.range(r.k)),
    h("td", { class: "mono" }, fmt.plan(r.plan)))));
  const def = p.matmul && p.matmul.default;
  tbody.append(h("tr", { "data-rule": "default" }, h("td", {}, "—"), h("td", { colSpan: 3, class: "muted" }, "every other matmul"),
    h("td", { class: "mono" }, fmt.plan(def))));
  const extra = [];
  if (p.generation && p.generation.prefill_step_size) extra.push(`prefill step ${p.generation.prefill_step_size}`);
  if (p.training && p.training.loss_chunk_tokens) extra.push(`loss chunk ${p.training.loss_chunk_tokens} tokens`);
  if (extra.length) $("policy-summary").append(" · " + extra.join(", "));
}

// ---- charts -------------------------------------------------------------------------------------
/** Points for "best speedup over time": every entry of `history` (HistoryEntry), oldest first — a
 * promotion, a re-measurement of the served policy, or a demotion (the point is then what is served
 * again: the previous best, or native at 1.0). */
function speedupPoints(history) {
  const label = (p) => {
    const hash = String(p.hash).slice(0, 15);
    if (p.kind === "remeasure") return `re-measured ${hash} (${p.reason || "later"})`;
    if (p.kind === "demotion") return `demoted ${String(p.replaced_hash).slice(0, 15)}: ${p.reason || ""}; serving ${hash}`;
    return `promoted ${hash} (session ${p.session_id ?? "—"})`;
  };
  return ((history && history.promotions) || [])
    .map((p) => ({ t: fmt.toDate(p.at), ratio: p.ratio, lo: p.lo, hi: p.hi, label: label(p) }))
    .filter((p) => p.t && typeof p.ratio === "number").sort((a, b) => a.t - b.t);
}
/** The current session's measured candidates (correct ones), as faint points behind the promotions. */
function candidatePoints(show) {
  const measured = (c) => c.measurement || (show.search && show.search.measurements && show.search.measurements[c.id]);
  return ((show && show.candidates) || [])
    .map((c) => ({ c, m: measured(c) }))
    .filter(({ m }) => m && m.correct && typeof m.ratio === "number")
    .map(({ c, m }) => ({ t: fmt.toDate(m.at), ratio: m.ratio, lo: m.lo, hi: m.hi, label: `candidate ${c.id} (gen ${c.generation}, ${c.origin})` }))
    .filter((p) => p.t).sort((a, b) => a.t - b.t);
}
/**
 * Per-shape rows from the shape memo entries that session.show carries as `memo` (MemoEntry: m, n, k,
 * dtype, plan, stock_median_s, plan_median_s): for each shape, stock time and the fastest measured plan.
 */
function shapeRows(show) {
  const byShape = new Map();
  for (const e of (show && (show.memo || (show.search && show.search.memo))) || []) {
    const key = `${e.m}×${e.n}×${e.k} ${e.dtype}`;
    const row = byShape.get(key) || { label: key, native: e.stock_median_s, best: null, plan: null };
    if (e.plan && e.plan.kind !== "native" && (row.best === null || e.plan_median_s < row.best)) {
      row.best = e.plan_median_s; row.native = e.stock_median_s; row.plan = e.plan;
    }
    byShape.set(key, row);
  }
  return [...byShape.values()];
}

// ---- events -------------------------------------------------------------------------------------
function eventSummary(ev) {
  const d = ev.data || {};
  if (typeof d.ratio === "number") return fmt.pctInterval(d.ratio, d.lo, d.hi) + (d.hash ? ` ${d.hash.slice(0, 15)}` : "");
  if (d.client) return d.client;
  if (d.reason) return d.reason;
  if (d.error) return d.error;
  const s = JSON.stringify(d);
  return s === "{}" ? "" : s.slice(0, 160);
}
function renderEvents() {
  $("events").replaceChildren(...state.events.map((ev) => h("li", { "data-kind": ev.kind, "data-id": ev.id },
    h("span", { class: "muted" }, fmt.clock(ev.at)), h("span", { class: "kind" }, ev.kind),
    h("span", { class: "mono" }, (ev.session_id ? `session ${ev.session_id} · ` : "") + eventSummary(ev)))));
}
function addEvent(ev) {
  if (state.events.some((e) => e.id === ev.id && ev.id !== undefined)) return;
  // Newest first by id: stored events (events.list) and live ones may arrive in either order.
  state.events.push(ev);
  state.events.sort((a, b) => (b.id ?? 0) - (a.id ?? 0));
  state.events.length = Math.min(state.events.length, MAX_EVENTS);
  renderEvents();
}

// ---- the page -----------------------------------------------------------------------------------
function renderLink(app) {
  const link = app.link || {};
  state.connected = !!link.connected;
  const pill = $("link");
  if (state.connected) {
    pill.textContent = `tilewised ${link.version || ""} · pid ${link.pid ?? "?"}`;
    pill.className = "pill ok";
  } else {
    pill.textContent = "daemon not running";
    pill.className = "pill bad";
    $("start-tuning").disabled = $("stop-tuning").disabled = true;
  }
}

async function refresh() {
  state.lastRefresh = Date.now();
  const app = await T.core.invoke("app_state");
  $("notices").replaceChildren();
  renderLink(app);
  if (app.tray && !app.tray.available) notice(`No menu-bar icon: ${app.tray.reason}. This window stays open instead.`);
  if (!state.connected) {
    const b = h("button", { class: "primary", onclick: startDaemon }, "Start it");
    notice(`tilewised is not running${app.link && app.link.error ? ` (${app.link.error})` : ""}.`, "error", b);
    showTitle("tilewise — daemon not running");
    return;
  }
  const status = await tryCall("status");
  if (status.error) { notice(`status failed: ${status.error}`, "error"); return; }
  state.status = status.ok;
  renderDevice(status.ok);
  renderTuning(status.ok);
  const models = await tryCall("models.list");
  renderUsage(models.ok, models.error, status.ok.processes);
  $("footer").textContent = `daemon up ${fmt.duration(status.ok.uptime_s)} · home ${status.ok.home} · db ${status.ok.db ? status.ok.db.path : "—"}`;

  if (!state.eventsLoaded) {
    // What happened before this window opened (live ones arrive as daemon-event; addEvent dedupes).
    const recent = await tryCall("events.list", { limit: MAX_EVENTS });
    if (recent.ok) {
      state.eventsLoaded = true;
      for (const ev of recent.ok.events) addEvent(ev);
    }
  }
  const [history, list] = await Promise.all([tryCall("history", { limit: 200 }), tryCall("session.list")]);
  const current = list.ok ? pickSession(status.ok, list.ok) : null;
  let show = null, showErr = list.error;
  if (current) {
    const r = await tryCall("session.show", { session_id: current.id });
    show = r.ok || null; showErr = r.error;
  }
  renderSession(show, showErr, status.ok.tuning);
  // The policy shown is the one served for the session's target (or the last promoted target).
  const target = (show && show.session) || (history.ok && history.ok.promotions && history.ok.promotions[0]);
  if (target && target.model) {
    const got = await tryCall("policy.get", { model: target.model, mlx: target.mlx, backend: target.backend, device: target.device });
    renderPolicy(got.ok, got.error);
  } else {
    renderPolicy(null, null);
  }
  charts.speedup($("speedup-chart"), speedupPoints(history.ok), candidatePoints(show));
  charts.shapes($("shape-chart"), shapeRows(show));
  if (history.error) $("speedup-chart").append(h("p", { class: "muted" }, `history: ${history.error}`));
  document.body.dataset.loaded = String(state.lastRefresh);
  showTitle(`tilewise — ${$("tuning").textContent}`);
}

/**
 * The window title carries the state ("tilewise — Tuning"), so it shows in window lists, and tells
 * scripts (the smoke test) that the page has drawn the daemon's data. In the app this goes through
 * Tauri's window API; in a browser it is the document title.
 */
function showTitle(text) {
  document.title = text;
  const win = T.window && T.window.getCurrentWindow ? T.window.getCurrentWindow() : null;
  if (win) win.setTitle(text).catch(() => {});
}

/** Coalesces bursts of events into one refresh; skipped while the page is hidden. */
function scheduleRefresh(delay = 250) {
  if (document.hidden || state.pending) return;
  state.pending = setTimeout(() => { state.pending = null; refresh().catch(showFatal); }, delay);
}
function showFatal(e) { alertError(`dashboard error: ${errText(e)}`); }

async function startDaemon() {
  try { await T.core.invoke("start_daemon"); } catch (e) { alertError(`could not start tilewised: ${errText(e)}`); }
  scheduleRefresh(50);
}

async function main() {
  $("start-tuning").onclick = async () => {
    const r = await tryCall("tuning.start", { now: true }); // "now": past the idle gate
    if (r.error) alertError(`could not start tuning: ${r.error}`);
    scheduleRefresh(50);
  };
  $("stop-tuning").onclick = async () => {
    const r = await tryCall("tuning.stop", {});
    if (r.error) alertError(`could not pause: ${r.error}`);
    scheduleRefresh(50);
  };
  await T.event.listen("daemon-event", (e) => { addEvent(e.payload); scheduleRefresh(); });
  await T.event.listen("link-state", () => scheduleRefresh(50));
  // A tray action that failed (e.g. the daemon refused config.set): say so here too.
  await T.event.listen("app-error", (e) => alertError(`menu action failed: ${e.payload}`));
  document.addEventListener("visibilitychange", () => { if (!document.hidden) scheduleRefresh(0); });
  await refresh().catch(showFatal);
}
main();
