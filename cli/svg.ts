/**
 * A grouped bar chart as a standalone SVG, written by hand (no dependency): one group per shape and
 * dtype, one bar per backend, a y axis with round ticks, axis labels, a legend, and each bar's value
 * above it. Series keep one colour across groups; wgattn's backends take the saturated colours and
 * PyTorch's (names starting with `torch `) the muted ones.
 */

/** One bar. */
export interface Bar {
  series: string;
  value: number;
  /** Outlined and flagged: the router's choice. */
  marked?: boolean;
}

/** What the chart shows. */
export interface BenchChart {
  title: string;
  subtitle: string;
  groups: { label: string; sublabel: string; bars: Bar[] }[];
  /** Default `TFLOP/s`. */
  yLabel?: string;
}

const OURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#17becf", "#bcbd22", "#8c564b", "#e377c2", "#d62728"];
const THEIRS = ["#6b6b6b", "#9467bd", "#a6a6a6", "#c5b0d5", "#404040", "#dbb2a8"];

function esc(s: string): string {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

/** Round tick step for a range: 1, 2 or 5 times a power of ten, about five ticks. */
function tickStep(max: number): number {
  const raw = max / 5;
  const p = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 5, 10].map((m) => m * p).find((s) => s >= raw)!;
}

function fmt(x: number): string {
  if (x >= 100) return x.toFixed(0);
  if (x >= 10) return x.toFixed(1);
  if (x >= 0.1) return x.toFixed(2);
  return x.toPrecision(2);
}

/** Rough width of text in the chart's sans-serif font. */
const textWidth = (s: string, size: number) => s.length * size * 0.56;

/** The chart as SVG text. */
export function chartSvg(c: BenchChart): string {
  const series: string[] = [];
  for (const g of c.groups) for (const b of g.bars) if (!series.includes(b.series)) series.push(b.series);
  let ours = 0, theirs = 0;
  const colour = new Map(
    series.map((
      s,
    ) => [s, s.startsWith("torch ") ? THEIRS[theirs++ % THEIRS.length] : OURS[ours++ % OURS.length]]),
  );

  const barW = 18, gap = 26, left = 64, right = 16, plotH = 300;
  const groupW = c.groups.map((g) =>
    Math.max(g.bars.length * barW, textWidth(g.label, 12), textWidth(g.sublabel, 10)) + gap
  );
  const titles = Math.max(textWidth(c.title, 16) * 1.1, textWidth(c.subtitle, 11));
  const plotW = Math.max(480, titles, groupW.reduce((a, b) => a + b, 0));
  const width = left + plotW + right;

  // Legend rows, wrapped to the chart's width.
  const items = [...series.map((s) => ({ text: s, swatch: colour.get(s)! })), {
    text: "outlined ▼: the router's choice",
    swatch: "",
  }];
  const legendRows: { x: number; text: string; swatch: string }[][] = [[]];
  let x = left;
  for (const it of items) {
    const w = 18 + textWidth(it.text, 11) + 16;
    if (x + w > width - right && legendRows[legendRows.length - 1].length) {
      legendRows.push([]);
      x = left;
    }
    legendRows[legendRows.length - 1].push({ x, ...it });
    x += w;
  }
  const top = 58 + legendRows.length * 18 + 24;
  const height = top + plotH + 64;

  // A log axis once the values span more than 20x (tensor-core PyTorch beside WGSL, decode beside
  // prefill): on a linear one the small bars would vanish.
  const values = c.groups.flatMap((g) => g.bars.map((b) => b.value)).filter((v) => v > 0);
  const max = Math.max(1e-9, ...values), min = Math.min(max, ...values);
  const log = max / min > 20;
  const ticks: { v: number; label: boolean }[] = [];
  let y: (v: number) => number;
  if (log) {
    const lo = Math.floor(Math.log10(min)), hi = Math.ceil(Math.log10(max * 1.6));
    y = (v: number) => top + plotH - ((Math.log10(v) - lo) / (hi - lo)) * plotH;
    for (let e = lo; e <= hi; e++) {
      ticks.push({ v: 10 ** e, label: true });
      if (e < hi) ticks.push({ v: 2 * 10 ** e, label: false }, { v: 5 * 10 ** e, label: false });
    }
  } else {
    // Headroom for the value labels above the tallest bar.
    const step = tickStep(max * 1.25);
    const yMax = Math.ceil((max * 1.25) / step) * step;
    y = (v: number) => top + plotH - (v / yMax) * plotH;
    for (let i = 0; i * step <= yMax + step / 2; i++) ticks.push({ v: i * step, label: true });
  }
  const tickText = (v: number) => log ? (v >= 1 ? String(v) : String(+v.toPrecision(1))) : fmt(v);

  const out: string[] = [];
  out.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" ` +
      `font-family="Helvetica, Arial, sans-serif" role="img" aria-label="${esc(c.title)}">`,
  );
  out.push(`<rect width="${width}" height="${height}" fill="#ffffff"/>`);
  out.push(`<text x="${left}" y="26" font-size="16" font-weight="bold" fill="#222">${esc(c.title)}</text>`);
  out.push(`<text x="${left}" y="46" font-size="11" fill="#555">${esc(c.subtitle)}</text>`);
  legendRows.forEach((row, r) => {
    const ly = 58 + r * 18 + 10;
    for (const it of row) {
      out.push(
        it.swatch
          ? `<rect x="${it.x}" y="${ly - 9}" width="12" height="12" fill="${it.swatch}"/>`
          : `<rect x="${it.x}" y="${
            ly - 9
          }" width="12" height="12" fill="#fff" stroke="#111" stroke-width="1.5"/>`,
      );
      out.push(`<text x="${it.x + 18}" y="${ly + 1}" font-size="11" fill="#222">${esc(it.text)}</text>`);
    }
  });

  // Grid and y axis.
  ticks.forEach(({ v, label }, i) => {
    const gy = y(v).toFixed(1);
    out.push(
      `<line x1="${left}" x2="${left + plotW}" y1="${gy}" y2="${gy}" stroke="${
        i === 0 ? "#333" : label ? "#dddddd" : "#f0f0f0"
      }"/>`,
    );
    if (label) {
      out.push(
        `<text x="${left - 6}" y="${(+gy + 4).toFixed(1)}" font-size="11" text-anchor="end" fill="#333">${
          tickText(v)
        }</text>`,
      );
    }
  });
  out.push(`<line x1="${left}" x2="${left}" y1="${top}" y2="${top + plotH}" stroke="#333"/>`);
  const mid = top + plotH / 2;
  out.push(
    `<text x="16" y="${mid}" font-size="12" text-anchor="middle" fill="#222" transform="rotate(-90 16 ${mid})">${
      esc(`${c.yLabel ?? "TFLOP/s"}${log ? " (log scale)" : ""}`)
    }</text>`,
  );

  // Bars, values, group labels.
  let gx = left;
  c.groups.forEach((g, i) => {
    const w = groupW[i];
    const start = gx + (w - g.bars.length * barW) / 2;
    g.bars.forEach((b, j) => {
      if (log && !(b.value > 0)) return;
      const bx = start + j * barW;
      const by = y(b.value), bh = top + plotH - by;
      const stroke = b.marked ? ` stroke="#111" stroke-width="1.5"` : "";
      out.push(
        `<rect x="${(bx + 1).toFixed(1)}" y="${by.toFixed(1)}" width="${barW - 2}" height="${
          Math.max(0.5, bh).toFixed(1)
        }" ` +
          `fill="${colour.get(b.series)}"${stroke}><title>${
            esc(`${g.label} ${g.sublabel}: ${b.series} ${fmt(b.value)}`)
          }</title></rect>`,
      );
      const cx = bx + barW / 2;
      let ly = by - 4;
      if (b.marked) {
        out.push(`<path d="M${cx - 4} ${by - 10}h8l-4 6z" fill="#111"/>`);
        ly -= 10;
      }
      out.push(
        `<text x="${cx.toFixed(1)}" y="${ly.toFixed(1)}" font-size="9" fill="#333" ` +
          `transform="rotate(-90 ${cx.toFixed(1)} ${ly.toFixed(1)})" dy="3">${fmt(b.value)}</text>`,
      );
    });
    const lx = (gx + w / 2).toFixed(1);
    out.push(
      `<text x="${lx}" y="${top + plotH + 18}" font-size="12" text-anchor="middle" fill="#222">${
        esc(g.label)
      }</text>`,
    );
    out.push(
      `<text x="${lx}" y="${top + plotH + 32}" font-size="10" text-anchor="middle" fill="#666">${
        esc(g.sublabel)
      }</text>`,
    );
    gx += w;
  });
  out.push(
    `<text x="${left + plotW / 2}" y="${
      height - 10
    }" font-size="12" text-anchor="middle" fill="#222">shape and dtype (b batch, n heads, s sequence, d head dim)</text>`,
  );
  out.push("</svg>");
  return out.join("\n") + "\n";
}
