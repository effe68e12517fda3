/**
 * An environment variable, read only if env access to it is already granted: never prompts, never
 * needs --allow-env, never touches `Deno` where there is none (a browser). Empty or blank values
 * read as undefined.
 */
export function readEnvIfGranted(name: string): string | undefined {
  const deno = (globalThis as { Deno?: typeof Deno }).Deno;
  if (!deno?.permissions?.querySync) return undefined;
  try {
    if (envAccess(name) !== "granted") return undefined;
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
  if (granted.has(name)) return "granted";
  try {
    if (deno.permissions.querySync({ name: "env", variable: name }).state !== "granted") {
      return "no-permission";
    }
    granted.add(name);
    return "granted";
  } catch {
    return "no-permission";
  }
}

/**
 * Variables whose access was found granted: a query costs about 15 µs, and the router reads a few
 * per call. (A grant revoked later makes `Deno.env.get` throw, which reads as unset.)
 */
const granted = new Set<string>();
