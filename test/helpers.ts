// Shared test helpers: backend selection and array comparison.
import { spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import * as tf from "@tensorflow/tfjs-core";
import { beforeAll } from "vitest";
import { initBackend } from "../src/model/backend.js";
import { loadModelSync } from "../src/io/model.js";
import { loadPairs } from "../src/io/pairs.js";
import type { Pair } from "../src/data/pairs.js";
import { disposeModel, type LlamaModel } from "../src/model/llama.js";

/** Runs this test file on the named backend (wasm unless PREFPROBE_TEST_BACKEND says otherwise). */
export function useBackend(name = process.env.PREFPROBE_TEST_BACKEND ?? "wasm"): void {
  beforeAll(async () => {
    await initBackend(name);
    if (tf.getBackend() !== name) throw new Error(`wanted backend ${name}, got ${tf.getBackend()}`);
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
export const tmpDir = (): string => fs.mkdtempSync(path.join(os.tmpdir(), "prefprobe-test-"));

/** The demo's model pair (stories260k and its DPO-tuned copy) and its first `limit` held-out pairs. */
export const DEMO = { base: "fixtures/models/stories260k", tuned: "fixtures/models/stories260k-dpo", pairs: "fixtures/data/stories/test.jsonl" };

/** Loads the demo pair and pairs (the caller disposes the models). */
export function loadDemo(limit: number): { base: LlamaModel; tuned: LlamaModel; pairs: Pair[] } {
  return { base: loadModelSync(DEMO.base), tuned: loadModelSync(DEMO.tuned), pairs: loadPairs(DEMO.pairs, DEMO.base, { limit }) };
}

/** Frees a pair of models. */
export const disposeDemo = (d: { base: LlamaModel; tuned: LlamaModel }): void => (disposeModel(d.base), disposeModel(d.tuned));
