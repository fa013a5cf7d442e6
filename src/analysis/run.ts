// The causal-probe analysis end to end: margins, layer patching with controls, activation distances, LASSO,
// linear probes, low-rank (PCA) reconstruction and the logit lens. Pure computation: models and pairs in,
// a results record out; progress and per-pair records go to callbacks.
import * as tf from "@tensorflow/tfjs-core";
import type { Pair } from "../io/pairs.js";
import { forward, type LlamaModel } from "../model/llama.js";
import { makeBatch, marginsOf, positionMask, responseLogprobs, type PairBatch } from "./batch.js";
import { lassoCV, type LassoCVResult } from "./lasso.js";
import { probeCV } from "./logistic.js";
import { hookName, mixPatch, randomPatch, runPatched, sitesNeeded, type Direction, type Site } from "./patching.js";
import { pcaOfDifferences, projectPatch, randomSubspace } from "./pca.js";
import { bootstrapRatioCI, mean, permutation, seededRandom, tfSeed } from "./stats.js";

/** Every choice the analysis makes; defaults in DEFAULT_SETTINGS. */
export interface RunSettings {
  perToken: boolean; // mean instead of sum of response-token log-probabilities
  positions: "all" | "response"; // where patches apply
  alpha: number; // patch strength: h = h_dst + α (h_src − h_dst)
  sites: Site[];
  layers: number[] | null; // null = all
  directions: Direction[];
  controls: boolean; // random-direction and mean-ablation controls beside every real patch
  seed: number;
  folds: number; // K for CV of LASSO and probes
  C: number; // inverse L2 strength of the probes
  stabilityReps: number; // bootstrap refits for LASSO stability selection
  bootstrap: number; // resamples for recovery CIs
  pcaLayer: number | null; // null = first layer within 5% of the best resid_post recovery
  pcaTestFrac: number; // held-out fraction of pairs for PCA recovery
  batchPairs: number; // pairs per forward batch
}

export const DEFAULT_SETTINGS: RunSettings = {
  perToken: false,
  positions: "all",
  alpha: 1,
  sites: ["resid_post"],
  layers: null,
  directions: ["tuned->base"],
  controls: true,
  seed: 0,
  folds: 5,
  C: 1,
  stabilityReps: 100,
  bootstrap: 1000,
  pcaLayer: null,
  pcaTestFrac: 0.5,
  batchPairs: 4,
};

/** Gains of one kind of patch with their recovery (mean gain / mean gap) and bootstrap CI. */
export interface GainSummary {
  gains: number[];
  recovery: number;
  recovery_ci: [number, number];
}

export interface PatchingEntry extends GainSummary {
  direction: Direction;
  site: Site;
  layer: number;
  alpha: number;
  controls: { random_direction: GainSummary; mean_ablation: GainSummary } | null;
}

export interface PairRecord {
  index: number;
  line: number;
  tokens: { prompt: number; chosen: number; rejected: number };
  logp: { base: { chosen: number; rejected: number }; tuned: { chosen: number; rejected: number } };
  margin: { base: number; tuned: number };
  gap: number;
  distance: number[]; // per layer: mean ‖h_tuned − h_base‖ over response positions (resid_post)
  cosine_distance: number[];
  gains: Record<string, number[]>; // "direction site" → per layer (real patches)
}

export interface Results {
  n_pairs: number;
  num_layers: number;
  hidden_size: number;
  pairs: PairRecord[];
  summary: { mean_margin_base: number; mean_margin_tuned: number; mean_gap: number; tuned_prefers_chosen: number; base_prefers_chosen: number };
  patching: PatchingEntry[];
  lasso: (LassoCVResult & { X: number[][]; y: number[]; feature: string; nonzero_layers: number[] }) | null;
  probes: Array<{ model: "base" | "tuned"; layer: number; accuracy: number; diff_means_accuracy: number }>;
  pca: {
    layer: number;
    site: "resid_post";
    chosen_by: string;
    train_pairs: number[];
    test_pairs: number[];
    n_rows: number;
    explained_variance_ratio: number[];
    recovery: Array<{ k: number; k_used: number; recovery: number; random_subspace: number }>;
    components: Float32Array;
  } | null;
  logit_lens: { layers: string[]; base: number[]; tuned: number[] };
  mean_diff: Float32Array; // [L, H]: mean h_tuned − h_base at resid_post over response positions
  timings_ms: Record<string, number>;
}

/** Progress and streaming hooks for a run. */
export interface RunCallbacks {
  onStage?: (stage: string, total: number) => void;
  onProgress?: (done: number) => void;
  onPair?: (record: PairRecord) => void;
}

const tick = () => new Promise<void>((r) => setImmediate(r));

/** Mean over masked positions of per-position values [B, T] computed by `values` → per row [B]. */
function maskedRowMean(values: () => tf.Tensor, mask: tf.Tensor): Float32Array {
  return tf.tidy(() => tf.div(tf.sum(tf.mul(values(), tf.squeeze(mask, [2])), 1), tf.maximum(tf.sum(mask, [1, 2]), 1)).dataSync() as Float32Array);
}

/** Checks that two models can be compared position by position. */
export function checkCompatible(base: LlamaModel, tuned: LlamaModel): void {
  const a = base.config;
  const b = tuned.config;
  for (const k of ["hiddenSize", "intermediateSize", "numLayers", "numHeads", "numKvHeads", "headDim", "vocabSize"] as const) {
    if (a[k] !== b[k]) throw new Error(`base and tuned models differ in ${k} (${a[k]} vs ${b[k]}): they must share architecture shape and vocabulary`);
  }
}

/** Runs the whole analysis. */
export async function runAnalysis(base: LlamaModel, tuned: LlamaModel, pairs: Pair[], s: RunSettings, cb: RunCallbacks = {}): Promise<Results> {
  checkCompatible(base, tuned);
  if (pairs.length === 0) throw new Error("no pairs to analyse");
  const L = base.config.numLayers;
  const H = base.config.hiddenSize;
  const layers = s.layers ?? Array.from({ length: L }, (_, l) => l);
  for (const l of layers) if (!(Number.isInteger(l) && l >= 0 && l < L)) throw new Error(`layer ${l} is outside 0..${L - 1}`);
  const n = pairs.length;
  const timings: Record<string, number> = {};
  const batches: Pair[][] = [];
  for (let i = 0; i < n; i += s.batchPairs) batches.push(pairs.slice(i, i + s.batchPairs));
  const models = { base, tuned };
  const combos = s.directions.flatMap((direction) => s.sites.flatMap((site) => layers.map((layer) => ({ direction, site, layer }))));
  const comboKey = (c: { direction: Direction; site: Site }) => `${c.direction} ${c.site}`;
  const residPost = Array.from({ length: L }, (_, l) => hookName("resid_post", l));
  const patchSites = new Set(combos.flatMap((c) => sitesNeeded(c.site, c.layer)));
  const cacheSites = [...new Set(["hook_embed", ...residPost, ...patchSites])];

  // Per-pair outputs.
  const marginBase = new Float64Array(n);
  const marginTuned = new Float64Array(n);
  const records: PairRecord[] = [];
  const dist = new Float64Array(n * L);
  const cosDist = new Float64Array(n * L);
  const real = combos.map(() => new Float64Array(n));
  const rnd = combos.map(() => new Float64Array(n));
  const meanAbl = combos.map(() => new Float64Array(n));
  const features = { base: Array.from({ length: L }, () => new Float64Array(2 * n * H)), tuned: Array.from({ length: L }, () => new Float64Array(2 * n * H)) };
  const lens = { base: Array.from({ length: L + 1 }, () => new Float64Array(n)), tuned: Array.from({ length: L + 1 }, () => new Float64Array(n)) };
  const meanDiffSum = Array.from({ length: L }, () => new Float64Array(H));
  let respPositions = 0;
  // Dataset means of each patched site for mean-ablation: [model][site] → sum over valid positions.
  const actSum: Record<"base" | "tuned", Map<string, Float64Array>> = { base: new Map(), tuned: new Map() };
  let validPositions = 0;

  // ---- Pass A: margins, distances, probe features, logit lens, real and random-direction patches.
  let t0 = performance.now();
  cb.onStage?.("scoring and patching", n);
  let done = 0;
  for (const [bi, bp] of batches.entries()) {
    const batch = makeBatch(bp);
    const off = done;
    const run = (m: LlamaModel) => forward(m, batch.ids, { lengths: batch.lengths, cache: cacheSites, logitsAt: batch.logitsAt });
    const rb = run(base);
    const rt = run(tuned);
    const lpB = responseLogprobs(rb.logits!, batch, s.perToken);
    const lpT = responseLogprobs(rt.logits!, batch, s.perToken);
    tf.dispose([rb.logits!, rt.logits!]);
    const mB = marginsOf(lpB);
    const mT = marginsOf(lpT);
    const respMask = positionMask(batch, "response");
    const allMask = positionMask(batch, "all");
    const patchMask = s.positions === "all" ? allMask : respMask;
    validPositions += batch.lengths.reduce((a, b) => a + b, 0);
    for (let l = 0; l < L; l++) {
      const hb = rb.cache[residPost[l]!]!;
      const ht = rt.cache[residPost[l]!]!;
      const d = maskedRowMean(() => tf.norm(tf.sub(ht, hb), 2, -1), respMask);
      const cos = maskedRowMean(() => tf.sub(1, tf.div(tf.sum(tf.mul(ht, hb), -1), tf.maximum(tf.mul(tf.norm(ht, 2, -1), tf.norm(hb, 2, -1)), 1e-12))), respMask);
      for (let i = 0; i < bp.length; i++) {
        // distance of a pair: average over both rows' response positions (weighted by their lengths)
        const lc = batch.lengths[2 * i]! - batch.respStart[2 * i]!;
        const lr = batch.lengths[2 * i + 1]! - batch.respStart[2 * i + 1]!;
        dist[(off + i) * L + l] = (d[2 * i]! * lc + d[2 * i + 1]! * lr) / (lc + lr);
        cosDist[(off + i) * L + l] = (cos[2 * i]! * lc + cos[2 * i + 1]! * lr) / (lc + lr);
      }
      // probe features: mean response activation per row
      for (const [name, r] of [["base", rb], ["tuned", rt]] as const) {
        const f = tf.tidy(() => tf.div(tf.sum(tf.mul(r.cache[residPost[l]!]!, respMask), 1), tf.sum(respMask, 1)).dataSync());
        features[name][l]!.set(Float64Array.from(f), 2 * off * H);
      }
      const md = tf.tidy(() => tf.sum(tf.mul(tf.sub(ht, hb), respMask), [0, 1]).dataSync());
      for (let j = 0; j < H; j++) meanDiffSum[l]![j]! += md[j]!;
    }
    respPositions += batch.logitsAt.length;
    // logit lens: the margin read from each layer's residual through the final norm and head
    for (const [name, m, r] of [["base", base, rb], ["tuned", tuned, rt]] as const) {
      for (let l = 0; l <= L; l++) {
        const resid = r.cache[l === 0 ? "hook_embed" : residPost[l - 1]!]!;
        const out = forward(m, batch.ids, { lengths: batch.lengths, start: { layer: L, resid }, logitsAt: batch.logitsAt });
        const mm = marginsOf(responseLogprobs(out.logits!, batch, s.perToken));
        out.logits!.dispose();
        lens[name][l]!.set(mm, off);
      }
    }
    // dataset sums for mean-ablation
    if (s.controls) {
      for (const [name, r] of [["base", rb], ["tuned", rt]] as const) {
        for (const site of patchSites) {
          const sum = tf.tidy(() => tf.sum(tf.mul(r.cache[site]!, allMask), [0, 1]).dataSync());
          const acc = actSum[name].get(site) ?? new Float64Array(H);
          for (let j = 0; j < H; j++) acc[j]! += sum[j]!;
          actSum[name].set(site, acc);
        }
      }
    }
    // patches
    combos.forEach((c, ci) => {
      const [dstName, srcName] = c.direction === "tuned->base" ? (["base", "tuned"] as const) : (["tuned", "base"] as const);
      const dstRun = dstName === "base" ? rb : rt;
      const srcRun = srcName === "base" ? rb : rt;
      const site = hookName(c.site, c.layer);
      const score = (value: tf.Tensor) => {
        const logits = runPatched(models[dstName], batch, c.site, c.layer, value, dstRun.cache);
        const m = marginsOf(responseLogprobs(logits, batch, s.perToken));
        tf.dispose([logits, value]);
        return m;
      };
      const gain = (m: Float64Array, i: number) => (c.direction === "tuned->base" ? m[i]! - mB[i]! : mT[i]! - m[i]!);
      const mReal = score(mixPatch(dstRun.cache[site]!, srcRun.cache[site]!, patchMask, s.alpha));
      for (let i = 0; i < bp.length; i++) real[ci]![off + i] = gain(mReal, i);
      if (s.controls) {
        const mRnd = score(randomPatch(dstRun.cache[site]!, srcRun.cache[site]!, patchMask, s.alpha, tfSeed(s.seed, bi, ci)));
        for (let i = 0; i < bp.length; i++) rnd[ci]![off + i] = gain(mRnd, i);
      }
    });
    for (let i = 0; i < bp.length; i++) {
      const p = bp[i]!;
      marginBase[off + i] = mB[i]!;
      marginTuned[off + i] = mT[i]!;
      const gains: Record<string, number[]> = {};
      combos.forEach((c, ci) => (gains[comboKey(c)] ??= []).push(real[ci]![off + i]!));
      const rec: PairRecord = {
        index: p.index,
        line: p.line,
        tokens: { prompt: p.promptIds.length, chosen: p.chosenIds.length, rejected: p.rejectedIds.length },
        logp: { base: { chosen: lpB[2 * i]!, rejected: lpB[2 * i + 1]! }, tuned: { chosen: lpT[2 * i]!, rejected: lpT[2 * i + 1]! } },
        margin: { base: mB[i]!, tuned: mT[i]! },
        gap: mT[i]! - mB[i]!,
        distance: Array.from(dist.subarray((off + i) * L, (off + i + 1) * L)),
        cosine_distance: Array.from(cosDist.subarray((off + i) * L, (off + i + 1) * L)),
        gains,
      };
      records.push(rec);
      cb.onPair?.(rec);
    }
    tf.dispose([...Object.values(rb.cache), ...Object.values(rt.cache), respMask, allMask]);
    done += bp.length;
    cb.onProgress?.(done);
    await tick();
  }
  timings.scoring_and_patching = performance.now() - t0;

  // ---- Pass B: mean-ablation controls (they need the dataset means from pass A).
  if (s.controls && combos.length) {
    t0 = performance.now();
    cb.onStage?.("mean-ablation controls", n);
    const means: Record<"base" | "tuned", Map<string, tf.Tensor1D>> = { base: new Map(), tuned: new Map() };
    for (const name of ["base", "tuned"] as const) for (const [site, sum] of actSum[name]) means[name].set(site, tf.tensor1d(Float32Array.from(sum, (v) => v / validPositions)));
    done = 0;
    for (const bp of batches) {
      const batch = makeBatch(bp);
      const off = done;
      const patchMask = positionMask(batch, s.positions);
      const caches = {
        base: s.directions.includes("tuned->base") ? forward(base, batch.ids, { lengths: batch.lengths, cache: [...patchSites], logitsAt: "none" }).cache : {},
        tuned: s.directions.includes("base->tuned") ? forward(tuned, batch.ids, { lengths: batch.lengths, cache: [...patchSites], logitsAt: "none" }).cache : {},
      };
      combos.forEach((c, ci) => {
        const [dstName, srcName] = c.direction === "tuned->base" ? (["base", "tuned"] as const) : (["tuned", "base"] as const);
        const site = hookName(c.site, c.layer);
        const h = caches[dstName][site]!;
        const value = tf.tidy(() => mixPatch(h, tf.mul(tf.onesLike(h), means[srcName].get(site)!), patchMask, s.alpha));
        const logits = runPatched(models[dstName], batch, c.site, c.layer, value, caches[dstName]);
        const m = marginsOf(responseLogprobs(logits, batch, s.perToken));
        tf.dispose([logits, value]);
        for (let i = 0; i < bp.length; i++) meanAbl[ci]![off + i] = c.direction === "tuned->base" ? m[i]! - marginBase[off + i]! : marginTuned[off + i]! - m[i]!;
      });
      tf.dispose([...Object.values(caches.base), ...Object.values(caches.tuned), patchMask]);
      done += bp.length;
      cb.onProgress?.(done);
      await tick();
    }
    for (const m of [...means.base.values(), ...means.tuned.values()]) m.dispose();
    timings.mean_ablation = performance.now() - t0;
  }

  // ---- Recovery with bootstrap CIs.
  const gap = Float64Array.from({ length: n }, (_, i) => marginTuned[i]! - marginBase[i]!);
  // A recovery ratio needs a gap to recover: below rounding level of the margins it is reported as NaN (null).
  const scale = mean(Array.from(marginBase, Math.abs)) + mean(Array.from(marginTuned, Math.abs));
  const gapTooSmall = !(Math.abs(mean(gap)) > 1e-6 * scale);
  const summarize = (g: Float64Array, seed: number): GainSummary => ({
    gains: Array.from(g),
    recovery: gapTooSmall ? NaN : mean(g) / mean(gap),
    recovery_ci: gapTooSmall ? [NaN, NaN] : bootstrapRatioCI(g, gap, s.bootstrap, seededRandom(seed)),
  });
  const patching: PatchingEntry[] = combos.map((c, ci) => ({
    direction: c.direction,
    site: c.site,
    layer: c.layer,
    alpha: s.alpha,
    ...summarize(real[ci]!, s.seed + 1),
    controls: s.controls ? { random_direction: summarize(rnd[ci]!, s.seed + 1), mean_ablation: summarize(meanAbl[ci]!, s.seed + 1) } : null,
  }));

  // ---- LASSO: per-pair gap on per-layer distances.
  t0 = performance.now();
  cb.onStage?.("LASSO and probes", 2 * L + 1);
  const lassoRes = n >= 3 ? lassoCV(dist, n, L, gap, { folds: s.folds, seed: s.seed, stabilityReps: s.stabilityReps }) : null;
  const lasso = lassoRes
    ? {
        ...lassoRes,
        X: Array.from({ length: n }, (_, i) => Array.from(dist.subarray(i * L, (i + 1) * L))),
        y: Array.from(gap),
        feature: "mean ‖h_tuned − h_base‖₂ at resid_post over response positions",
        nonzero_layers: lassoRes.nonzero,
      }
    : null;
  cb.onProgress?.(1);
  await tick();

  // ---- Probes: chosen (1) vs rejected (0) from the mean response activation, per layer and model.
  const probes: Results["probes"] = [];
  const labels = Array.from({ length: 2 * n }, (_, r) => (r % 2 === 0 ? 1 : 0));
  const groups = Array.from({ length: 2 * n }, (_, r) => Math.floor(r / 2));
  let step = 1;
  for (const model of ["base", "tuned"] as const) {
    for (let l = 0; l < L; l++) {
      if (n >= 2) {
        const pr = probeCV(features[model][l]!, 2 * n, H, labels, groups, { folds: s.folds, C: s.C, seed: s.seed });
        probes.push({ model, layer: l, accuracy: pr.accuracy, diff_means_accuracy: pr.diffMeansAccuracy });
      }
      cb.onProgress?.(++step);
      await tick();
    }
  }
  timings.lasso_and_probes = performance.now() - t0;

  // ---- Low-rank reconstruction at one layer.
  t0 = performance.now();
  let pca: Results["pca"] = null;
  if (n >= 2) {
    const { layer, chosenBy } = choosePcaLayer(patching, s, L);
    pca = await lowRank(base, tuned, pairs, layer, s, { marginBase, gap, gapTooSmall }, cb);
    pca.chosen_by = chosenBy;
  }
  timings.pca = performance.now() - t0;

  const meanDiff = new Float32Array(L * H);
  meanDiffSum.forEach((v, l) => v.forEach((x, j) => (meanDiff[l * H + j] = x / Math.max(1, respPositions))));
  const lensMean = (a: Float64Array[]) => a.map((v) => mean(v));
  return {
    n_pairs: n,
    num_layers: L,
    hidden_size: H,
    pairs: records,
    summary: {
      mean_margin_base: mean(marginBase),
      mean_margin_tuned: mean(marginTuned),
      mean_gap: mean(gap),
      tuned_prefers_chosen: marginTuned.filter((m) => m > 0).length / n,
      base_prefers_chosen: marginBase.filter((m) => m > 0).length / n,
    },
    patching,
    lasso,
    probes,
    pca,
    logit_lens: { layers: ["embed", ...Array.from({ length: L }, (_, l) => `${l}`)], base: lensMean(lens.base), tuned: lensMean(lens.tuned) },
    mean_diff: meanDiff,
    timings_ms: timings,
  };
}

/** The low-rank layer: the one asked for, else the first whose resid_post recovery is within 5% of the best. */
function choosePcaLayer(patching: PatchingEntry[], s: RunSettings, L: number): { layer: number; chosenBy: string } {
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

/**
 * PCA of per-position h_tuned − h_base at resid_post of `layer` over the response positions of a training
 * split, then the held-out recovery of patching only the top-k directions (and a random k-dim subspace).
 */
async function lowRank(
  base: LlamaModel,
  tuned: LlamaModel,
  pairs: Pair[],
  layer: number,
  s: RunSettings,
  scores: { marginBase: Float64Array; gap: Float64Array; gapTooSmall: boolean },
  cb: RunCallbacks,
): Promise<NonNullable<Results["pca"]>> {
  const n = pairs.length;
  const H = base.config.hiddenSize;
  const order = permutation(n, seededRandom(s.seed + 17));
  const nTest = Math.min(n - 1, Math.max(1, Math.round(n * s.pcaTestFrac)));
  const testIdx = order.slice(0, nTest).sort((a, b) => a - b);
  const trainIdx = order.slice(nTest).sort((a, b) => a - b);
  const site = hookName("resid_post", layer);
  const upTo = (m: LlamaModel, batch: PairBatch) => forward(m, batch.ids, { lengths: batch.lengths, stopAfter: layer, cache: [site] }).cache[site]!;
  cb.onStage?.(`PCA at layer ${layer}`, n);
  let done = 0;
  const rows: Float32Array[] = [];
  for (const js of chunks(trainIdx, s.batchPairs)) {
    const batch = makeBatch(js.map((j) => pairs[j]!));
    const hb = upTo(base, batch);
    const ht = upTo(tuned, batch);
    const diff = tf.tidy(() => tf.sub(ht, hb).dataSync() as Float32Array);
    for (let r = 0; r < batch.ids.length; r++) for (let t = batch.respStart[r]!; t < batch.lengths[r]!; t++) rows.push(diff.slice((r * batch.T + t) * H, (r * batch.T + t + 1) * H));
    tf.dispose([hb, ht]);
    cb.onProgress?.((done += js.length));
    await tick();
  }
  const D = tf.tensor2d(concat(rows, H), [rows.length, H]);
  const p = pcaOfDifferences(D);
  D.dispose();
  const ks: number[] = [];
  for (let k = 1; k < H; k *= 2) ks.push(k);
  ks.push(H);
  const gainsK = ks.map(() => ({ real: [] as number[], random: [] as number[] }));
  const testGap: number[] = [];
  for (const js of chunks(testIdx, s.batchPairs)) {
    const batch = makeBatch(js.map((j) => pairs[j]!));
    const hb = upTo(base, batch);
    const ht = upTo(tuned, batch);
    const mask = positionMask(batch, s.positions);
    ks.forEach((k, ki) => {
      const kk = Math.min(k, p.rank);
      const U = tf.tensor2d(p.components.subarray(0, kk * H), [kk, H]);
      const R = randomSubspace(k, H, seededRandom(s.seed * 31 + k));
      for (const [which, basis] of [["real", U], ["random", R]] as const) {
        const value = tf.tidy(() => mixPatch(hb, projectPatch(hb, ht, basis), mask, s.alpha));
        const logits = runPatched(base, batch, "resid_post", layer, value, {});
        const m = marginsOf(responseLogprobs(logits, batch, s.perToken));
        tf.dispose([logits, value]);
        js.forEach((j, i) => gainsK[ki]![which].push(m[i]! - scores.marginBase[j]!));
      }
      tf.dispose([U, R]);
    });
    for (const j of js) testGap.push(scores.gap[j]!);
    tf.dispose([hb, ht, mask]);
    cb.onProgress?.((done += js.length));
    await tick();
  }
  const mg = mean(testGap);
  return {
    layer,
    site: "resid_post",
    chosen_by: "",
    train_pairs: trainIdx,
    test_pairs: testIdx,
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

function concat(rows: Float32Array[], H: number): Float32Array {
  const out = new Float32Array(rows.length * H);
  rows.forEach((r, i) => out.set(r, i * H));
  return out;
}
