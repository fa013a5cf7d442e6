// Helpers shared by the benches: best-of-n timing, the backend's own matmul ceiling, and one decoder layer's
// forward at a given width measured against that ceiling.
import * as tf from "@tensorflow/tfjs-core";
import type { LlamaConfig } from "../src/model/config.js";
import { forward, type LlamaLayer, type LlamaModel } from "../src/model/llama.js";
import { readValues } from "../src/model/read.js";

/** The fastest of `reps` timed calls after one warm-up, in ms (the machine is noisy; the minimum is the least disturbed). */
export function time(f: () => void, reps: number): number {
  f();
  let best = Infinity;
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    f();
    best = Math.min(best, performance.now() - t0);
  }
  return best;
}

/** A one-layer model of `cfg`'s width with random resident weights and a 256-token vocabulary (head cost out). */
export function oneLayerModel(cfg: LlamaConfig): LlamaModel {
  const { hiddenSize: H, intermediateSize: I, numHeads: nH, numKvHeads: nKv, headDim: d } = cfg;
  const w = (r: number, c: number) => tf.randomNormal([r, c], 0, 0.02, "float32", 1) as tf.Tensor2D;
  const layer: LlamaLayer<tf.Tensor2D> = {
    inputNorm: tf.ones([H]),
    postNorm: tf.ones([H]),
    q: w(H, nH * d),
    k: w(H, nKv * d),
    v: w(H, nKv * d),
    o: w(nH * d, H),
    gate: w(H, I),
    up: w(H, I),
    down: w(I, H),
  };
  return {
    config: { ...cfg, numLayers: 1, vocabSize: 256, tieWordEmbeddings: false },
    embed: w(256, H),
    layers: [layer],
    finalNorm: tf.ones([H]),
    lmHead: w(H, 256),
  };
}

/** The backend's best GFLOP/s over the layer's own 2-D matmul shapes ([T, H]·[H, nH·d], [T, H]·[H, I], [T, I]·[I, H]). */
export function matmulCeiling(layer: LlamaLayer<tf.Tensor2D>, T: number): number {
  return Math.max(
    ...[layer.q, layer.gate, layer.down].map((wt) => {
      const a = tf.randomNormal([T, wt.shape[0]]);
      const ms = time(() => readValues(() => tf.matMul(a, wt)), 3);
      a.dispose();
      return (2 * T * wt.shape[0] * wt.shape[1]) / ms / 1e6;
    }),
  );
}

/** Multiply-adds ×2 of one decoder layer over B rows of T tokens (projections, MLP, QKᵀ and PV). */
export function layerFlops(cfg: LlamaConfig, B: number, T: number): number {
  const { hiddenSize: H, intermediateSize: I, numHeads: nH, numKvHeads: nKv, headDim: d } = cfg;
  return B * (2 * T * (H * nH * d + 2 * H * nKv * d + nH * d * H + 3 * H * I) + 2 * 2 * nH * T * T * d);
}

/**
 * Matmul FLOPs of one pair's clean runs and resid_post patch sweep over every layer: prefprobe's way (one packed
 * row, each patched run resumed after its layer, log-probs only at the scored positions) and the TransformerLens-
 * style peer's (two padded rows, a full forward per patch, logits at every position).
 */
export function sweepFlops(
  cfg: LlamaConfig,
  t: { prompt: number; chosen: number; rejected: number },
): { prefprobe: number; peer: number } {
  const L = cfg.numLayers;
  const head = 2 * cfg.hiddenSize * cfg.vocabSize; // per position
  const packed = t.prompt + t.chosen + t.rejected;
  const padded = t.prompt + Math.max(t.chosen, t.rejected);
  const layerRuns = 2 * L + (L * (L - 1)) / 2; // both clean runs, then the run patched at l goes through l+1 … L−1
  const prefprobe = layerRuns * layerFlops(cfg, 1, packed) + (2 + L) * (t.chosen + t.rejected) * head;
  const peer = (2 + L) * (L * layerFlops(cfg, 2, padded) + 2 * padded * head);
  return { prefprobe, peer };
}

/** Best ms of one decoder layer's forward over B rows × T tokens with the given attention path. */
export function layerForwardMs(
  model: LlamaModel,
  B: number,
  T: number,
  attention: "batched" | "grouped",
  reps = 2,
): number {
  const ids = Array.from({ length: B }, (_, b) =>
    Array.from({ length: T }, (_, t) => (b * 7 + t) % model.config.vocabSize),
  );
  return time(() => {
    const r = forward(model, ids, { logitsAt: "none", cache: ["blocks.0.hook_resid_post"], attention });
    r.cache.get("blocks.0.hook_resid_post").dataSync();
    r.dispose();
  }, reps);
}
