// Stage 5, the logit lens: the margin each model would give if its residual stream after a layer went
// straight to the final norm and head.
import type { LlamaModel } from "../model/llama.js";
import { hookName } from "../model/hooks.js";
import { forward } from "../model/llama.js";
import * as tf from "@tensorflow/tfjs-core";
import { marginsOf, repeatBatch, responseLogprobs } from "../data/batch.js";
import type { ScoredBatch } from "./scoring.js";
import type { RunSettings } from "./settings.js";

/**
 * Lens margins [model][depth 0..L][pair of the batch]: depth 0 reads the embedding, depth l+1 block l's output.
 * All depths of a model go through the final norm and head as one stacked batch (the head is read once).
 */
export function logitLensBatch(models: { base: LlamaModel; tuned: LlamaModel }, sc: ScoredBatch, s: RunSettings): { base: Float64Array[]; tuned: Float64Array[] } {
  const L = models.base.config.numLayers;
  const P = sc.pairs.length;
  const stacked = repeatBatch(sc.batch, L + 1);
  const read = (name: "base" | "tuned") => {
    const resid = tf.concat(Array.from({ length: L + 1 }, (_, depth) => sc.runs[name].cache.get(depth === 0 ? "hook_embed" : hookName("resid_post", depth - 1))));
    const out = forward(models[name], stacked.ids, { lengths: stacked.lengths, start: { layer: L, resid }, logitsAt: stacked.logitsAt });
    resid.dispose();
    const m = marginsOf(responseLogprobs(out.logits!, stacked, s.perToken));
    out.dispose();
    return Array.from({ length: L + 1 }, (_, depth) => m.slice(depth * P, (depth + 1) * P));
  };
  return { base: read("base"), tuned: read("tuned") };
}
