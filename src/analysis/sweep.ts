// Stage 2, the patch sweep: for every (direction, site, layer) of the plan, run the patched model on a batch
// and read each pair's gain. The real patch and every control go through this one loop.
import type * as tf from "@tensorflow/tfjs-core";
import type { PairBatch } from "../data/batch.js";
import type { ActivationCache } from "../model/hooks.js";
import { hookName } from "../model/hooks.js";
import { gainOf, patchedMargins, roles, type Patch } from "./patches.js";
import type { Combo, ModelPair, ScoredBatch } from "./scoring.js";
import type { RunSettings } from "./settings.js";

/** What a sweep over one batch reads: the batch, the cached activations of each model, the unpatched margins. */
export interface SweepInput {
  batch: PairBatch;
  caches: { base?: ActivationCache; tuned?: ActivationCache };
  margin: { base: ArrayLike<number>; tuned: ArrayLike<number> };
  patchMask: tf.Tensor;
}

/** The sweep input of a scored batch. */
export const sweepInput = (sc: ScoredBatch): SweepInput => ({
  batch: sc.batch,
  caches: { base: sc.runs.base.cache, tuned: sc.runs.tuned.cache },
  margin: sc.margin,
  patchMask: sc.mask.patch,
});

/**
 * Gains [combo][pair of the batch] of the patch `patchFor(combo, comboIndex)` at each combo. A patch that
 * reads no source activation (mean-ablation) may be swept with only the patched model's cache.
 */
export function sweepBatch(models: ModelPair, input: SweepInput, combos: Combo[], patchFor: (c: Combo, ci: number) => Patch, s: RunSettings): number[][] {
  return combos.map((c, ci) => {
    const { dst, src } = roles(c.direction);
    const site = hookName(c.site, c.layer);
    const dstCache = input.caches[dst];
    if (!dstCache) throw new Error(`sweep: no ${dst} activations cached for ${c.direction}`);
    const hDst = dstCache.get(site);
    const hSrc = input.caches[src]?.get(site) ?? hDst;
    const m = patchedMargins(models[dst], input.batch, c, patchFor(c, ci), { dst: hDst, src: hSrc, dstCache }, input.patchMask, s.perToken);
    return Array.from(m, (v, i) => gainOf(c.direction, v, input.margin.base[i]!, input.margin.tuned[i]!));
  });
}
