// The causal-probe analysis end to end, as a short loop over stages (one file each):
//   per batch of pairs: scoring (both models, cached activations) → patch sweep → random-direction control →
//   distances, probe features, site sums, logit lens → per-pair records;
//   then the mean-ablation control (needs the dataset means), recovery summaries, LASSO and probes, low-rank.
// Pure computation: models and pairs in, a Results record out; progress and per-pair records go to callbacks.
import type { Pair } from "../data/pairs.js";
import { mean } from "../stats/stats.js";
import { SiteSums, meanAblationStage, randomDirectionPatch } from "./controls.js";
import { MeanDifference, distancesOf } from "./distances.js";
import { ProbeFeatures, lassoStage, probeStage } from "./estimators.js";
import { logitLensBatch } from "./lens.js";
import { choosePcaLayer, lowRankStage } from "./lowrank.js";
import { interpolate } from "./patches.js";
import { gapTooSmall, patchingEntries } from "./recovery.js";
import { checkCompatible, comboKey, makePlan, pairRecord, scoreBatch, type ModelPair } from "./scoring.js";
import { resolveSettings, type PairRecord, type Results, type RunCallbacks, type RunSettings } from "./settings.js";
import { sweepBatch, sweepInput } from "./sweep.js";
import type { LlamaModel } from "../model/llama.js";

const tick = () => new Promise<void>((r) => setImmediate(r));

/** Runs the whole analysis; settings left out take DEFAULT_SETTINGS. */
export async function runAnalysis(base: LlamaModel, tuned: LlamaModel, pairs: Pair[], settings: Partial<RunSettings> = {}, cb: RunCallbacks = {}): Promise<Results> {
  checkCompatible(base, tuned);
  if (pairs.length === 0) throw new Error("no pairs to analyse");
  const s = resolveSettings(settings, base.config);
  const { numLayers: L, hiddenSize: H } = base.config;
  const n = pairs.length;
  const models: ModelPair = { base, tuned };
  const plan = makePlan(s, L);
  const batches: Pair[][] = [];
  for (let i = 0; i < n; i += s.batchPairs) batches.push(pairs.slice(i, i + s.batchPairs));
  const timings: Record<string, number> = {};

  // Per-pair columns and the sufficient statistics of the dataset-level stages.
  const records: PairRecord[] = [];
  const margin = { base: new Float64Array(n), tuned: new Float64Array(n) };
  const realGains = plan.combos.map(() => new Float64Array(n));
  const randomGains = plan.combos.map(() => new Float64Array(n));
  const lens = { base: Array.from({ length: L + 1 }, () => new Float64Array(n)), tuned: Array.from({ length: L + 1 }, () => new Float64Array(n)) };
  const features = new ProbeFeatures(n, L, H);
  const siteSums = new SiteSums(plan.patchSites, H);
  const meanDiff = new MeanDifference(L, H);

  let t0 = performance.now();
  cb.onStage?.("scoring and patching", n);
  for (const [bi, bp] of batches.entries()) {
    const off = bi * s.batchPairs;
    const sc = scoreBatch(models, bp, off, bi, plan, s);
    const real = sweepBatch(models, sweepInput(sc), plan.combos, () => interpolate(s.alpha), s);
    const random = s.controls ? sweepBatch(models, sweepInput(sc), plan.combos, randomDirectionPatch(s, sc), s) : null;
    const { distance, cosine } = distancesOf(sc, L);
    const lensB = logitLensBatch(models, sc, s);
    features.add(sc);
    meanDiff.add(sc);
    if (s.controls) siteSums.add(sc);
    sc.dispose();
    margin.base.set(sc.margin.base, off);
    margin.tuned.set(sc.margin.tuned, off);
    real.forEach((g, ci) => realGains[ci]!.set(g, off));
    random?.forEach((g, ci) => randomGains[ci]!.set(g, off));
    for (const name of ["base", "tuned"] as const) lensB[name].forEach((m, depth) => lens[name][depth]!.set(m, off));
    for (let i = 0; i < bp.length; i++) {
      const gains: Record<string, number[]> = {};
      plan.combos.forEach((c, ci) => (gains[comboKey(c)] ??= []).push(real[ci]![i]!));
      const rec = pairRecord(sc, i, distance[i]!, cosine[i]!, gains);
      records.push(rec);
      cb.onPair?.(rec);
    }
    cb.onProgress?.(off + bp.length);
    await tick();
  }
  timings.scoring_and_patching = performance.now() - t0;

  let meanAblationGains: Float64Array[] | null = null;
  if (s.controls && plan.combos.length) {
    t0 = performance.now();
    meanAblationGains = await meanAblationStage(models, batches, plan, siteSums, margin, s, cb);
    timings.mean_ablation = performance.now() - t0;
  }

  const gap = Float64Array.from(records, (r) => r.gap);
  const noGap = gapTooSmall(margin.base, margin.tuned);
  const patching = patchingEntries(plan.combos, { real: realGains, random: s.controls ? randomGains : null, meanAblation: s.controls ? (meanAblationGains ?? []) : null }, gap, noGap, s);

  t0 = performance.now();
  cb.onStage?.("LASSO and probes", 2 * L + 1);
  const lasso = lassoStage(records, L, s);
  cb.onProgress?.(1);
  await tick();
  const probes = await probeStage(features, s, cb);
  timings.lasso_and_probes = performance.now() - t0;

  t0 = performance.now();
  let pca: Results["pca"] = null;
  if (n >= 2) {
    pca = await lowRankStage(models, pairs, choosePcaLayer(patching, s, L), s, { marginBase: margin.base, marginTuned: margin.tuned, gapTooSmall: noGap }, cb);
  }
  timings.pca = performance.now() - t0;

  return {
    n_pairs: n,
    num_layers: L,
    hidden_size: H,
    pairs: records,
    summary: {
      mean_margin_base: mean(margin.base),
      mean_margin_tuned: mean(margin.tuned),
      mean_gap: mean(gap),
      tuned_prefers_chosen: margin.tuned.filter((m) => m > 0).length / n,
      base_prefers_chosen: margin.base.filter((m) => m > 0).length / n,
    },
    patching,
    lasso,
    probes,
    pca,
    logit_lens: { layers: ["embed", ...Array.from({ length: L }, (_, l) => `${l}`)], base: lens.base.map((v) => mean(v)), tuned: lens.tuned.map((v) => mean(v)) },
    mean_diff: meanDiff.mean(),
    timings_ms: timings,
  };
}
