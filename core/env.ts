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

/**
 * Whether {@link readEnvIfGranted} may read `name`: `granted`, `no-permission` (Deno without env
 * access to it: whether it is set cannot be known, and wgattn never prompts), or `no-env` (no `Deno`).
 */
export function envAccess(name: string): "granted" | "no-permission" | "no-env" {
  const deno = (globalThis as { Deno?: typeof Deno }).Deno;
  if (!deno?.permissions?.querySync) return "no-env";
  try {
    return deno.permissions.querySync({ name: "env", variable: name }).state === "granted"
      ? "granted"
      : "no-permission";
  } catch {
    return "no-permission";
  }
}
