/**
 * A progress bar on stderr for long runs (a kernel's first compile can take seconds on a software
 * adapter): redrawn in place on a terminal, with the current step's elapsed time ticking; one line
 * per step when stderr is a file or a pipe (CI logs), so nothing is lost to carriage returns.
 */

const encoder = new TextEncoder();

function write(text: string): void {
  Deno.stderr.writeSync(encoder.encode(text));
}

function clock(ms: number): string {
  const s = Math.floor(ms / 1000);
  return s < 60 ? `${s}s` : `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
}

/** Progress over a known number of steps. */
export class Progress {
  #total: number;
  #done = 0;
  #label = "";
  #start = performance.now();
  #stepStart = performance.now();
  #timer: ReturnType<typeof setInterval> | undefined;
  #tty: boolean;
  #quiet: boolean;

  /** `quiet` draws nothing (for `--json` to a pipe that only wants the result, or tests). */
  constructor(total: number, options: { quiet?: boolean } = {}) {
    this.#total = total;
    this.#quiet = options.quiet ?? false;
    this.#tty = !this.#quiet && Deno.stderr.isTerminal();
    if (this.#tty) this.#timer = setInterval(() => this.#draw(), 250);
  }

  /** Starts the next step, named `label`. */
  step(label: string): void {
    this.#label = label;
    this.#stepStart = performance.now();
    if (this.#quiet) return;
    if (this.#tty) this.#draw();
    else write(`[${this.#done + 1}/${this.#total}] ${label}\n`);
  }

  /** Marks the current step done. */
  advance(): void {
    this.#done++;
    if (this.#tty) this.#draw();
  }

  /** Clears the bar; call once, at the end (also after an error). */
  end(): void {
    if (this.#timer !== undefined) clearInterval(this.#timer);
    this.#timer = undefined;
    if (this.#tty) write("\r\x1b[2K");
  }

  #draw(): void {
    const width = 24;
    const filled = Math.round((this.#done / Math.max(1, this.#total)) * width);
    const bar = "#".repeat(filled) + ".".repeat(width - filled);
    const columns = (() => {
      try {
        return Deno.consoleSize().columns;
      } catch {
        return 100;
      }
    })();
    const now = performance.now();
    // The times before the label, so that a narrow terminal cuts the label rather than them.
    const text = `[${bar}] ${this.#done}/${this.#total} ${clock(now - this.#start)} ` +
      `(this step ${clock(now - this.#stepStart)})  ${this.#label}`;
    write(`\r\x1b[2K${text.slice(0, columns - 1)}`);
  }
}
