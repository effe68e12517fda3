/** Plain-text tables for the terminal: columns padded to their widest cell, numbers right-aligned. */

/** Renders `rows` under `header`; a cell that looks like a number is right-aligned. */
export function textTable(header: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const numeric = (s: string) => /^[-+]?[\d.]+(e[-+]?\d+)?( ?[a-zµ%/]+)?$/i.test(s) && /\d/.test(s);
  const line = (cells: readonly string[]) =>
    cells.map((c, i) => numeric(c) ? c.padStart(widths[i]) : c.padEnd(widths[i])).join("  ").trimEnd();
  return [line(header), widths.map((w) => "-".repeat(w)).join("  "), ...rows.map(line)].join("\n");
}
