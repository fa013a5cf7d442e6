// Shared test helpers: backend selection and array comparison.
import { spawnSync } from "node:child_process";
import * as path from "node:path";
import { beforeAll, expect } from "vitest";
import { tempDir } from "./tempdirs.js";
import { backendKind, initBackend } from "../src/model/backend.js";
import { nativeMatMulActive, nativeStatus } from "../src/model/native.js";
import { backendCopies, loadModelSync } from "../src/io/model.js";
import { loadConfig } from "../src/io/config.js";
import { layerBytesOf } from "../src/io/stream.js";
import { loadPairs } from "../src/io/pairs.js";
import type { Pair } from "../src/data/pairs.js";
import { disposeModel, type LlamaModel } from "../src/model/llama.js";

/**
 * The backend the suite runs on: PREFPROBE_BACKEND when set (CI runs the suite with native, then with wasm),
 * else native where the native matmul is built, else wasm.
 */
export const TEST_BACKEND: string = process.env.PREFPROBE_BACKEND || (nativeStatus().ok ? "native" : "wasm");

/** Runs this test file on the named backend (TEST_BACKEND unless told otherwise). */
export function useBackend(name = TEST_BACKEND): void {
  beforeAll(async () => {
    await initBackend(name);
    if (backendKind() !== name) throw new Error(`wanted backend ${name}, got ${backendKind()}`);
  });
}

/** Largest |a[i] − b[i]| over two equal-length arrays (throws on a length mismatch). */
export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} vs ${b.length}`);
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i]! - b[i]!);
    if (!(d <= m)) m = Number.isNaN(d) ? Infinity : d;
  }
  return m;
}

/** Flattens nested number arrays row-major. */
export const flat = (x: number[][]): number[] => x.flat();

/** Runs the compiled CLI (built by `npm test` before vitest) with arguments; returns exit code and output. */
export function runCli(...args: string[]): { code: number | null; out: string; err: string } {
  const r = spawnSync(process.execPath, [path.resolve("dist/src/cli.js"), ...args], { encoding: "utf8" });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

/** A fresh temporary folder. */
/** A memory budget that holds the model's head and `layers` layers: every other layer is brought in when needed. */
export function budgetFor(dir: string, layers: number): number {
  const cfg = loadConfig(dir);
  return backendCopies() * (4 * (cfg.vocabSize + 1) * cfg.hiddenSize + layers * layerBytesOf(cfg) + 1);
}

/** A new temporary folder, removed after the test file (tempdirs.ts). */
export const tmpDir = (): string => tempDir("test");

/** The demo's model pair (stories260k and its DPO-tuned copy) and its first `limit` held-out pairs. */
export const DEMO = {
  base: "fixtures/models/stories260k",
  tuned: "fixtures/models/stories260k-dpo",
  pairs: "fixtures/data/stories/test.jsonl",
};

/** Loads the demo pair and pairs (the caller disposes the models). */
export function loadDemo(limit: number): { base: LlamaModel; tuned: LlamaModel; pairs: Pair[] } {
  return {
    base: loadModelSync(DEMO.base),
    tuned: loadModelSync(DEMO.tuned),
    pairs: loadPairs(DEMO.pairs, DEMO.base, { limit }),
  };
}

/** Frees a pair of models. */
export const disposeDemo = (d: { base: LlamaModel; tuned: LlamaModel }): void => (
  disposeModel(d.base),
  disposeModel(d.tuned)
);

/**
 * How far the native matmul may move a figure when the rows around it change (a batch of another size, runs
 * stacked or not, the head in other chunks): OpenBLAS's sgemm kernel rounds a row's dot products by the row's
 * position within its register tile (12 rows on Haswell), so such a change moves a logit by float32 rounding
 * (seen ≤ 6e-6 on logits of magnitude ~10: 1e-6 relative). A margin or gain is a difference of sums of log-probs
 * of up to ~100 nats, so that rounding moves it by up to ~1e-4 nats however small it is (seen ≤ 2e-5). Figures
 * are compared to 1e-4 relative to their own size, or 1e-4 absolute below 1: a few times what the rounding was
 * seen to move, far below any difference the analysis reports. The stock wasm kernel is row-exact, so there
 * every comparison stays exact.
 */
export const NATIVE_TOLERANCE = { rel: 1e-4, abs: 1e-4 };

/**
 * Whether the numbers compared come from the native kernel: this process's backend once useBackend started one,
 * else the CLI's (a child started by runCli picks TEST_BACKEND, as PREFPROBE_BACKEND or the best available).
 */
export const onNative = (): boolean => (backendKind() === null ? TEST_BACKEND === "native" : nativeMatMulActive());

/** |a − b| within NATIVE_TOLERANCE: figures of two computations that differ in float32 rounding on any kernel. */
export function expectNear(a: number, b: number, what = "value"): void {
  const tol = Math.max(NATIVE_TOLERANCE.abs, NATIVE_TOLERANCE.rel * Math.abs(b));
  if (!(Math.abs(a - b) <= tol))
    throw new Error(`${what}: ${a} vs ${b} differ by ${Math.abs(a - b)}, more than float32 rounding (${tol})`);
}

/**
 * Deep equality of two results (numbers, arrays, typed arrays, objects): exact on stock kernels, and on the
 * native kernel every number within NATIVE_TOLERANCE (strings, booleans, nulls and shapes still exact).
 */
export function expectSame(actual: unknown, expected: unknown, what = "value"): void {
  if (!onNative()) expect(actual, what).toEqual(expected);
  else expectClose(actual, expected, what);
}

/** Deep equality with every number within NATIVE_TOLERANCE, on any kernel: two computations that sum in other orders. */
export function expectClose(actual: unknown, expected: unknown, what = "value"): void {
  const walk = (a: unknown, b: unknown, at: string): void => {
    if (typeof b === "number" && typeof a === "number") {
      if (Number.isNaN(b) || !Number.isFinite(b)) return void expect(a, at).toEqual(b);
      const tol = Math.max(NATIVE_TOLERANCE.abs, NATIVE_TOLERANCE.rel * Math.abs(b));
      if (!(Math.abs(a - b) <= tol))
        throw new Error(`${at}: ${a} vs ${b} differ by ${Math.abs(a - b)}, beyond float32 rounding's tolerance ${tol}`);
      return;
    }
    if (ArrayBuffer.isView(b) && ArrayBuffer.isView(a))
      return walk(Array.from(a as unknown as ArrayLike<number>), Array.from(b as unknown as ArrayLike<number>), at);
    if (Array.isArray(b)) {
      expect(Array.isArray(a), `${at} is an array`).toBe(true);
      expect((a as unknown[]).length, `${at}.length`).toBe(b.length);
      b.forEach((v, i) => walk((a as unknown[])[i], v, `${at}[${i}]`));
      return;
    }
    if (b && typeof b === "object") {
      expect(a !== null && typeof a === "object", `${at} is an object`).toBe(true);
      expect(Object.keys(a as object).sort(), `${at} keys`).toEqual(Object.keys(b).sort());
      for (const k of Object.keys(b))
        walk((a as Record<string, unknown>)[k], (b as Record<string, unknown>)[k], `${at}.${k}`);
      return;
    }
    expect(a, at).toEqual(b);
  };
  walk(actual, expected, what);
}
