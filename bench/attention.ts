// Attention bench at Llama-3.2-1B width (hidden 2048, intermediate 8192, 32/8 heads, head_dim 64): one decoder
// layer's forward with batched vs per-(row, kv head) grouped attention, and its efficiency against the backend's
// own 2-D matmul ceiling measured in the same run. Ratios only: the machine is noisy.
// Run: npx tsx bench/attention.ts
import * as tf from "@tensorflow/tfjs-core";
import { initBackend } from "../src/model/backend.js";
import { llama1bConfig } from "./llama-1b-shaped.js";
import { layerFlops, layerForwardMs, matmulCeiling, oneLayerModel } from "./lib.js";

const backend = await initBackend();
const cfg = llama1bConfig(1);
const model = oneLayerModel(cfg);

console.log(
  `backend ${backend}; one decoder layer at Llama-3.2-1B width (head and embedding excluded by a 256-token vocabulary)`,
);
console.log("rows × T     batched    grouped   speed-up   efficiency (grouped / matmul ceiling)");
for (const [B, T] of [
  [2, 128],
  [1, 512],
  [2, 512],
] as const) {
  const leak = tf.memory().numTensors;
  const ceil = matmulCeiling(model.layers[0]!, B * T);
  const batched = layerForwardMs(model, B, T, "batched");
  const grouped = layerForwardMs(model, B, T, "grouped");
  const gflops = layerFlops(cfg, B, T) / grouped / 1e6;
  console.log(
    `${B} × ${String(T).padEnd(5)} ${batched.toFixed(0).padStart(7)} ms ${grouped.toFixed(0).padStart(7)} ms ${(batched / grouped).toFixed(2).padStart(8)}x   ${(gflops / ceil).toFixed(2)} (${gflops.toFixed(1)} of ${ceil.toFixed(1)} GFLOP/s; target ≥ 0.85)`,
  );
  if (tf.memory().numTensors > leak) console.log(`  warning: ${tf.memory().numTensors - leak} tensors left behind`);
}
