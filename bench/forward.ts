// Forward-pass bench: throughput of batched vs one-at-a-time runs, cost of hooks/caching, and memory growth
// over repeated calls — all as ratios measured in one run, since the machine is noisy.
// Run: npx tsx bench/forward.ts [model-folder]
import * as tf from "@tensorflow/tfjs-core";
import { initBackend } from "../src/model/backend.js";
import { loadModelSync } from "../src/io/model.js";
import { disposeModel, forward } from "../src/model/llama.js";
import { residSites } from "../src/model/resid.js";

const dir = process.argv[2] ?? "fixtures/models/stories260k";
const backend = await initBackend();
const model = loadModelSync(dir);
const V = model.config.vocabSize;
const B = 8;
const T = 64;
const rows = Array.from({ length: B }, (_, b) => Array.from({ length: T }, (_, t) => (b * 31 + t * 7) % V));

function time(f: () => void, reps: number): number {
  f();
  const t0 = performance.now();
  for (let i = 0; i < reps; i++) f();
  return (performance.now() - t0) / reps;
}
const once = (ids: number[][], opts = {}) => {
  const r = forward(model, ids, opts);
  r.logits?.dataSync();
  r.dispose();
};
const batched = time(() => once(rows), 5);
const single = time(() => rows.forEach((r) => once([r])), 5);
const cached = time(() => once(rows, { cache: residSites(model.config.numLayers) }), 5);
const before = tf.memory();
for (let i = 0; i < 50; i++) once(rows, { cache: residSites(model.config.numLayers) });
const after = tf.memory();
console.log(`model ${dir}, backend ${backend}, batch ${B} × ${T} tokens`);
console.log(`batched forward:              ${batched.toFixed(1)} ms`);
console.log(
  `one row at a time (all rows): ${single.toFixed(1)} ms  → batching speed-up ${(single / batched).toFixed(2)}x (target ≥ 1.0x: never slower)`,
);
console.log(`caching the residual stream:  ${(cached / batched).toFixed(2)}x the plain forward (target ≤ 1.2x)`);
console.log(
  `tensors after 50 more calls:  ${after.numTensors - before.numTensors} more, ${after.numBytes - before.numBytes} bytes more (target 0)`,
);
disposeModel(model);
