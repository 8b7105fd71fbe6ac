// Pure formatting helpers shared by the dashboard (and unit-tested in ui/tests/format.test.mjs).
"use strict";
(function (root) {
  /** "+3.1 %" for a speedup ratio of 1.031 (median time ratio stock / candidate). */
  function pct(ratio) {
    if (typeof ratio !== "number" || !isFinite(ratio)) return "—";
    const p = (ratio - 1) * 100;
    return (p >= 0 ? "+" : "−") + Math.abs(p).toFixed(1) + " %";
  }
  /** "+3.1 % [+0.8, +5.0]": a ratio with its 95 % interval, the tray's wording. */
  function pctInterval(ratio, lo, hi) {
    const bare = (r) => pct(r).replace(" %", "");
    if (typeof lo !== "number" || typeof hi !== "number") return pct(ratio);
    return `${pct(ratio)} [${bare(lo)}, ${bare(hi)}]`;
  }
  /** An inclusive [lo, hi] range from a policy rule; hi null = unbounded; absent = any. */
  function range(r) {
    if (!Array.isArray(r)) return "any";
    const [lo, hi] = r;
    if (hi === null || hi === undefined) return `≥ ${lo}`;
    if (lo === hi) return `${lo}`;
    return `${lo} – ${hi}`;
  }
  /** A plan in words: "native", "split M×512 N×16384", "gemm 64×64×32, 4 warps"... */
  function plan(p) {
    if (!p || typeof p !== "object") return "—";
    const rest = Object.entries(p).filter(([k, v]) => k !== "kind" && v !== null && v !== undefined);
    if (p.kind === "split") {
      const axes = rest.filter(([k]) => k.startsWith("tile_")).map(([k, v]) => `${k.slice(5).toUpperCase()}×${v}`);
      return axes.length ? `split ${axes.join(" ")}` : "split (no axis)";
    }
    if (!rest.length) return String(p.kind);
    return `${p.kind} ` + rest.map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ");
  }
  function bytes(n) {
    if (typeof n !== "number" || !isFinite(n)) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n : n.toFixed(n >= 10 ? 0 : 1)) + " " + units[i];
  }
  function duration(s) {
    if (typeof s !== "number" || !isFinite(s)) return "—";
    if (s < 60) return `${Math.round(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
    return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  }
  /** Seconds-or-milliseconds timing: 0.00123 s → "1.23 ms". */
  function seconds(s) {
    if (typeof s !== "number" || !isFinite(s)) return "—";
    if (s >= 1) return s.toFixed(2) + " s";
    if (s >= 1e-3) return (s * 1e3).toFixed(2) + " ms";
    return (s * 1e6).toFixed(1) + " µs";
  }
  /** Local time "HH:MM:SS" of an ISO-8601 string or a Unix time (s or ms). */
  function clock(at) {
    const d = toDate(at);
    return d ? d.toLocaleTimeString([], { hour12: false }) : "—";
  }
  function toDate(at) {
    if (at === null || at === undefined) return null;
    if (typeof at === "number") return new Date(at > 1e12 ? at : at * 1000);
    const d = new Date(at);
    return isNaN(d) ? null : d;
  }
  /** [q_proj, k_proj, v_proj] -> "q/k/v" (a suffix all members share is dropped), as the daemon says it. */
  function members(list) {
    const suffix = ["_proj", "_linear", "_dense"].find((s) => list.every((m) => m.endsWith(s)));
    return list.map((m) => (suffix ? m.slice(0, -suffix.length) : m)).join("/");
  }
  /** A policy's fusion in words: "q/k/v fused, gate/up fused" ("" when it fuses nothing). */
  function fusion(policy) {
    const groups = (policy && policy.fusion && policy.fusion.groups) || [];
    const text = groups.map((g) => `${members(g.members)} fused`).join(", ");
    return text && policy.fusion.training === false ? `${text} (inference only)` : text;
  }
  root.fmt = { pct, pctInterval, range, plan, bytes, duration, seconds, clock, toDate, members, fusion };
  if (typeof module !== "undefined") module.exports = root.fmt;
})(typeof window !== "undefined" ? window : globalThis);
