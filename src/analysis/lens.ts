// Stage 5, the logit lens: the margin each model would give if its residual stream after a layer went
// straight to the final norm and head.
import type { LlamaModel } from "../model/llama.js";
import { hookName } from "../model/hooks.js";
import { forward } from "../model/llama.js";
import * as tf from "@tensorflow/tfjs-core";
import { marginsOf, pairedInput, repeatBatch, rowLogprobs } from "../data/batch.js";
import { headGroup, type ScoredBatch } from "./scoring.js";
import type { RunSettings } from "./settings.js";

/**
 * Lens margins [model][depth 0..L][pair of the batch]: depth 0 reads the embedding, depth l+1 block l's output.
 * The depths of a model go through the final norm and head stacked, as many at once as headGroup allows.
 */
export function logitLensBatch(models: { base: LlamaModel; tuned: LlamaModel }, sc: ScoredBatch, s: RunSettings): { base: Float64Array[]; tuned: Float64Array[] } {
  const L = models.base.config.numLayers;
  const P = sc.pairs.length;
  const read = (name: "base" | "tuned") => {
    const G = headGroup(models[name].config, sc.batch);
    const out: Float64Array[] = [];
    for (let d0 = 0; d0 <= L; d0 += G) {
      const depths = Array.from({ length: Math.min(G, L + 1 - d0) }, (_, i) => d0 + i);
      const stacked = repeatBatch(sc.batch, depths.length);
      const resid = tf.concat(depths.map((depth) => sc.runs[name].cache.get(depth === 0 ? "hook_embed" : hookName("resid_post", depth - 1))));
      const r = forward(models[name], stacked.ids, { ...pairedInput(stacked), start: { layer: L, resid }, logitsAt: stacked.logitsAt, targets: stacked.targets });
      resid.dispose();
      const m = marginsOf(rowLogprobs(r.logprobs!, stacked, s.perToken));
      r.dispose();
      depths.forEach((_, i) => out.push(m.slice(i * P, (i + 1) * P)));
    }
    return out;
  };
  return { base: read("base"), tuned: read("tuned") };
}
