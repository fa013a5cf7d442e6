// The controls beside every real patch: a random direction of the same norm, drawn per pair from a seed keyed
// by what it is for (so a pair's control does not depend on batch, shard or which other layers are swept),
// and mean-ablation, which needs each site's dataset mean and so runs once every pair has been scored.
import * as tf from "@tensorflow/tfjs-core";
import type { Pair } from "../data/pairs.js";
import { makeBatch, pairedInput, positionMask } from "../data/batch.js";
import { hookName } from "../model/hooks.js";
import { forward } from "../model/llama.js";
import { tfSeed } from "../stats/stats.js";
import { meanAblation, randomDirection, roles, type Patch } from "./patches.js";
import type { Combo, ModelPair, Plan, ScoredBatch } from "./scoring.js";
import { DIRECTIONS, SITES, type RunSettings } from "./settings.js";
import { type PairState, type RunCallbacks } from "./schema.js";
import { meanOver, positionsOf, type SumsLayout } from "./sums.js";
import { sweepBatch } from "./sweep.js";

/** What a random draw is for: part of every draw's key. */
export const PURPOSE = { randomDirection: 1, randomSubspace: 2 } as const;

/**
 * Gaussian noise [B, T, H] for the random-direction control of `c`, zero past each row's length. Pair i's prompt
 * positions share one draw (both rows hold the same prompt activations, computed once), keyed by (seed, purpose,
 * direction, site, layer, pair index, 2); each row's response positions are drawn from the same key ending in
 * 0 (chosen) or 1 (rejected).
 */
export function keyedNoise(
  s: RunSettings,
  c: Combo,
  pairs: Pair[],
  lengths: number[],
  T: number,
  H: number,
): tf.Tensor {
  return tf.tidy(() => {
    const key = (i: number, part: number) =>
      tfSeed(
        s.seed,
        PURPOSE.randomDirection,
        DIRECTIONS.indexOf(c.direction),
        SITES.indexOf(c.site),
        c.layer,
        pairs[i]!.index,
        part,
      );
    const rows = lengths.map((len, r) => {
      const p = pairs[r >> 1]!.promptIds.length;
      const parts = [
        tf.randomNormal([p, H], 0, 1, "float32", key(r >> 1, 2)),
        tf.randomNormal([len - p, H], 0, 1, "float32", key(r >> 1, r & 1)),
      ];
      if (len < T) parts.push(tf.zeros([T - len, H]));
      return tf.concat(parts);
    });
    return tf.stack(rows);
  });
}

/** The random-direction control of each combo in a scored batch (its noise is freed with the patch result). */
export const randomDirectionPatch =
  (s: RunSettings, sc: ScoredBatch, H: number) =>
  (c: Combo): Patch =>
  (hDst, hSrc, mask) => {
    const noise = keyedNoise(s, c, sc.pairs, sc.batch.lengths, sc.batch.T, H);
    const out = randomDirection(s.alpha, noise)(hDst, hSrc, mask);
    noise.dispose();
    return out;
  };

/** Each mean-ablated site's dataset mean in the source model over every valid position of every pair, keyed "model site". */
export function ablationMeans(plan: Plan, states: PairState[], layout: SumsLayout): Record<string, Float32Array> {
  const positions = states.reduce((a, st) => a + positionsOf(st).all, 0);
  const out: Record<string, Float32Array> = {};
  for (const src of new Set(plan.combos.map((c) => roles(c.direction).src))) {
    layout.sites.forEach(
      (site, si) =>
        (out[`${src} ${site}`] = Float32Array.from(meanOver(states, layout.siteSum(src, si), layout.H, positions))),
    );
  }
  return out;
}

/**
 * Mean-ablation gains [combo][pair] of one batch of pairs: each combo's site replaced (α-mixed) by the source
 * model's dataset mean (`means`, from ablationMeans); `margin` holds the batch's unpatched margins.
 */
export function meanAblationBatch(
  models: ModelPair,
  pairs: Pair[],
  plan: Plan,
  means: Record<string, Float32Array>,
  margin: { base: number[]; tuned: number[] },
  s: RunSettings,
): number[][] {
  const batch = makeBatch(pairs);
  const patchMask = positionMask(batch, s.positions);
  const tensors = new Map<string, tf.Tensor1D>();
  const meanOf = (c: Combo) => {
    const key = `${roles(c.direction).src} ${hookName(c.site, c.layer)}`;
    if (!means[key]) throw new Error(`mean ablation: no dataset mean for ${key}`);
    if (!tensors.has(key)) tensors.set(key, tf.tensor1d(means[key]));
    return tensors.get(key)!;
  };
  const cacheOf = (m: "base" | "tuned") =>
    plan.combos.some((c) => roles(c.direction).dst === m)
      ? forward(models[m], batch.ids, { ...pairedInput(batch), cache: plan.patchSites, logitsAt: "none" }).cache
      : undefined;
  const caches = { base: cacheOf("base"), tuned: cacheOf("tuned") };
  try {
    return sweepBatch(
      models,
      { batch, caches, margin, patchMask },
      plan.combos,
      (c) => meanAblation(s.alpha, meanOf(c)),
      s,
    );
  } finally {
    caches.base?.dispose();
    caches.tuned?.dispose();
    tf.dispose([patchMask, ...tensors.values()]);
  }
}

/** Runs meanAblationBatch on pair batches elsewhere (worker threads): each batch's gains, in batch order. */
export type AblationRunner = (
  batches: Array<[number, number]>,
  means: Record<string, Float32Array>,
  margins: Array<{ base: number[]; tuned: number[] }>,
) => Promise<number[][][]>;

/**
 * Mean-ablation gains [combo][pair] over all pairs, batch by batch (in this thread, or through `runner`); the
 * numbers are the same either way. Re-runs the patched model per batch for its caches.
 */
export async function meanAblationStage(
  models: ModelPair,
  pairs: Pair[],
  batches: Array<[number, number]>,
  plan: Plan,
  states: PairState[],
  layout: SumsLayout,
  s: RunSettings,
  cb: RunCallbacks,
  runner?: AblationRunner,
): Promise<Float64Array[]> {
  const n = pairs.length;
  const out = plan.combos.map(() => new Float64Array(n));
  const means = ablationMeans(plan, states, layout);
  const margins = batches.map(([start, end]) => ({
    base: states.slice(start, end).map((st) => st.record.margin.base),
    tuned: states.slice(start, end).map((st) => st.record.margin.tuned),
  }));
  cb.onStage?.("mean-ablation controls", n);
  if (runner) {
    const gains = await runner(batches, means, margins);
    batches.forEach(([start], bi) => gains[bi]!.forEach((g, ci) => out[ci]!.set(g, start)));
    cb.onProgress?.(n);
    return out;
  }
  for (const [bi, [start, end]] of batches.entries()) {
    meanAblationBatch(models, pairs.slice(start, end), plan, means, margins[bi]!, s).forEach((g, ci) =>
      out[ci]!.set(g, start),
    );
    cb.onProgress?.(end);
    await new Promise<void>((r) => setImmediate(r));
  }
  return out;
}
