// The public API: docs/api.md lists, one line each, exactly the names src/index.ts exports.
import * as fs from "node:fs";
import { describe, expect, it } from "vitest";

/** Names exported by src/index.ts (values and types), from its export lists. */
function exportedNames(): string[] {
  const text = fs.readFileSync("src/index.ts", "utf8");
  const names = [...text.matchAll(/export \* as (\w+)/g)].map((m) => m[1]!);
  for (const m of text.matchAll(/export (?:type )?\{([^}]*)\}/g))
    for (const item of m[1]!.split(",")) {
      const name = item
        .trim()
        .replace(/^type\s+/, "")
        .split(/\s+as\s+/)
        .pop()!
        .trim();
      if (name) names.push(name);
    }
  return names;
}

/** Names docs/api.md documents: the backticked names before the dash of each list line. */
function documentedNames(): string[] {
  const lines = fs
    .readFileSync("docs/api.md", "utf8")
    .split("\n")
    .filter((l) => l.startsWith("- `"));
  return lines.flatMap((l) => [...l.split(" — ")[0]!.matchAll(/`([A-Za-z_$][\w$]*)/g)].map((m) => m[1]!));
}

describe("the public API", () => {
  it("docs/api.md lists every exported name once, and nothing that is not exported", () => {
    const exported = exportedNames();
    const documented = documentedNames();
    expect(new Set(exported).size, "src/index.ts exports a name twice").toBe(exported.length);
    expect(
      documented.filter((n, i) => documented.indexOf(n) !== i),
      "documented twice",
    ).toEqual([]);
    expect([...documented].sort()).toEqual([...exported].sort());
    expect(exported.length).toBeGreaterThan(100); // the scan sees the export lists
  });

  it("the package's runtime exports are the value names src/index.ts lists", async () => {
    const mod = await import("../src/index.js");
    const runtime = Object.keys(mod);
    for (const n of runtime) expect(exportedNames(), n).toContain(n);
    for (const n of ["runMargins", "margins", "runAnalysis", "forward", "hookName", "tf"]) expect(runtime).toContain(n);
    for (const internal of ["headGroup", "stackGroup", "WASM_SCRATCH", "keyedNoise", "comboRun", "batchBytes"])
      expect(runtime).not.toContain(internal);
  });
});
