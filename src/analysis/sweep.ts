// Stage 2, the patch sweep: for every (direction, site, layer) of the plan, a named patched run of the direction's
// destination model, and each pair's gain read from its margins. The real patch and every control go through this
// one loop; the engine decides how the runs execute.
import type * as tf from "@tensorflow/tfjs-core";
import type { PairBatch } from "../data/batch.js";
import type { ActivationCache } from "../model/hooks.js";
import { hookName } from "../model/hooks.js";
import type { Hook } from "../model/llama.js";
import { runMargins, type Run, type Strategy } from "../engine/runs.js";
import { gainOf, roles, windowLayers, type Patch } from "./patches.js";
import { runKey, type Combo, type ModelPair, type ScoredBatch } from "./scoring.js";
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

function cacheOf(input: SweepInput, model: "base" | "tuned", c: Combo): ActivationCache {
  const cache = input.caches[model];
  if (!cache) throw new Error(`sweep: no ${model} activations cached for ${c.direction}`);
  return cache;
}

/**
 * The run that patches combo c (number ci) with `patchFor(c, ci)` over the patch mask: a residual site enters
 * the layer after it (resid_post) or at it (resid_pre) with the patched residual; attn_out/mlp_out enter their
 * layer with the cached resid_pre and replace the site's value. A window of w > 1 layers enters at its first layer
 * and moves each window layer's site from its current value (which earlier window layers have already changed)
 * toward the source's; with α = 1 and every position patched, a residual-stream window equals patching its last
 * layer alone. `hooked` takes that form for a window of 1 too (tests: it must give the plain patch's gains).
 */
export function comboRun(
  input: SweepInput,
  c: Combo,
  ci: number,
  patchFor: (c: Combo, ci: number) => Patch,
  window: number,
  L: number,
  hooked = window > 1,
): Run {
  const { dst, src } = roles(c.direction);
  const dstCache = cacheOf(input, dst, c);
  const srcOf = (site: string) => input.caches[src]?.get(site) ?? dstCache.get(site);
  const name = runKey(c);
  if (hooked) {
    const hooks: Record<string, Hook> = {};
    for (const j of windowLayers(c.layer, window, L)) {
      const site = hookName(c.site, j);
      const patch = patchFor({ ...c, layer: j }, ci);
      hooks[site] = (v) => patch(v, srcOf(site), input.patchMask);
    }
    return { name, layer: c.layer, resid: dstCache.get(hookName("resid_pre", c.layer)), hooks };
  }
  const site = hookName(c.site, c.layer);
  const value = () => patchFor(c, ci)(dstCache.get(site), srcOf(site), input.patchMask);
  if (c.site === "resid_post") return { name, layer: c.layer + 1, resid: value };
  if (c.site === "resid_pre") return { name, layer: c.layer, resid: value };
  return { name, layer: c.layer, resid: dstCache.get(hookName("resid_pre", c.layer)), hooks: { [site]: value } };
}

/**
 * Gains [combo][pair of the batch] of the patch `patchFor(combo, comboIndex)` at each combo, the runs of each
 * destination model in one engine call. A patch that reads no source activation (mean-ablation) may be swept with
 * only the patched model's cache. `test` is for tests: every strategy, and the hooked form of a window of 1,
 * give the same gains.
 */
export function sweepBatch(
  models: ModelPair,
  input: SweepInput,
  combos: Combo[],
  patchFor: (c: Combo, ci: number) => Patch,
  s: RunSettings,
  test: { strategy?: Strategy; hooked?: boolean } = {},
): number[][] {
  const out: number[][] = combos.map(() => []);
  for (const dst of ["base", "tuned"] as const) {
    const mine = combos.map((c, ci) => ({ c, ci })).filter(({ c }) => roles(c.direction).dst === dst);
    if (!mine.length) continue;
    const L = models[dst].config.numLayers;
    const runs = mine.map(({ c, ci }) => comboRun(input, c, ci, patchFor, s.window, L, test.hooked ?? s.window > 1));
    const m = runMargins(models[dst], input.batch, runs, {
      limits: models.limits,
      perToken: s.perToken,
      strategy: test.strategy,
    });
    mine.forEach(
      ({ c, ci }, k) =>
        (out[ci] = Array.from(m.get(runs[k]!.name)!, (v, i) =>
          gainOf(c.direction, v, input.margin.base[i]!, input.margin.tuned[i]!),
        )),
    );
  }
  return out;
}
