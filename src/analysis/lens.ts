// Stage 5, the logit lens: the margin each model would give if its residual stream after a layer went
// straight to the final norm and head.
import { hookName } from "../model/hooks.js";
import { runMargins, type Run } from "../engine/runs.js";
import type { ModelPair, ScoredBatch } from "./scoring.js";
import type { RunSettings } from "./settings.js";

/**
 * Lens margins [model][depth 0..L][pair of the batch]: depth 0 reads the embedding, depth l+1 block l's output;
 * each depth is a run entering the head with that cached residual.
 */
export function logitLensBatch(
  models: ModelPair,
  sc: ScoredBatch,
  s: RunSettings,
): { base: Float64Array[]; tuned: Float64Array[] } {
  const L = models.base.config.numLayers;
  const read = (name: "base" | "tuned") => {
    const cache = sc.runs[name].cache;
    const runs = Array.from({ length: L + 1 }, (_, d): Run => ({
      name: `depth ${d}`,
      layer: L,
      resid: cache.get(d === 0 ? "hook_embed" : hookName("resid_post", d - 1)),
    }));
    const m = runMargins(models[name], sc.batch, runs, { limits: models.limits, perToken: s.perToken });
    return runs.map((r) => m.get(r.name)!);
  };
  return { base: read("base"), tuned: read("tuned") };
}
