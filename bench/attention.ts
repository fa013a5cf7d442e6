// Attention bench at Llama-3.2-1B width (hidden 2048, intermediate 8192, 32/8 heads, head_dim 64): one decoder
// layer's forward with batched vs per-(row, kv head) grouped attention, and its efficiency against the backend's
// own 2-D matmul ceiling measured in the same run. Ratios only: the machine is noisy.
// Run: npx tsx bench/attention.ts
import * as tf from "@tensorflow/tfjs-core";
import { initBackend } from "../src/model/backend.js";
import { parseConfig } from "../src/model/config.js";
import { forward, type LlamaLayer, type LlamaModel } from "../src/model/llama.js";
import { readValues } from "../src/model/read.js";

const backend = await initBackend();
const cfg = parseConfig({
  hidden_size: 2048, intermediate_size: 8192, num_hidden_layers: 1, num_attention_heads: 32, num_key_value_heads: 8,
  head_dim: 64, vocab_size: 256, rms_norm_eps: 1e-5, rope_theta: 500000, max_position_embeddings: 8192, tie_word_embeddings: false,
});
const { hiddenSize: H, intermediateSize: I, numHeads: nH, numKvHeads: nKv, headDim: d } = cfg;
const w = (r: number, c: number) => tf.randomNormal([r, c], 0, 0.02, "float32", 1) as tf.Tensor2D;
const layer: LlamaLayer = {
  inputNorm: tf.ones([H]), postNorm: tf.ones([H]),
  q: w(H, nH * d), k: w(H, nKv * d), v: w(H, nKv * d), o: w(nH * d, H), gate: w(H, I), up: w(H, I), down: w(I, H),
};
const model: LlamaModel = { config: cfg, embed: w(cfg.vocabSize, H), layers: [layer], finalNorm: tf.ones([H]), lmHead: w(H, cfg.vocabSize) };

/** The fastest of `reps` timed calls after one warm-up (the machine is noisy; the minimum is the least disturbed). */
function time(f: () => void, reps: number): number {
  f();
  let best = Infinity;
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    f();
    best = Math.min(best, performance.now() - t0);
  }
  return best;
}
// the ceiling: the best rate of the layer's own 2-D matmul shapes ([T, H]·[H, nH·d], [T, H]·[H, I], [T, I]·[I, H])
const ceiling = (T: number) =>
  Math.max(
    ...[layer.q, layer.gate, layer.down].map((wt) => {
      const a = tf.randomNormal([T, wt.shape[0]]);
      const ms = time(() => readValues(() => tf.matMul(a, wt)), 3);
      a.dispose();
      return (2 * T * wt.shape[0] * wt.shape[1]) / ms / 1e6; // GFLOP/s
    }),
  );
const layerFlops = (B: number, T: number) => B * (2 * T * (H * nH * d + 2 * H * nKv * d + nH * d * H + 3 * H * I) + 2 * 2 * nH * T * T * d);

console.log(`backend ${backend}; one decoder layer at Llama-3.2-1B width (head and embedding excluded by a 256-token vocabulary)`);
console.log("rows × T     batched    grouped   speed-up   efficiency (grouped / matmul ceiling)");
for (const [B, T] of [[2, 128], [1, 512], [2, 512]] as const) {
  const ids = Array.from({ length: B }, (_, b) => Array.from({ length: T }, (_, t) => (b * 7 + t) % cfg.vocabSize));
  const run = (attention: "batched" | "grouped") => () => {
    const r = forward(model, ids, { logitsAt: "none", cache: ["blocks.0.hook_resid_post"], attention });
    r.cache.get("blocks.0.hook_resid_post").dataSync();
    r.dispose();
  };
  const leak = tf.memory().numTensors;
  const ceil = ceiling(B * T);
  const batched = time(run("batched"), 2);
  const grouped = time(run("grouped"), 2);
  const gflops = layerFlops(B, T) / grouped / 1e6;
  console.log(`${B} × ${String(T).padEnd(5)} ${batched.toFixed(0).padStart(7)} ms ${grouped.toFixed(0).padStart(7)} ms ${(batched / grouped).toFixed(2).padStart(8)}x   ${(gflops / ceil).toFixed(2)} (${gflops.toFixed(1)} of ${ceil.toFixed(1)} GFLOP/s; target ≥ 0.85)`);
  if (tf.memory().numTensors > leak) console.log(`  warning: ${tf.memory().numTensors - leak} tensors left behind`);
}
