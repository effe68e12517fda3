/**
 * An environment variable, read only if env access to it is already granted: never prompts, never
 * needs --allow-env, never touches `Deno` where there is none (a browser). Empty or blank values
 * read as undefined.
 */
export function readEnvIfGranted(name: string): string | undefined {
  const deno = (globalThis as { Deno?: typeof Deno }).Deno;
  if (!deno?.permissions?.querySync) return undefined;
  try {
    if (deno.permissions.querySync({ name: "env", variable: name }).state !== "granted") return undefined;
    const value = deno.env.get(name)?.trim();
    return value ? value : undefined;
  } catch {
    return undefined;
  }
}
