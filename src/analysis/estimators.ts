// Stage 6, the estimators over pairs: LASSO of the per-pair gap on per-layer activation distances, and
// linear probes (chosen vs rejected) on each model's mean response activation per layer.
import * as tf from "@tensorflow/tfjs-core";
import { hookName } from "../model/hooks.js";
import { lassoCV } from "../stats/lasso.js";
import { probeCV } from "../stats/logistic.js";
import type { ScoredBatch } from "./scoring.js";
import type { LassoResult, PairRecord, ProbeResult, RunCallbacks, RunSettings } from "./settings.js";

/** LASSO with CV over the pairs' `distance` features, or null with fewer than 3 pairs. */
export function lassoStage(records: PairRecord[], L: number, s: RunSettings): LassoResult | null {
  const n = records.length;
  if (n < 3) return null;
  const X = Float64Array.from(records.flatMap((r) => r.distance));
  const y = Float64Array.from(records, (r) => r.gap);
  const fit = lassoCV(X, n, L, y, { folds: s.folds, seed: s.seed, stabilityReps: s.stabilityReps });
  return {
    ...fit,
    X: records.map((r) => [...r.distance]),
    y: Array.from(y),
    feature: "mean ‖h_tuned − h_base‖₂ at resid_post over response positions",
    nonzero_layers: fit.nonzero,
  };
}

/** Each row's mean response activation at resid_post, per model and layer: [2n, H] per (model, layer). */
export class ProbeFeatures {
  readonly rows: Record<"base" | "tuned", Float64Array[]>;

  constructor(
    readonly n: number,
    readonly L: number,
    readonly H: number,
  ) {
    this.rows = { base: Array.from({ length: L }, () => new Float64Array(2 * n * H)), tuned: Array.from({ length: L }, () => new Float64Array(2 * n * H)) };
  }

  add(sc: ScoredBatch): void {
    for (let l = 0; l < this.L; l++) {
      for (const name of ["base", "tuned"] as const) {
        const h = sc.runs[name].cache.get(hookName("resid_post", l));
        const f = tf.tidy(() => tf.div(tf.sum(tf.mul(h, sc.mask.response), 1), tf.sum(sc.mask.response, 1)).dataSync());
        this.rows[name][l]!.set(Float64Array.from(f), 2 * sc.offset * this.H);
      }
    }
  }
}

/** Cross-validated probes per model and layer (rows 2i chosen = 1, 2i+1 rejected = 0; folds keep a pair together). */
export async function probeStage(f: ProbeFeatures, s: RunSettings, cb: RunCallbacks): Promise<ProbeResult[]> {
  const out: ProbeResult[] = [];
  const labels = Array.from({ length: 2 * f.n }, (_, r) => (r % 2 === 0 ? 1 : 0));
  const groups = Array.from({ length: 2 * f.n }, (_, r) => Math.floor(r / 2));
  let step = 1;
  for (const model of ["base", "tuned"] as const) {
    for (let l = 0; l < f.L; l++) {
      if (f.n >= 2) {
        const pr = probeCV(f.rows[model][l]!, 2 * f.n, f.H, labels, groups, { folds: s.folds, C: s.C, seed: s.seed });
        out.push({ model, layer: l, accuracy: pr.accuracy, diff_means_accuracy: pr.diffMeansAccuracy });
      }
      cb.onProgress?.(++step);
      await new Promise<void>((r) => setImmediate(r));
    }
  }
  return out;
}
