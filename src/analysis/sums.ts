// The vectors each pair contributes to the dataset-level stages, kept per pair so that the dataset's numbers
// are sums over pairs in index order, whatever the batching, shard or resume: each row's mean response
// activation (probe features), the pair's summed h_tuned − h_base over response positions (mean difference),
// and each patch site's summed activation over all positions (mean-ablation means).
import * as tf from "@tensorflow/tfjs-core";
import { readValues } from "../model/read.js";
import { hookName, type HookName } from "../model/hooks.js";
import type { ScoredBatch } from "./scoring.js";
import type { PairState } from "./schema.js";

/** Where each vector sits in a pair's Float64Array of sums. */
export interface SumsLayout {
  L: number;
  H: number;
  sites: HookName[]; // patch sites whose sums mean-ablation needs
  size: number;
  /** Offset of the probe feature of (model, layer, row 0 = chosen / 1 = rejected): H values. */
  probe(model: "base" | "tuned", layer: number, row: 0 | 1): number;
  /** Offset of the summed h_tuned − h_base at resid_post of a layer: H values. */
  meanDiff(layer: number): number;
  /** Offset of the summed activation of a model at sites[si]: H values. */
  siteSum(model: "base" | "tuned", si: number): number;
}

export function sumsLayout(L: number, H: number, sites: HookName[]): SumsLayout {
  const m = (model: "base" | "tuned") => (model === "base" ? 0 : 1);
  const diffAt = 2 * L * 2 * H;
  const sitesAt = diffAt + L * H;
  return {
    L,
    H,
    sites,
    size: sitesAt + 2 * sites.length * H,
    probe: (model, layer, row) => ((m(model) * L + layer) * 2 + row) * H,
    meanDiff: (layer) => diffAt + layer * H,
    siteSum: (model, si) => sitesAt + (m(model) * sites.length + si) * H,
  };
}

/** Per-row reduction over positions of `values` [B, T, H] weighted by mask [B, T, 1] → [B][H] (float32 → float64). */
function rowSums(values: () => tf.Tensor, mask: tf.Tensor, divide = false): Float32Array {
  return readValues(() => {
    const sum = tf.sum(tf.mul(values(), mask), 1);
    return divide ? tf.div(sum, tf.sum(mask, 1)) : sum;
  });
}

/** The sums of every pair of a scored batch. */
export function pairSums(sc: ScoredBatch, layout: SumsLayout): Float64Array[] {
  const { L, H } = layout;
  const out = sc.pairs.map(() => new Float64Array(layout.size));
  const put = (rows: Float32Array, at: (i: number, row: 0 | 1) => number, add: boolean) =>
    sc.pairs.forEach((_, i) => {
      for (const row of [0, 1] as const) {
        const src = rows.subarray((2 * i + row) * H, (2 * i + row + 1) * H);
        const dst = out[i]!;
        const o = at(i, row);
        for (let j = 0; j < H; j++) dst[o + j] = add ? dst[o + j]! + src[j]! : src[j]!;
      }
    });
  for (let l = 0; l < L; l++) {
    const site = hookName("resid_post", l);
    const hb = sc.runs.base.cache.get(site);
    const ht = sc.runs.tuned.cache.get(site);
    for (const [model, h] of [
      ["base", hb],
      ["tuned", ht],
    ] as const)
      put(
        rowSums(() => h, sc.mask.response, true),
        (_, row) => layout.probe(model, l, row),
        false,
      );
    put(
      rowSums(() => tf.sub(ht, hb), sc.mask.response),
      () => layout.meanDiff(l),
      true,
    );
  }
  layout.sites.forEach((site, si) => {
    for (const model of ["base", "tuned"] as const)
      put(
        rowSums(() => sc.runs[model].cache.get(site), sc.mask.all),
        () => layout.siteSum(model, si),
        true,
      );
  });
  return out;
}

/** Σ over pairs (in index order) of H values at `offset` of each pair's sums, divided by `count`. */
export function meanOver(states: PairState[], offset: number, H: number, count: number): Float64Array {
  const acc = new Float64Array(H);
  for (const st of states) for (let j = 0; j < H; j++) acc[j]! += st.sums[offset + j]!;
  return acc.map((v) => v / Math.max(1, count));
}

/** Number of valid positions (prompt twice, both responses) and of response positions of a pair. */
export const positionsOf = (st: PairState) => ({
  all: 2 * st.record.tokens.prompt + st.record.tokens.chosen + st.record.tokens.rejected,
  response: st.record.tokens.chosen + st.record.tokens.rejected,
});
