// Stage 4, activation distances: per pair and layer, how far the tuned model's residual stream is from the
// base model's over the response positions (the LASSO's features), and the mean difference per layer.
import * as tf from "@tensorflow/tfjs-core";
import { readValues } from "../model/read.js";
import { hookName } from "../model/hooks.js";
import type { ScoredBatch } from "./scoring.js";

/** Mean over masked positions of per-position values [B, T] computed by `values` → per row [B]. */
function maskedRowMean(values: () => tf.Tensor, mask: tf.Tensor): Float32Array {
  return readValues(() =>
    tf.div(tf.sum(tf.mul(values(), tf.squeeze(mask, [2])), 1), tf.maximum(tf.sum(mask, [1, 2]), 1)),
  );
}

/**
 * Per pair of the batch, per layer: mean ‖h_tuned − h_base‖₂ and mean cosine distance at resid_post over the
 * response positions of both rows (each row weighted by its response length).
 */
export function distancesOf(sc: ScoredBatch, L: number): { distance: number[][]; cosine: number[][] } {
  const nb = sc.pairs.length;
  const distance = Array.from({ length: nb }, () => new Array<number>(L));
  const cosine = Array.from({ length: nb }, () => new Array<number>(L));
  const { lengths, respStart } = sc.batch;
  for (let l = 0; l < L; l++) {
    const hb = sc.runs.base.cache.get(hookName("resid_post", l));
    const ht = sc.runs.tuned.cache.get(hookName("resid_post", l));
    const d = maskedRowMean(() => tf.norm(tf.sub(ht, hb), 2, -1), sc.mask.response);
    const cos = maskedRowMean(
      () =>
        tf.sub(
          1,
          tf.div(tf.sum(tf.mul(ht, hb), -1), tf.maximum(tf.mul(tf.norm(ht, 2, -1), tf.norm(hb, 2, -1)), 1e-12)),
        ),
      sc.mask.response,
    );
    for (let i = 0; i < nb; i++) {
      const lc = lengths[2 * i]! - respStart[2 * i]!;
      const lr = lengths[2 * i + 1]! - respStart[2 * i + 1]!;
      distance[i]![l] = (d[2 * i]! * lc + d[2 * i + 1]! * lr) / (lc + lr);
      cosine[i]![l] = (cos[2 * i]! * lc + cos[2 * i + 1]! * lr) / (lc + lr);
    }
  }
  return { distance, cosine };
}
