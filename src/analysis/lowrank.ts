// Stage 7, low-rank reconstruction: PCA of the per-position activation difference h_tuned − h_base at one
// layer on a training split of pairs, then the held-out recovery of patching only its top-k directions,
// beside a random k-dimensional subspace.
import * as tf from "@tensorflow/tfjs-core";
import { readValues } from "../model/read.js";
import type { Pair } from "../data/pairs.js";
import { makeBatch } from "../data/batch.js";
import { pcaOfDifferences } from "../stats/pca.js";
import { mean, permutation, seededRandom } from "../stats/stats.js";
import {
  BasisCache,
  componentsFor,
  layerEditGains,
  meanRow,
  randomBasis,
  steer,
  steeringSummary,
  steeringVectors,
  STEERING_STRENGTHS,
  subspaceEdit,
  type LayerEdit,
} from "./steering.js";
import { residAfter } from "../engine/margins.js";
import type { ModelPair } from "./scoring.js";
import type { RunSettings } from "./settings.js";
import type { LowRankResult, PatchingEntry, RunCallbacks } from "./schema.js";

/**
 * The low-rank layer: the one asked for, else the first whose resid_post recovery is within 5% of the best,
 * among the layers where the two models' activations differ (`differs`; a window's recovery can peak at a layer
 * whose own activations are identical, where a PCA has nothing to find).
 */
export function choosePcaLayer(
  patching: PatchingEntry[],
  s: RunSettings,
  L: number,
  differs: (layer: number) => boolean = () => true,
): { layer: number; chosenBy: string } {
  if (s.pcaLayer !== null) {
    if (!(s.pcaLayer >= 0 && s.pcaLayer < L)) throw new Error(`pcaLayer ${s.pcaLayer} is outside 0..${L - 1}`);
    return { layer: s.pcaLayer, chosenBy: "--pca-layer" };
  }
  const rp = patching.filter(
    (p) => p.direction === "tuned->base" && p.site === "resid_post" && Number.isFinite(p.recovery) && differs(p.layer),
  );
  if (!rp.length)
    return {
      layer: Math.floor(L / 2),
      chosenBy: "middle layer (no finite resid_post tuned->base recovery: not patched, or zero mean gap)",
    };
  const best = Math.max(...rp.map((p) => p.recovery));
  return {
    layer: rp.find((p) => p.recovery >= best - 0.05 * Math.abs(best))!.layer,
    chosenBy: "first layer whose resid_post recovery is within 5% of the maximum",
  };
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

/** The per-position differences h_tuned − h_base at `layer`'s resid_post on the response positions of the pairs at `idx`. */
async function differenceRows(
  models: ModelPair,
  pairs: Pair[],
  idx: number[],
  layer: number,
  s: RunSettings,
  onPairs: (count: number) => void,
): Promise<Float32Array[]> {
  const H = models.base.config.hiddenSize;
  const rows: Float32Array[] = [];
  for (const js of chunks(idx, s.batchPairs)) {
    const batch = makeBatch(js.map((j) => pairs[j]!));
    const hb = residAfter(models.base, batch, layer);
    const ht = residAfter(models.tuned, batch, layer);
    const diff = readValues(() => tf.sub(ht, hb));
    for (let r = 0; r < batch.ids.length; r++)
      for (let t = batch.respStart[r]!; t < batch.lengths[r]!; t++)
        rows.push(diff.slice((r * batch.T + t) * H, (r * batch.T + t + 1) * H));
    tf.dispose([hb, ht]);
    onPairs(js.length);
    await new Promise<void>((r) => setImmediate(r));
  }
  return rows;
}

/**
 * The edits the stage measures, named: the top-k principal subspace (`real k`; every k past the training rows'
 * rank patches the same subspace, so it runs once, as k = rank) and a random k-dimensional one (`random k`) for
 * each k, then steering by each vector at each strength (`steer <vector> <β>`).
 */
function lowRankEdits(
  p: { components: Float32Array; rank: number },
  ks: number[],
  vectors: Array<{ name: string; values: Float32Array }>,
  H: number,
  s: RunSettings,
  bases: BasisCache,
): LayerEdit[] {
  const real = (k: number) => bases.get(`real ${k}`, () => tf.tensor2d(p.components.subarray(0, k * H), [k, H]));
  const edits: LayerEdit[] = [];
  const seen = new Set<number>();
  for (const k of ks) {
    const used = Math.min(k, p.rank);
    if (!seen.has(used)) edits.push(subspaceEdit(`real ${used}`, s.alpha, () => real(used)));
    seen.add(used);
    edits.push(subspaceEdit(`random ${k}`, s.alpha, () => randomBasis(bases, k, H, s.seed)));
  }
  for (const v of vectors)
    for (const beta of STEERING_STRENGTHS)
      edits.push({ name: `steer ${v.name} ${beta}`, apply: steer(v.values, beta) });
  return edits;
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
  cb.onStage?.(`PCA at layer ${layer}`, pairs.length);
  let done = 0;
  const progress = (c: number) => cb.onProgress?.((done += c));
  const rows = await differenceRows(models, pairs, train, layer, s, progress);
  const D = tf.tensor2d(concatRows(rows, H), [rows.length, H]);
  const p = pcaOfDifferences(D);
  D.dispose();
  const ks = lowRankKs(H);
  // steering with the training pairs' mean difference, its projection on the top principal directions, and a
  // random direction of the same norm: the base model alone, no tuned activations at inference
  const mu = meanRow(rows, H);
  const k90 = Math.min(p.rank, componentsFor(p.explainedVarianceRatio, 0.9));
  const vectors = steeringVectors(mu, p.components, k90, H, s.seed);
  const bases = new BasisCache();
  let g: Map<string, number[]>;
  try {
    g = await layerEditGains(
      models,
      pairs,
      test,
      layer,
      lowRankEdits(p, ks, vectors, H, s, bases),
      s,
      scores,
      progress,
    );
  } finally {
    bases.dispose();
  }
  const mg = mean(test.map((j) => scores.marginTuned[j]! - scores.marginBase[j]!));
  const recovery = (name: string) => (scores.gapTooSmall ? NaN : mean(g.get(name)!) / mg);
  const k_used = (k: number) => Math.min(k, p.rank);
  return {
    layer,
    site: "resid_post",
    chosen_by: at.chosenBy,
    train_pairs: train,
    test_pairs: test,
    n_rows: rows.length,
    explained_variance_ratio: p.explainedVarianceRatio,
    recovery: ks.map((k) => ({
      k,
      k_used: k_used(k),
      recovery: recovery(`real ${k_used(k)}`),
      random_subspace: recovery(`random ${k}`),
      gains: g.get(`real ${k_used(k)}`)!,
      random_gains: g.get(`random ${k}`)!,
    })),
    components: p.components.slice(0, Math.min(p.rank, H) * H),
    k_90: k90,
    steering_vector: mu,
    steering: steeringSummary(vectors, g, recovery),
  };
}

function concatRows(rows: Float32Array[], H: number): Float32Array {
  const out = new Float32Array(rows.length * H);
  rows.forEach((r, i) => out.set(r, i * H));
  return out;
}
