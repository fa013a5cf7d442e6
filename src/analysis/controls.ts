// Stage 3, the controls beside every real patch: a random direction of the same norm (drawn per batch and
// combo), and mean-ablation, which needs each site's dataset mean and so runs as a second pass.
import * as tf from "@tensorflow/tfjs-core";
import type { Pair } from "../data/pairs.js";
import { makeBatch, positionMask } from "../data/batch.js";
import { hookName, type HookName } from "../model/hooks.js";
import { forward } from "../model/llama.js";
import { tfSeed } from "../stats/stats.js";
import { meanAblation, randomDirection, roles, type Patch } from "./patches.js";
import type { Combo, ModelPair, Plan, ScoredBatch } from "./scoring.js";
import type { RunCallbacks, RunSettings } from "./settings.js";
import { sweepBatch } from "./sweep.js";

/** The random-direction control of each combo in a scored batch. */
export const randomDirectionPatch =
  (s: RunSettings, sc: ScoredBatch) =>
  (_c: Combo, ci: number): Patch =>
    randomDirection(s.alpha, tfSeed(s.seed, sc.number, ci));

/** Sums of each patch site's activation over every valid position, per model: the sufficient statistic of the means. */
export class SiteSums {
  readonly sums = { base: new Map<HookName, Float64Array>(), tuned: new Map<HookName, Float64Array>() };
  positions = 0;

  constructor(
    readonly sites: HookName[],
    readonly H: number,
  ) {}

  /** Adds a scored batch's activations at every valid position. */
  add(sc: ScoredBatch): void {
    this.positions += sc.batch.lengths.reduce((a, b) => a + b, 0);
    for (const name of ["base", "tuned"] as const) {
      for (const site of this.sites) {
        const sum = tf.tidy(() => tf.sum(tf.mul(sc.runs[name].cache.get(site), sc.mask.all), [0, 1]).dataSync());
        const acc = this.sums[name].get(site) ?? new Float64Array(this.H);
        for (let j = 0; j < this.H; j++) acc[j]! += sum[j]!;
        this.sums[name].set(site, acc);
      }
    }
  }

  /** The mean activation of `model` at `site` as a tensor (caller disposes). */
  mean(model: "base" | "tuned", site: HookName): tf.Tensor1D {
    const sum = this.sums[model].get(site);
    if (!sum) throw new Error(`no sums for ${model} ${site}`);
    return tf.tensor1d(Float32Array.from(sum, (v) => v / this.positions));
  }
}

/**
 * Mean-ablation gains [combo][pair]: the patched model's site replaced (α-mixed) by the source model's dataset
 * mean. Re-runs the patched model per batch for its caches; `margins` are the unpatched margins per pair.
 */
export async function meanAblationStage(
  models: ModelPair,
  batches: Pair[][],
  plan: Plan,
  sums: SiteSums,
  margins: { base: Float64Array; tuned: Float64Array },
  s: RunSettings,
  cb: RunCallbacks,
): Promise<Float64Array[]> {
  const n = margins.base.length;
  const out = plan.combos.map(() => new Float64Array(n));
  const means = plan.combos.map((c) => sums.mean(roles(c.direction).src, hookName(c.site, c.layer)));
  cb.onStage?.("mean-ablation controls", n);
  let done = 0;
  try {
    for (const bp of batches) {
      const batch = makeBatch(bp);
      const patchMask = positionMask(batch, s.positions);
      const cacheOf = (m: "base" | "tuned") =>
        plan.combos.some((c) => roles(c.direction).dst === m) ? forward(models[m], batch.ids, { lengths: batch.lengths, cache: plan.patchSites, logitsAt: "none" }).cache : undefined;
      const caches = { base: cacheOf("base"), tuned: cacheOf("tuned") };
      const margin = { base: margins.base.subarray(done, done + bp.length), tuned: margins.tuned.subarray(done, done + bp.length) };
      const gains = sweepBatch(models, { batch, caches, margin, patchMask }, plan.combos, (_c, ci) => meanAblation(s.alpha, means[ci]!), s);
      gains.forEach((g, ci) => out[ci]!.set(g, done));
      caches.base?.dispose();
      caches.tuned?.dispose();
      patchMask.dispose();
      done += bp.length;
      cb.onProgress?.(done);
      await new Promise<void>((r) => setImmediate(r));
    }
  } finally {
    tf.dispose(means);
  }
  return out;
}
