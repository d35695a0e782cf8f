// The playground's latency chart, drawn on a <canvas> with no library (the page works offline).
//
// Top panel: one bar per answer, total latency with its time-to-first-token part drawn solid.
// Bottom panel: decode tokens/s of the same answer. Colour = series (model and where it ran), so
// switching models, or the service against the browser, shows the difference at a glance.
// The same records fill an HTML table next to it: the accessible (and testable) form of the data.

const PALETTE = ["#3366cc", "#dc7a12", "#2a9d5b", "#b23a8f", "#7a5cd6", "#c0392b", "#1f8a99", "#8a6d1f"];

export class LatencyChart {
  constructor(canvas, legend, table) {
    this.canvas = canvas;
    this.legend = legend;
    this.table = table;
    this.records = [];
    this.colours = new Map();
    new ResizeObserver(() => this.draw()).observe(canvas);
  }

  colour(series) {
    if (!this.colours.has(series)) {
      this.colours.set(series, PALETTE[this.colours.size % PALETTE.length]);
    }
    return this.colours.get(series);
  }

  add(record) {
    const entry = { n: this.records.length + 1, ...record };
    this.records.push(entry);
    this.colour(entry.series);
    this.addRow(entry);
    this.renderLegend();
    this.draw();
  }

  clear() {
    this.records = [];
    this.colours.clear();
    this.table.tBodies[0].replaceChildren();
    this.renderLegend();
    this.draw();
  }

  addRow(r) {
    const row = this.table.tBodies[0].insertRow();
    const cells = [
      r.n,
      r.series,
      fmtMs(r.ttftMs),
      r.tps == null ? "–" : r.tps.toFixed(1),
      fmtMs(r.totalMs),
      `${r.promptTokens ?? "–"} / ${r.completionTokens ?? "–"}`,
    ];
    for (const value of cells) row.insertCell().textContent = String(value);
    // The raw figures, for anyone (or any test) reading the table rather than the canvas.
    Object.assign(row.dataset, {
      series: r.series,
      finish: r.finish || "",
      ttftMs: r.ttftMs ?? "",
      tps: r.tps ?? "",
      totalMs: r.totalMs ?? "",
      promptTokens: r.promptTokens ?? "",
      completionTokens: r.completionTokens ?? "",
    });
  }

  renderLegend() {
    this.legend.replaceChildren();
    for (const [series, colour] of this.colours) {
      const li = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = colour;
      swatch.setAttribute("aria-hidden", "true");
      li.append(swatch, series);
      this.legend.append(li);
    }
    const n = this.records.length;
    this.canvas.setAttribute(
      "aria-label",
      n === 0
        ? "Latency chart: no answers yet"
        : `Latency chart of ${n} answer${n === 1 ? "" : "s"} across ${this.colours.size} series; the table below has the figures`,
    );
  }

  draw() {
    const canvas = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 320;
    const height = canvas.clientHeight || 260;
    if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
      canvas.width = Math.round(width * dpr);
      canvas.height = Math.round(height * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.font = "11px system-ui, sans-serif";
    const left = 42;
    const right = width - 8;
    const split = Math.round(height * 0.62);
    const top = { y0: 18, y1: split - 16 };
    const bottom = { y0: split + 16, y1: height - 18 };
    if (this.records.length === 0) {
      ctx.fillStyle = "#667";
      ctx.fillText("Answers will appear here.", left, height / 2);
      return;
    }
    const totals = this.records.map((r) => (r.totalMs ?? 0) / 1000);
    const rates = this.records.map((r) => r.tps ?? 0);
    this.axis(ctx, top, left, right, niceMax(Math.max(...totals)), "s", "Latency (solid: TTFT)");
    this.axis(ctx, bottom, left, right, niceMax(Math.max(...rates)), "", "Decode tokens/s");
    const slot = (right - left) / this.records.length;
    const bar = Math.max(2, Math.min(28, slot * 0.7));
    const maxTotal = niceMax(Math.max(...totals));
    const maxRate = niceMax(Math.max(...rates));
    this.records.forEach((r, i) => {
      const x = left + i * slot + (slot - bar) / 2;
      const colour = this.colour(r.series);
      const h = (v, max, panel) => ((panel.y1 - panel.y0) * v) / max;
      const total = (r.totalMs ?? 0) / 1000;
      const ttft = Math.min(total, (r.ttftMs ?? 0) / 1000);
      ctx.globalAlpha = 0.35;
      ctx.fillStyle = colour;
      ctx.fillRect(x, top.y1 - h(total, maxTotal, top), bar, h(total, maxTotal, top));
      ctx.globalAlpha = 1;
      ctx.fillRect(x, top.y1 - h(ttft, maxTotal, top), bar, h(ttft, maxTotal, top));
      if (r.tps) ctx.fillRect(x, bottom.y1 - h(r.tps, maxRate, bottom), bar, h(r.tps, maxRate, bottom));
      if (slot >= 14) {
        ctx.fillStyle = "#445";
        ctx.textAlign = "center";
        ctx.fillText(String(r.n), x + bar / 2, height - 4);
        ctx.textAlign = "left";
      }
    });
  }

  axis(ctx, panel, left, right, max, unit, title) {
    ctx.strokeStyle = "#d5d8de";
    ctx.fillStyle = "#556";
    ctx.lineWidth = 1;
    ctx.textAlign = "left";
    ctx.fillText(title, left, panel.y0 - 6);
    ctx.textAlign = "right";
    for (let k = 0; k <= 4; k += 1) {
      const y = Math.round(panel.y1 - ((panel.y1 - panel.y0) * k) / 4) + 0.5;
      ctx.beginPath();
      ctx.moveTo(left, y);
      ctx.lineTo(right, y);
      ctx.stroke();
      const value = (max * k) / 4;
      ctx.fillText(`${trim(value)}${unit}`, left - 4, y + 3);
    }
    ctx.textAlign = "left";
  }
}

export function fmtMs(ms) {
  if (ms == null) return "–";
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`;
}

function niceMax(value) {
  // The axis top is four round ticks (each 1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 × a power of ten).
  if (!(value > 0)) return 1;
  const tick = value / 4;
  const power = 10 ** Math.floor(Math.log10(tick));
  for (const step of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) {
    if (tick <= step * power) return 4 * step * power;
  }
  return 40 * power;
}

function trim(value) {
  return String(Number(value.toPrecision(3)));
}
