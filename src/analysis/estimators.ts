// Stage 6, the estimators over pairs: LASSO of the per-pair gap on per-layer activation distances, and
// linear probes (chosen vs rejected) on each model's mean response activation per layer.
import { lassoCV, lassoPermutationTest } from "../stats/lasso.js";
import { probeCV } from "../stats/logistic.js";
import { kFolds, seededRandom } from "../stats/stats.js";
import type { RunSettings } from "./settings.js";
import type { LassoResult, PairRecord, PairState, ProbeResult, RunCallbacks } from "./schema.js";
import type { SumsLayout } from "./sums.js";

/** How many CV fold seeds the LASSO selection is checked over. */
export const LASSO_SEEDS = 5;

/** Shuffles of the per-pair gaps in LASSO's permutation test (p resolves down to 1/201). */
export const LASSO_PERMUTATIONS = 200;

/** The K-fold assignment of n pairs that LASSO and the probes use (K = folds capped at n, at least 2). */
export function cvFolds(n: number, s: RunSettings): { folds: number; fold_of_pair: number[] } {
  const K = Math.max(2, Math.min(s.folds, n));
  return { folds: K, fold_of_pair: kFolds(n, K, seededRandom(s.seed)) };
}

/** LASSO with CV over the pairs' `distance` features, or null with fewer than 3 pairs. */
export function lassoStage(records: PairRecord[], L: number, s: RunSettings): LassoResult | null {
  const n = records.length;
  if (n < 3) return null;
  const X = Float64Array.from(records.flatMap((r) => r.distance));
  const y = Float64Array.from(records, (r) => r.gap);
  const fit = lassoCV(X, n, L, y, { folds: s.folds, seed: s.seed, stabilityReps: s.stabilityReps });
  // the same fit with only the CV fold seed changed: a selection that moves with it is not a finding
  const seed_sets = Array.from({ length: LASSO_SEEDS }, (_, k) => ({
    seed: s.seed + k,
    nonzero_layers:
      k === 0 ? fit.nonzero : lassoCV(X, n, L, y, { folds: s.folds, seed: s.seed + k, stabilityReps: 0 }).nonzero,
  }));
  return {
    ...fit,
    X: records.map((r) => [...r.distance]),
    y: Array.from(y),
    feature: "mean ‖h_tuned − h_base‖₂ at resid_post over response positions",
    nonzero_layers: fit.nonzero,
    seed_sets,
    stable_across_seeds: seed_sets.every((x) => x.nonzero_layers.join() === fit.nonzero.join()),
    permutation: lassoPermutationTest(X, n, L, y, { folds: s.folds, seed: s.seed, reps: LASSO_PERMUTATIONS }),
  };
}

/** Cross-validated probes per model and layer (rows 2i chosen = 1, 2i+1 rejected = 0; folds keep a pair together). */
export async function probeStage(
  states: PairState[],
  layout: SumsLayout,
  s: RunSettings,
  cb: RunCallbacks,
): Promise<ProbeResult[]> {
  const out: ProbeResult[] = [];
  const { L, H } = layout;
  const n = states.length;
  const labels = Array.from({ length: 2 * n }, (_, r) => (r % 2 === 0 ? 1 : 0));
  const groups = Array.from({ length: 2 * n }, (_, r) => Math.floor(r / 2));
  let step = 1;
  for (const model of ["base", "tuned"] as const) {
    for (let l = 0; l < L; l++) {
      if (n >= 2) {
        const X = new Float64Array(2 * n * H);
        states.forEach((st, i) =>
          X.set(st.sums.subarray(layout.probe(model, l, 0), layout.probe(model, l, 0) + 2 * H), 2 * i * H),
        );
        const pr = probeCV(X, 2 * n, H, labels, groups, { folds: s.folds, C: s.C, seed: s.seed });
        out.push({ model, layer: l, accuracy: pr.accuracy, diff_means_accuracy: pr.diffMeansAccuracy });
      }
      cb.onProgress?.(++step);
      await new Promise<void>((r) => setImmediate(r));
    }
  }
  return out;
}
