// Stage 7, low-rank reconstruction: PCA of the per-position activation difference h_tuned − h_base at one
// layer on a training split of pairs, then the held-out recovery of patching only its top-k directions,
// beside a random k-dimensional subspace.
import * as tf from "@tensorflow/tfjs-core";
import { readValues } from "../model/read.js";
import type { Pair } from "../data/pairs.js";
import { makeBatch, marginsOf, positionMask, repeatBatch, responseLogprobs, type PairBatch } from "../data/batch.js";
import { hookName } from "../model/hooks.js";
import { forward, type LlamaModel } from "../model/llama.js";
import { pcaOfDifferences, randomSubspace } from "../stats/pca.js";
import { mean, permutation, seededRandom } from "../stats/stats.js";
import { gainOf, subspace } from "./patches.js";
import { headGroup, type ModelPair } from "./scoring.js";
import type { LowRankResult, PatchingEntry, RunCallbacks, RunSettings } from "./settings.js";

/** At most how many low-rank patches run stacked through the layers above and the head at once (see headGroup). */
export const LOWRANK_STACK = 8;

/** The low-rank layer: the one asked for, else the first whose resid_post recovery is within 5% of the best. */
export function choosePcaLayer(patching: PatchingEntry[], s: RunSettings, L: number): { layer: number; chosenBy: string } {
  if (s.pcaLayer !== null) {
    if (!(s.pcaLayer >= 0 && s.pcaLayer < L)) throw new Error(`--pca-layer ${s.pcaLayer} is outside 0..${L - 1}`);
    return { layer: s.pcaLayer, chosenBy: "--pca-layer" };
  }
  const rp = patching.filter((p) => p.direction === "tuned->base" && p.site === "resid_post" && Number.isFinite(p.recovery));
  if (!rp.length) return { layer: Math.floor(L / 2), chosenBy: "middle layer (no finite resid_post tuned->base recovery: not patched, or zero mean gap)" };
  const best = Math.max(...rp.map((p) => p.recovery));
  return { layer: rp.find((p) => p.recovery >= best - 0.05 * Math.abs(best))!.layer, chosenBy: "first layer whose resid_post recovery is within 5% of the maximum" };
}

/** Positions (into the pairs array) in batches of `size`. */
function chunks(idx: number[], size: number): number[][] {
  const out: number[][] = [];
  for (let i = 0; i < idx.length; i += size) out.push(idx.slice(i, i + size));
  return out;
}

/** The train/test split of n pairs (sorted positions); the test part holds round(n · testFrac), at least 1. */
export function lowRankSplit(n: number, s: RunSettings): { train: number[]; test: number[] } {
  const order = permutation(n, seededRandom(s.seed + 17));
  const nTest = Math.min(n - 1, Math.max(1, Math.round(n * s.pcaTestFrac)));
  return { test: order.slice(0, nTest).sort((a, b) => a - b), train: order.slice(nTest).sort((a, b) => a - b) };
}

/** The k values tried: powers of two below H, then H. */
export function lowRankKs(H: number): number[] {
  const ks: number[] = [];
  for (let k = 1; k < H; k *= 2) ks.push(k);
  ks.push(H);
  return ks;
}

/** PCA at `layer` on the training pairs, then held-out recovery for each k (tuned->base, resid_post). */
export async function lowRankStage(
  models: ModelPair,
  pairs: Pair[],
  at: { layer: number; chosenBy: string },
  s: RunSettings,
  scores: { marginBase: Float64Array; marginTuned: Float64Array; gapTooSmall: boolean },
  cb: RunCallbacks,
): Promise<LowRankResult> {
  const layer = at.layer;
  const H = models.base.config.hiddenSize;
  const { train, test } = lowRankSplit(pairs.length, s);
  const site = hookName("resid_post", layer);
  const upTo = (m: LlamaModel, batch: PairBatch) => forward(m, batch.ids, { lengths: batch.lengths, stopAfter: layer, cache: [site] }).cache.take(site);
  const tick = () => new Promise<void>((r) => setImmediate(r));
  cb.onStage?.(`PCA at layer ${layer}`, pairs.length);
  let done = 0;
  const rows: Float32Array[] = [];
  for (const js of chunks(train, s.batchPairs)) {
    const batch = makeBatch(js.map((j) => pairs[j]!));
    const hb = upTo(models.base, batch);
    const ht = upTo(models.tuned, batch);
    const diff = readValues(() => tf.sub(ht, hb));
    for (let r = 0; r < batch.ids.length; r++) for (let t = batch.respStart[r]!; t < batch.lengths[r]!; t++) rows.push(diff.slice((r * batch.T + t) * H, (r * batch.T + t + 1) * H));
    tf.dispose([hb, ht]);
    cb.onProgress?.((done += js.length));
    await tick();
  }
  const D = tf.tensor2d(concatRows(rows, H), [rows.length, H]);
  const p = pcaOfDifferences(D);
  D.dispose();
  const ks = lowRankKs(H);
  const gainsK = ks.map(() => ({ real: [] as number[], random: [] as number[] }));
  const testGap: number[] = [];
  for (const js of chunks(test, s.batchPairs)) {
    const batch = makeBatch(js.map((j) => pairs[j]!));
    const hb = upTo(models.base, batch);
    const ht = upTo(models.tuned, batch);
    const mask = positionMask(batch, s.positions);
    // every (k, real/random) patch enters the base model after `layer`; they run stacked, STACK at a time, so
    // the layers above and the head are read once per group rather than once per patch
    const runs = ks.flatMap((k, ki) => (["real", "random"] as const).map((which) => ({ k, ki, which })));
    const G = Math.min(LOWRANK_STACK, headGroup(batch.logitsAt.length, models.base.config.vocabSize));
    for (let g = 0; g < runs.length; g += G) {
      const group = runs.slice(g, g + G);
      const values = group.map(({ k, which }) => {
        const basis = which === "real" ? tf.tensor2d(p.components.subarray(0, Math.min(k, p.rank) * H), [Math.min(k, p.rank), H]) : randomSubspace(k, H, seededRandom(s.seed * 31 + k));
        const v = subspace(s.alpha, basis)(hb, ht, mask);
        basis.dispose();
        return v;
      });
      const stacked = tf.concat(values);
      tf.dispose(values);
      const rows = repeatBatch(batch, group.length);
      const out = forward(models.base, rows.ids, { lengths: rows.lengths, start: { layer: layer + 1, resid: stacked }, logitsAt: rows.logitsAt });
      const m = marginsOf(responseLogprobs(out.logits!, rows, s.perToken));
      out.dispose();
      stacked.dispose();
      group.forEach(({ ki, which }, r) => js.forEach((j, i) => gainsK[ki]![which].push(gainOf("tuned->base", m[r * js.length + i]!, scores.marginBase[j]!, scores.marginTuned[j]!))));
    }
    for (const j of js) testGap.push(scores.marginTuned[j]! - scores.marginBase[j]!);
    tf.dispose([hb, ht, mask]);
    cb.onProgress?.((done += js.length));
    await tick();
  }
  const mg = mean(testGap);
  return {
    layer,
    site: "resid_post",
    chosen_by: at.chosenBy,
    train_pairs: train,
    test_pairs: test,
    n_rows: rows.length,
    explained_variance_ratio: p.explainedVarianceRatio,
    recovery: ks.map((k, ki) => ({
      k,
      k_used: Math.min(k, p.rank),
      recovery: scores.gapTooSmall ? NaN : mean(gainsK[ki]!.real) / mg,
      random_subspace: scores.gapTooSmall ? NaN : mean(gainsK[ki]!.random) / mg,
    })),
    components: p.components.slice(0, Math.min(p.rank, H) * H),
  };
}

function concatRows(rows: Float32Array[], H: number): Float32Array {
  const out = new Float32Array(rows.length * H);
  rows.forEach((r, i) => out.set(r, i * H));
  return out;
}
