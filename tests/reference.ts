/** The float64 reference lives in conformance/ (the CLI's `check` and the browser test use it too). */
export * from "../conformance/reference.ts";
