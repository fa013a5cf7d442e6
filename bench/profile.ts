// Where a pair's time goes: one thread runs the per-pair stages (and, with --lowrank, the low-rank stage) on a
// pair of models, with every backend kernel timed, and prints each stage's time by kernel category (matmul,
// attention softmax, the head's log-sum-exp, elementwise, data movement, the rest). Ratios within one run only.
//   npx tsx bench/profile.ts [--base DIR --tuned DIR] [--pairs FILE] [--max-tokens 160] [--backend native|wasm] [--threads N]
//                            [--pair I] [--batch N] [--method exact|attribution|both]
// (default: the Llama-3.2-1B-shaped pair bench:1b writes to the temp folder, and the HH-RLHF test pairs)
import * as os from "node:os";
import * as path from "node:path";
import { parseArgs } from "node:util";
import * as tf from "@tensorflow/tfjs-core";
import { readUsablePairs } from "../src/io/pairs.js";
import { loadModelSync } from "../src/io/model.js";
import { loadTokenizer } from "../src/io/tokenizer.js";
import { initBackend } from "../src/model/backend.js";
import { disposeModel } from "../src/model/llama.js";
import { analyseBatch } from "../src/analysis/run.js";
import { makePlan } from "../src/analysis/scoring.js";
import { resolveSettings } from "../src/analysis/settings.js";
import { enableGradients } from "../src/model/gradients.js";

const { values: a } = parseArgs({
  options: {
    base: { type: "string", default: path.join(os.tmpdir(), "prefprobe-1b-16", "base") },
    tuned: { type: "string", default: path.join(os.tmpdir(), "prefprobe-1b-16", "tuned") },
    pairs: { type: "string", default: "fixtures/data/hh-rlhf/harmless-base-test.jsonl.gz" },
    "max-tokens": { type: "string", default: "160" },
    backend: { type: "string" },
    threads: { type: "string" },
    pair: { type: "string", default: "0" }, // the first pair of the batch
    batch: { type: "string", default: "1" }, // pairs in the batch
    method: { type: "string", default: "exact" }, // exact | attribution | both
  },
});

const backend = await initBackend(a.backend, a.threads ? { threads: Number(a.threads) } : {});
console.error(`backend: ${backend}`);

/** Kernel name → category of work. */
function category(kernel: string): string {
  if (kernel === "BatchMatMul" || kernel === "PrefprobeStoredMatMul" || kernel === "_FusedMatMul") return "matmul";
  if (kernel === "Softmax") return "softmax";
  if (["Max", "Exp", "Sum", "Log", "LogSumExp"].includes(kernel)) return "reductions (log-sum-exp, norms)";
  if (
    [
      "Transpose",
      "Reshape",
      "Concat",
      "Slice",
      "GatherV2",
      "Pack",
      "Unpack",
      "Identity",
      "Cast",
      "Tile",
      "Fill",
      "Select",
      "SelectV2",
      "StridedSlice",
      "SplitV",
    ].includes(kernel)
  )
    return "data movement";
  if (
    [
      "Add",
      "Sub",
      "Multiply",
      "RealDiv",
      "Neg",
      "Sigmoid",
      "Rsqrt",
      "Square",
      "Mean",
      "Maximum",
      "Sqrt",
      "Abs",
      "Pow",
    ].includes(kernel)
  )
    return "elementwise";
  return "other";
}

// every kernel of the backend, timed (synchronous on wasm, so wall time is the kernel's); the stage of each is
// found afterwards from the stages' [start, end) times
const events: Array<{ t: number; kernel: string; ms: number; flops: number; rows: number }> = [];
/** Multiply-adds ×2 of a matmul kernel call and its rows (M), from its operands; 0 for other kernels. */
function flopsOf(kernel: string, args: Parameters<tf.KernelFunc>[0]): { flops: number; rows: number } {
  const size = (s: number[]) => s.reduce((x, y) => x * y, 1);
  if (kernel === "PrefprobeStoredMatMul") {
    const { matrix } = args.attrs as unknown as { matrix: { rows: number; cols: number } };
    const [M] = (args.inputs.x as tf.TensorInfo).shape as [number, number];
    return { flops: 2 * M * matrix.rows * matrix.cols, rows: M };
  }
  if (kernel === "BatchMatMul") {
    const { a, b } = args.inputs as { a: tf.TensorInfo; b: tf.TensorInfo };
    const { transposeA, transposeB } = args.attrs as unknown as { transposeA: boolean; transposeB: boolean };
    const [M, K, N] = [
      a.shape.at(transposeA ? -1 : -2)!,
      a.shape.at(transposeA ? -2 : -1)!,
      b.shape.at(transposeB ? -2 : -1)!,
    ];
    return { flops: 2 * M * N * K * Math.max(size(a.shape.slice(0, -2)), size(b.shape.slice(0, -2))), rows: M };
  }
  return { flops: 0, rows: 0 };
}
const registry = tf.getKernelsForBackend(tf.getBackend());
for (const k of registry) {
  const f = k.kernelFunc;
  tf.unregisterKernel(k.kernelName, k.backendName);
  const timedKernel: tf.KernelFunc = (args) => {
    const t0 = performance.now();
    try {
      return f(args);
    } finally {
      events.push({ t: t0, kernel: k.kernelName, ms: performance.now() - t0, ...flopsOf(k.kernelName, args) });
    }
  };
  // the kernel's own marks (the native matmul's thread count) stay on it, so the backend still reads as native
  tf.registerKernel({ ...k, kernelFunc: Object.assign(timedKernel, f) });
}

const base = loadModelSync(a.base, { memoryBudget: 2 ** 29 });
const tuned = loadModelSync(a.tuned, { memoryBudget: 2 ** 29 });
const tok = loadTokenizer(a.base);
const tp = readUsablePairs(a.pairs, tok, base.config.vocabSize, {
  maxTokens: Number(a["max-tokens"]),
  limit: Number(a.pair) + Number(a.batch),
});
const batch = tp.pairs.slice(Number(a.pair));
for (const p of batch)
  console.error(`pair ${p.index}: ${p.promptIds.length} + ${p.chosenIds.length} / ${p.rejectedIds.length} tokens`);
const s = resolveSettings(
  { batchPairs: Number(a.batch), method: a.method as "exact" | "attribution" | "both" },
  base.config,
);
if (s.method !== "exact") await enableGradients();
const plan = makePlan(s, base.config.numLayers);
const times: Record<string, number> = {};
// analyseBatch's own timer adds each stage's milliseconds at its end: that gives the stage's interval
const spans: Array<{ stage: string; from: number; to: number }> = [];
const tracked = new Proxy(times, {
  set: (t, k: string, v: number) => {
    const to = performance.now();
    spans.push({ stage: k, from: to - (v - (t[k] ?? 0)), to });
    t[k] = v;
    return true;
  },
});
analyseBatch({ base, tuned }, batch, plan, s, tracked);
disposeModel(base);
disposeModel(tuned);
const byStage = new Map<string, Map<string, number>>();
for (const e of events) {
  const sp = spans.find((x) => e.t >= x.from && e.t < x.to);
  if (!sp) continue;
  const m = byStage.get(sp.stage) ?? byStage.set(sp.stage, new Map()).get(sp.stage)!;
  for (const key of [category(e.kernel), `  ${e.kernel}`]) m.set(key, (m.get(key) ?? 0) + e.ms);
}

console.log(
  `\n| stage | wall s | ${["matmul", "softmax", "reductions (log-sum-exp, norms)", "elementwise", "data movement", "other", "outside kernels"].join(" | ")} |`,
);
console.log(`|---|---|${"---|".repeat(7)}`);
for (const [name, ms] of Object.entries(times)) {
  const m = byStage.get(name) ?? new Map<string, number>();
  const cats = ["matmul", "softmax", "reductions (log-sum-exp, norms)", "elementwise", "data movement", "other"].map(
    (c) => m.get(c) ?? 0,
  );
  const outside = ms - cats.reduce((x, y) => x + y, 0);
  console.log(
    `| ${name} | ${(ms / 1000).toFixed(1)} | ${[...cats, outside].map((v) => `${((100 * v) / ms).toFixed(0)}%`).join(" | ")} |`,
  );
}
const mm = events.filter((e) => e.flops > 0);
const mmFlops = mm.reduce((x, e) => x + e.flops, 0);
const mmMs = mm.reduce((x, e) => x + e.ms, 0);
console.log(
  `\nmatmul: ${(mmFlops / 1e12).toFixed(2)} TFLOP in ${(mmMs / 1000).toFixed(1)} s: ${(mmFlops / mmMs / 1e6).toFixed(0)} GFLOP/s`,
);
for (const [lo, hi] of [
  [1, 32],
  [32, 128],
  [128, 512],
  [512, 2048],
  [2048, Infinity],
] as const) {
  const sel = mm.filter((e) => e.rows >= lo && e.rows < hi);
  const f = sel.reduce((x, e) => x + e.flops, 0);
  const ms = sel.reduce((x, e) => x + e.ms, 0);
  if (sel.length)
    console.log(
      `  ${lo}–${hi} rows: ${sel.length} calls, ${(f / 1e12).toFixed(2)} TFLOP, ${(ms / 1000).toFixed(1)} s, ${(f / ms / 1e6).toFixed(0)} GFLOP/s`,
    );
}
console.log("\nTop kernels over all stages:");
const all = new Map<string, number>();
for (const m of byStage.values())
  for (const [k, v] of m) if (k.startsWith("  ")) all.set(k.trim(), (all.get(k.trim()) ?? 0) + v);
for (const [k, v] of [...all].sort((x, y) => y[1] - x[1]).slice(0, 15))
  console.log(`  ${k.padEnd(24)} ${(v / 1000).toFixed(2)} s`);
