// The source folders import in one direction: model at the ground; stats, data; the engine; analysis and train;
// io; study; cli and index on top. A file may import from its own layer or below, never above, and no chain of
// files imports back to where it started.
import * as fs from "node:fs";
import * as path from "node:path";
import { describe, expect, it } from "vitest";

const RANK: Record<string, number> = {
  model: 0,
  stats: 1,
  data: 2,
  engine: 3,
  analysis: 4,
  train: 4,
  io: 5,
  "worker.ts": 6,
  "parallel.ts": 6,
  "protocol.ts": 6,
  "study.ts": 6,
  "cli.ts": 7,
  "cli-flags.ts": 7,
  "index.ts": 7,
};

function sourceFiles(dir: string): string[] {
  return fs
    .readdirSync(dir, { withFileTypes: true })
    .flatMap((e) =>
      e.isDirectory() ? sourceFiles(path.join(dir, e.name)) : e.name.endsWith(".ts") ? [path.join(dir, e.name)] : [],
    );
}

/** The layer of a file under src/: its top folder, or its own name at the top. */
const layerOf = (file: string): string => path.relative("src", file).split(path.sep)[0]!;

/** Relative imports (static and dynamic, type-only included) of a source file, resolved to src/ paths. */
function importsOf(file: string): string[] {
  const text = fs.readFileSync(file, "utf8");
  const specs = [...text.matchAll(/(?:from|import\()\s*["'](\.[^"']+)["']/g)].map((m) => m[1]!);
  return specs.map((s) => path.normalize(path.join(path.dirname(file), s.replace(/\.js$/, ".ts"))));
}

/** The import cycles of a graph (file → files it imports), each as the path around it. */
function cyclesOf(graph: Map<string, string[]>): string[] {
  const state = new Map<string, "open" | "done">();
  const cycles: string[] = [];
  const visit = (f: string, trail: string[]): void => {
    if (state.get(f) === "done") return;
    if (state.get(f) === "open") return void cycles.push([...trail.slice(trail.indexOf(f)), f].join(" → "));
    state.set(f, "open");
    for (const t of graph.get(f) ?? []) visit(t, [...trail, f]);
    state.set(f, "done");
  };
  for (const f of graph.keys()) visit(f, []);
  return cycles;
}

describe("layering", () => {
  const files = sourceFiles("src");

  it("every source file belongs to a known layer", () => {
    for (const f of files) expect(RANK[layerOf(f)], f).toBeTypeOf("number");
  });

  it("no file imports from a layer above its own", () => {
    const upward: string[] = [];
    for (const f of files) {
      for (const target of importsOf(f)) {
        if (!fs.existsSync(target)) upward.push(`${f} imports missing ${target}`);
        else if (RANK[layerOf(target)]! > RANK[layerOf(f)]!) upward.push(`${f} → ${target}`);
      }
    }
    expect(upward).toEqual([]);
  });

  it("no import cycles between files (type-only imports included)", () => {
    expect(cyclesOf(new Map(files.map((f) => [path.normalize(f), importsOf(f)])))).toEqual([]);
  });

  it("the cycle check finds a planted cycle, and none in a chain", () => {
    expect(
      cyclesOf(
        new Map([
          ["a", ["b"]],
          ["b", ["c"]],
          ["c", ["a"]],
          ["d", ["a"]],
        ]),
      ),
    ).toEqual(["a → b → c → a"]);
    expect(
      cyclesOf(
        new Map([
          ["a", ["b"]],
          ["b", ["c"]],
          ["d", ["b", "c"]],
        ]),
      ),
    ).toEqual([]);
  });

  it("the import scan sees real imports (so an empty list of upward imports means something)", () => {
    expect(importsOf("src/analysis/scoring.ts")).toContain(path.normalize("src/model/llama.ts"));
    expect(importsOf("src/index.ts").length).toBeGreaterThan(20);
    expect(importsOf("src/index.ts").some((t) => layerOf(t) === "cli.ts")).toBe(false);
  });
});
