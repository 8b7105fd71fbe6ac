// Inline-SVG charts: no library, a few hundred bytes of markup per chart, themed by style.css.
"use strict";
(function (root) {
  const NS = "http://www.w3.org/2000/svg";
  function el(name, attrs, text) {
    const e = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function svg(w, h) { return el("svg", { viewBox: `0 0 ${w} ${h}`, role: "img" }); }
  function empty(container, message) {
    const s = svg(1000, 60);
    s.appendChild(el("text", { x: 500, y: 35, "text-anchor": "middle", class: "empty" }, message));
    container.replaceChildren(s);
  }
  /** Round "nice" ticks between lo and hi. */
  function ticks(lo, hi, n) {
    const span = hi - lo || 1, step0 = span / n, mag = Math.pow(10, Math.floor(Math.log10(step0)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => span / s <= n) || mag * 10;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-12; v += step) out.push(+v.toFixed(10));
    return out;
  }

  /**
   * Best speedup over time. `points`: the promotions [{t: Date, ratio, lo, hi, label}] — each drawn as a
   * dot with its 95 % interval as a bar, and the running best as a step line. `background`: the
   * session's measured candidates, drawn small and grey (what the search tried). The dashed line at
   * 1.0 is stock speed.
   */
  function speedup(container, points, background = []) {
    if (!points.length && !background.length) return empty(container, "No promoted policy yet: stock MLX is being served.");
    const W = 1000, H = 230, L = 56, R = 14, T = 12, B = 30;
    const s = svg(W, H);
    const all = points.concat(background);
    const ts = all.map((p) => +p.t), t0 = Math.min(...ts), t1 = Math.max(...ts);
    const ys = all.flatMap((p) => [p.ratio, p.lo ?? p.ratio, p.hi ?? p.ratio]).concat([1]);
    let y0 = Math.min(...ys), y1 = Math.max(...ys);
    const pad = (y1 - y0) * 0.12 || 0.02; y0 -= pad; y1 += pad;
    const x = (t) => (t1 === t0 ? (L + W - R) / 2 : L + ((t - t0) / (t1 - t0)) * (W - L - R));
    const y = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
    const digits = y1 - y0 < 0.05 ? 3 : 2;
    for (const v of ticks(y0, y1, 5)) {
      s.appendChild(el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
      s.appendChild(el("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, `${v.toFixed(digits)}×`));
    }
    s.appendChild(el("line", { x1: L, x2: W - R, y1: y(1), y2: y(1), class: "ref" }));
    s.appendChild(el("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
    s.appendChild(el("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
    const fmtT = (t) => fmt.clock(new Date(t));
    s.appendChild(el("text", { x: L, y: H - 10 }, fmtT(t0)));
    if (t1 !== t0) s.appendChild(el("text", { x: W - R, y: H - 10, "text-anchor": "end" }, fmtT(t1)));
    const dot = (p, cls, r, colour, opacity) => {
      const g = el("g", { class: cls, "data-ratio": p.ratio });
      if (typeof p.lo === "number" && typeof p.hi === "number") {
        g.appendChild(el("line", { x1: x(+p.t), x2: x(+p.t), y1: y(p.lo), y2: y(p.hi), stroke: colour, "stroke-width": r - 1, opacity: opacity * 0.4 }));
      }
      g.appendChild(el("circle", { cx: x(+p.t), cy: y(p.ratio), r, fill: colour, opacity }));
      g.appendChild(el("title", {}, `${p.label || ""} ${fmt.pctInterval(p.ratio, p.lo, p.hi)} at ${fmtT(+p.t)}`.trim()));
      s.appendChild(g);
    };
    for (const p of background) dot(p, "candidate", 2.5, "var(--muted)", 0.6);
    if (points.length) {
      // running best of the promotions, as a step line to the right edge
      let best = null, d = "";
      for (const p of points) {
        if (best === null || p.ratio > best) best = p.ratio;
        d += (d ? ` H${x(+p.t)} V${y(best)}` : `M${x(+p.t)} ${y(best)}`);
      }
      d += ` H${W - R}`;
      s.appendChild(el("path", { d, fill: "none", stroke: "var(--blue)", "stroke-width": 1.5, opacity: 0.6 }));
    }
    for (const p of points) dot(p, "point", 4, "var(--blue)", 1);
    const legend = points.length ? "● promotions (blue), ● measured candidates (grey)" : "● measured candidates — none promoted yet";
    s.appendChild(el("text", { x: L + 8, y: T + 12 }, legend));
    container.replaceChildren(s);
  }

  /**
   * Per-shape timings: for each matmul shape, a pair of bars (stock, fastest measured plan), in seconds.
   * rows: [{label, native, best}] (either time may be missing).
   */
  function shapes(container, rows) {
    if (!rows.length) return empty(container, "No per-shape timings measured yet.");
    const rowH = 30, L = 190, R = 130, T = 22, W = 1000, H = T + rows.length * rowH + 8;
    const s = svg(W, H);
    const max = Math.max(...rows.flatMap((r) => [r.native || 0, r.best || 0])) || 1;
    const w = (v) => (v / max) * (W - L - R);
    s.appendChild(el("rect", { x: L, y: 4, width: 10, height: 10, fill: "var(--muted)" }));
    s.appendChild(el("text", { x: L + 14, y: 13 }, "native"));
    s.appendChild(el("rect", { x: L + 70, y: 4, width: 10, height: 10, fill: "var(--orange)" }));
    s.appendChild(el("text", { x: L + 84, y: 13 }, "fastest measured plan"));
    rows.forEach((r, i) => {
      const y0 = T + i * rowH;
      const g = el("g", { class: "shape", "data-label": r.label });
      g.appendChild(el("text", { x: L - 8, y: y0 + 16, "text-anchor": "end", class: "mono" }, r.label));
      if (typeof r.native === "number") {
        g.appendChild(el("rect", { x: L, y: y0 + 2, width: Math.max(w(r.native), 1), height: 11, fill: "var(--muted)" }));
        g.appendChild(el("text", { x: L + w(r.native) + 4, y: y0 + 12 }, fmt.seconds(r.native)));
      }
      if (typeof r.best === "number") {
        g.appendChild(el("rect", { x: L, y: y0 + 14, width: Math.max(w(r.best), 1), height: 11, fill: "var(--orange)" }));
        const sp = typeof r.native === "number" ? ` (${(r.native / r.best).toFixed(2)}×)` : "";
        g.appendChild(el("text", { x: L + w(r.best) + 4, y: y0 + 24 }, fmt.seconds(r.best) + sp));
      }
      s.appendChild(g);
    });
    container.replaceChildren(s);
  }
  root.charts = { speedup, shapes, ticks };
})(window);
