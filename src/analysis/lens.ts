// Stage 5, the logit lens: the margin each model would give if its residual stream after a layer went
// straight to the final norm and head.
import type { LlamaModel } from "../model/llama.js";
import { hookName } from "../model/hooks.js";
import { forward } from "../model/llama.js";
import { marginsOf, responseLogprobs } from "../data/batch.js";
import type { ScoredBatch } from "./scoring.js";
import type { RunSettings } from "./settings.js";

/** Lens margins [model][depth 0..L][pair of the batch]: depth 0 reads the embedding, depth l+1 block l's output. */
export function logitLensBatch(models: { base: LlamaModel; tuned: LlamaModel }, sc: ScoredBatch, s: RunSettings): { base: Float64Array[]; tuned: Float64Array[] } {
  const L = models.base.config.numLayers;
  const read = (name: "base" | "tuned") =>
    Array.from({ length: L + 1 }, (_, depth) => {
      const resid = sc.runs[name].cache.get(depth === 0 ? "hook_embed" : hookName("resid_post", depth - 1));
      const out = forward(models[name], sc.batch.ids, { lengths: sc.batch.lengths, start: { layer: L, resid }, logitsAt: sc.batch.logitsAt });
      const m = marginsOf(responseLogprobs(out.logits!, sc.batch, s.perToken));
      out.dispose();
      return m;
    });
  return { base: read("base"), tuned: read("tuned") };
}
