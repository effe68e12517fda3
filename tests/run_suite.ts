/**
 * `deno task test:deno`: `deno test` on the suite (arguments passed on), its output shown as it
 * comes. One fault is told apart: the test process aborting at exit (SIGABRT, glibc's "corrupted
 * size vs. prev_size" in a native library's teardown) after its summary reported every test passed.
 * Seen on Deno's engine with Mesa 22's lavapipe in about one full run in four (2026-12-03; never in
 * a single file's run, never with a failing test), it happens after the last test's result is
 * known, in native code wgattn does not own. It is reported on stderr and does not fail the run;
 * anything else (a failed test, a crash before the summary) fails it with the child's code.
 */
const args = Deno.args.length > 0 ? Deno.args : ["tests/"];
const child = new Deno.Command(Deno.execPath(), {
  args: ["test", "--allow-env", "--allow-read", "--allow-write", "--allow-run", "--allow-ffi", ...args],
  stdout: "piped",
  stderr: "inherit",
}).spawn();
let tail = "";
const decoder = new TextDecoder();
for await (const chunk of child.stdout) {
  await Deno.stdout.write(chunk);
  tail = (tail + decoder.decode(chunk, { stream: true })).slice(-4096);
}
const status = await child.status;
// deno test's summary: "ok | 653 passed | 0 failed | 175 ignored (58s)", colours stripped.
const plain = tail.replace(new RegExp(String.fromCharCode(27) + "\\[[0-9;]*m", "g"), "");
const passedAll = /^ok \| \d+ passed \| 0 failed/m.test(plain);
if (!status.success && status.signal === "SIGABRT" && passedAll) {
  console.error(
    "test:deno: every test passed; the test process then aborted at exit (SIGABRT in a native " +
      "library's teardown, see tests/run_suite.ts): not counted as a failure",
  );
  Deno.exit(0);
}
Deno.exit(status.code);
