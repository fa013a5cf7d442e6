// The causal-probe analysis end to end, as a short loop over stages (one file each), in two phases:
//   1. per batch of pairs (analysePairs): scoring with cached activations → patch sweep → random-direction
//      control → distances, logit lens, the pair's sums → one PairState per pair. A pair's state depends on
//      nothing but the pair (random draws are keyed by pair), so phase 1 can be resumed, sharded and merged.
//   2. over all pairs (finishAnalysis): the mean-ablation control (it needs the dataset means), recovery
//      summaries, LASSO and probes, low-rank reconstruction.
// Pure computation: models and pairs in, a Results record out; progress and per-pair states go to callbacks.
import type { Pair } from "../data/pairs.js";
import type { LlamaModel } from "../model/llama.js";
import type { Limits } from "../engine/limits.js";
import { mean } from "../stats/stats.js";
import { enableGradients } from "../model/gradients.js";
import { attributionBatch, attributionSummary } from "./attribution.js";
import { headSweep, positionSweep } from "./fine.js";
import { meanAblationStage, randomDirectionPatch, type AblationRunner } from "./controls.js";
import { distancesOf } from "./distances.js";
import { cvFolds, lassoStage, probeStage } from "./estimators.js";
import { logitLensBatch } from "./lens.js";
import { choosePcaLayer, lowRankStage } from "./lowrank.js";
import { interpolate } from "./patches.js";
import { gapNoise, gapTooSmall, marginNoise, patchingEntries } from "./recovery.js";
import {
  checkCompatible,
  gainsByKey,
  makePlan,
  pairRecord,
  runKey,
  scoreBatch,
  type ModelPair,
  type Plan,
} from "./scoring.js";
import { resolveSettings, runsAttribution, runsControls, runsExact, type RunSettings } from "./settings.js";
import {
  addTimes,
  Interrupted,
  type PairRecord,
  type PairState,
  type PatchingEntry,
  type Results,
  type RunCallbacks,
  type StageTimes,
} from "./schema.js";
import { meanOver, pairSums, positionsOf, sumsLayout, type SumsLayout } from "./sums.js";
import { sweepBatch, sweepInput } from "./sweep.js";

const tick = () => new Promise<void>((r) => setImmediate(r));

/** A pair too large for the memory one batch may use, on its own. */
export class BatchTooLarge extends Error {
  override name = "BatchTooLarge";
  constructor(
    readonly pair: Pair,
    readonly bytes: number,
    readonly budget: number,
  ) {
    super(
      `pair at line ${pair.line} (${pair.promptIds.length + Math.max(pair.chosenIds.length, pair.rejectedIds.length)} tokens) needs ~${(bytes / 2 ** 30).toFixed(2)} GiB for one forward batch, more than the ${(budget / 2 ** 30).toFixed(2)} GiB available (a lower maxTokens skips such pairs)`,
    );
  }
}

/**
 * Consecutive batches of at most `size` pairs, as [start, end) positions, each small enough that
 * `bytesFor(rows, T, scored)` stays within `budget` (a pair that alone exceeds it throws BatchTooLarge).
 * The plan depends only on the pairs, `size` and the budget, so every shard and resume sees the same batches.
 */
export function planBatches(
  pairs: Pair[],
  size: number,
  budget = Infinity,
  bytesFor: (rows: number, T: number, scored: number) => number = () => 0,
): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  let start = 0;
  let T = 0;
  let scored = 0;
  for (let i = 0; i < pairs.length; i++) {
    const p = pairs[i]!;
    const len = p.promptIds.length + Math.max(p.chosenIds.length, p.rejectedIds.length);
    const add = p.chosenIds.length + p.rejectedIds.length;
    const alone = bytesFor(2, len, add);
    if (alone > budget) throw new BatchTooLarge(p, alone, budget);
    if (i > start && (i - start >= size || bytesFor(2 * (i - start + 1), Math.max(T, len), scored + add) > budget)) {
      out.push([start, i]);
      start = i;
      T = 0;
      scored = 0;
    }
    T = Math.max(T, len);
    scored += add;
  }
  if (pairs.length > start) out.push([start, pairs.length]);
  return out;
}

/** The per-pair sums layout of a run. */
export const layoutOf = (models: ModelPair, plan: Plan): SumsLayout =>
  sumsLayout(models.base.config.numLayers, models.base.config.hiddenSize, plan.patchSites);

/** `f()`, adding its milliseconds to `times[stage]`. */
function timed<T>(times: StageTimes, stage: string, f: () => T): T {
  const t0 = performance.now();
  try {
    return f();
  } finally {
    times[stage] = (times[stage] ?? 0) + performance.now() - t0;
  }
}

/** Phase 1 for one batch: every per-pair measurement; each stage's milliseconds are added to `times`. */
export function analyseBatch(
  models: ModelPair,
  pairs: Pair[],
  plan: Plan,
  s: RunSettings,
  times: StageTimes = {},
): PairState[] {
  const { numLayers: L, hiddenSize: H } = models.base.config;
  const sc = timed(times, "scoring", () => scoreBatch(models, pairs, plan, s));
  try {
    const real = runsExact(s)
      ? timed(times, "patch_sweep", () =>
          sweepBatch(models, sweepInput(sc), plan.combos, () => interpolate(s.alpha), s),
        )
      : null;
    const random = runsControls(s)
      ? timed(times, "random_direction_control", () =>
          sweepBatch(models, sweepInput(sc), plan.combos, randomDirectionPatch(s, sc, H), s),
        )
      : null;
    const attribution = runsAttribution(s)
      ? timed(times, "attribution", () => attributionBatch(models, sc, plan, s))
      : null;
    const first = plan.combos[0]?.direction ?? s.directions[0]!;
    const heads = s.heads ? timed(times, "head_sweep", () => headSweep(models, sweepInput(sc), first, s)) : null;
    const { distance, cosine } = timed(times, "distances", () => distancesOf(sc, L));
    const lens = timed(times, "logit_lens", () => logitLensBatch(models, sc, s));
    const sums = timed(times, "pair_sums", () => pairSums(sc, layoutOf(models, plan)));
    return pairs.map((_, i) => ({
      record: pairRecord(sc, i, {
        distance: distance[i]!,
        cosine: cosine[i]!,
        gains: real ? gainsByKey(plan.combos, real, i) : {},
        attribution: attribution?.[i] ?? null,
        heads: heads?.[i] ?? null,
        randomDirection: random ? gainsByKey(plan.combos, random, i) : null,
        lens: { base: lens.base.map((d) => d[i]!), tuned: lens.tuned.map((d) => d[i]!) },
      }),
      sums: sums[i]!,
    }));
  } finally {
    sc.dispose();
  }
}

/**
 * Phase 1 over the batches `which` selects (default: all): calls cb.onPairs after each batch and stops
 * between batches when cb.shouldStop says so (throwing Interrupted). Returns the new states in batch order.
 */
export async function analysePairs(
  models: ModelPair,
  pairs: Pair[],
  s: RunSettings,
  cb: RunCallbacks = {},
  opts: { batches?: Array<[number, number]>; done?: number } = {},
): Promise<PairState[]> {
  const plan = makePlan(s, models.base.config.numLayers);
  const batches = opts.batches ?? planBatches(pairs, s.batchPairs);
  const total = batches.reduce((a, [b, e]) => a + e - b, 0) + (opts.done ?? 0);
  let done = opts.done ?? 0;
  const out: PairState[] = [];
  cb.onStage?.("scoring and patching", total);
  cb.onProgress?.(done);
  for (const [start, end] of batches) {
    if (cb.shouldStop?.()) throw new Interrupted(done, total);
    const times: StageTimes = {};
    const states = analyseBatch(models, pairs.slice(start, end), plan, s, times);
    cb.onTimes?.(times);
    out.push(...states);
    cb.onPairs?.(states);
    done += end - start;
    cb.onProgress?.(done);
    await tick();
  }
  return out;
}

/** `f()`, adding its milliseconds to `timings[stage]` (awaited). */
async function timedAsync<T>(timings: Record<string, number>, stage: string, f: () => Promise<T>): Promise<T> {
  const t0 = performance.now();
  try {
    return await f();
  } finally {
    timings[stage] = (timings[stage] ?? 0) + performance.now() - t0;
  }
}

/** Per combo of the plan, every pair's value of a "direction site layer"-keyed record field, as [combo][pair]. */
function columns(
  plan: Plan,
  records: PairRecord[],
  pick: (r: PairRecord) => Record<string, number> | null,
): Float64Array[] {
  return plan.combos.map((c) => Float64Array.from(records, (r) => pick(r)![runKey(c)]!));
}

/** What every phase-2 stage reads. */
interface Phase2 {
  models: ModelPair;
  pairs: Pair[];
  states: PairState[];
  records: PairRecord[];
  plan: Plan;
  layout: SumsLayout;
  s: RunSettings;
  cb: RunCallbacks;
  margin: { base: Float64Array; tuned: Float64Array };
  gap: Float64Array;
  noGap: boolean;
  timings: Record<string, number>;
}

/** The patching entries: the real gains (exact, else attribution's) beside the random-direction and mean-ablation controls. */
async function patchingStage(
  p: Phase2,
  batches: Array<[number, number]>,
  ablate?: AblationRunner,
): Promise<PatchingEntry[]> {
  const { plan, records, s } = p;
  const meanAbl = await timedAsync(p.timings, "mean_ablation", async () =>
    runsControls(s) && plan.combos.length
      ? await meanAblationStage(p.models, p.pairs, batches, plan, p.states, p.layout, s, p.cb, ablate)
      : null,
  );
  const real = runsExact(s)
    ? columns(plan, records, (r) => r.gains)
    : columns(plan, records, (r) => r.attribution!.gains);
  const controls = runsControls(s)
    ? { random: columns(plan, records, (r) => r.random_direction), meanAblation: meanAbl ?? [] }
    : { random: null, meanAblation: null };
  return patchingEntries(plan.combos, { real, ...controls }, p.gap, p.noGap, s, runsExact(s) ? "exact" : "attribution");
}

/** The per-head means (--heads) and the per-position map of the pair with the largest |gap| (--position-map). */
async function finerStage(p: Phase2): Promise<Pick<Results, "heads" | "position_map">> {
  const { records, gap, s } = p;
  const first = p.plan.combos[0]?.direction ?? s.directions[0]!;
  const meanGap = mean(gap);
  const headMean = s.heads
    ? records[0]!.heads!.map((row, l) => row.map((_, h) => mean(records.map((r) => r.heads![l]![h]!))))
    : null;
  const heads = headMean
    ? { direction: first, mean_gain: headMean, recovery: headMean.map((row) => row.map((v) => v / meanGap)) }
    : null;
  let top = 0;
  for (let i = 1; i < gap.length; i++) if (Math.abs(gap[i]!) > Math.abs(gap[top]!)) top = i;
  const position_map = await timedAsync(p.timings, "position_map", async () =>
    s.positionMap
      ? {
          pair: records[top]!.index,
          direction: first,
          gap: gap[top]!,
          gains: positionSweep(p.models, p.pairs[top]!, first, s),
          ids: records[top]!.ids,
        }
      : null,
  );
  return { heads, position_map };
}

/** LASSO of the gaps on per-layer distances, and the linear probes. */
async function estimatorStage(p: Phase2): Promise<Pick<Results, "lasso" | "probes">> {
  const L = p.models.base.config.numLayers;
  return timedAsync(p.timings, "lasso_and_probes", async () => {
    p.cb.onStage?.("LASSO and probes", 2 * L + 1);
    const lasso = lassoStage(p.records, L, p.s);
    p.cb.onProgress?.(1);
    await tick();
    return { lasso, probes: await probeStage(p.states, p.layout, p.s, p.cb) };
  });
}

/** The summary, the mean logit lens and the mean activation difference over all pairs. */
function overall(p: Phase2): Pick<Results, "summary" | "logit_lens" | "mean_diff"> {
  const { numLayers: L, hiddenSize: H } = p.models.base.config;
  const { margin, records, states } = p;
  const n = records.length;
  const respPositions = states.reduce((a, st) => a + positionsOf(st).response, 0);
  const meanDiff = new Float32Array(L * H);
  for (let l = 0; l < L; l++) meanDiff.set(meanOver(states, p.layout.meanDiff(l), H, respPositions), l * H);
  return {
    summary: {
      mean_margin_base: mean(margin.base),
      mean_margin_tuned: mean(margin.tuned),
      mean_gap: mean(p.gap),
      // a margin within its float32 rounding of 0 (identical responses) prefers neither
      tuned_prefers_chosen: records.filter((r) => r.margin.tuned > marginNoise(r, "tuned")).length / n,
      base_prefers_chosen: records.filter((r) => r.margin.base > marginNoise(r, "base")).length / n,
    },
    logit_lens: {
      layers: ["embed", ...Array.from({ length: L }, (_, l) => `${l}`)],
      base: Array.from({ length: L + 1 }, (_, d) => mean(records.map((r) => r.lens.base[d]!))),
      tuned: Array.from({ length: L + 1 }, (_, d) => mean(records.map((r) => r.lens.tuned[d]!))),
    },
    mean_diff: meanDiff,
  };
}

/**
 * Phase 2: the dataset-level stages from every pair's state (states[i] belongs to pairs[i]); `runners.ablate`
 * runs the mean-ablation control elsewhere (worker threads) with the same numbers.
 */
export async function finishAnalysis(
  models: ModelPair,
  pairs: Pair[],
  states: PairState[],
  s: RunSettings,
  cb: RunCallbacks = {},
  batches: Array<[number, number]> = planBatches(pairs, s.batchPairs),
  runners: { ablate?: AblationRunner } = {},
): Promise<Results> {
  const { numLayers: L, hiddenSize: H } = models.base.config;
  const n = pairs.length;
  if (states.length !== n || states.some((st, i) => st.record.index !== pairs[i]!.index))
    throw new Error("finishAnalysis: one state per pair, in the pairs' order");
  const plan = makePlan(s, L);
  const records = states.map((st) => st.record);
  const margin = {
    base: Float64Array.from(records, (r) => r.margin.base),
    tuned: Float64Array.from(records, (r) => r.margin.tuned),
  };
  const gap = Float64Array.from(records, (r) => r.gap);
  const layout = layoutOf(models, plan);
  const timings: Record<string, number> = {};
  const noGap = gapTooSmall(margin.base, margin.tuned, records.map(gapNoise));
  const p: Phase2 = { models, pairs, states, records, plan, layout, s, cb, margin, gap, noGap, timings };
  const patching = await patchingStage(p, batches, runners.ablate);
  const attribution = attributionSummary(records, plan, gap);
  const finer = await finerStage(p);
  const { lasso, probes } = await estimatorStage(p);
  const at = choosePcaLayer(patching, s, L, (l) => records.some((r) => r.distance[l]! > 0));
  const lowRankMargins = { marginBase: margin.base, marginTuned: margin.tuned, gapTooSmall: noGap };
  const pca = await timedAsync(timings, "pca", async () =>
    n >= 2 ? await lowRankStage(models, pairs, at, s, lowRankMargins, cb) : null,
  );
  const { summary, logit_lens, mean_diff } = overall(p);
  return {
    n_pairs: n,
    num_layers: L,
    hidden_size: H,
    pairs: records,
    summary,
    patching,
    attribution,
    ...finer,
    lasso,
    probes,
    pca,
    cv: cvFolds(n, s),
    logit_lens,
    mean_diff,
    timings_ms: timings,
  };
}

/** Runs the whole analysis (both phases); settings left out take DEFAULT_SETTINGS, `engine.limits` DEFAULT_LIMITS. */
export async function runAnalysis(
  base: LlamaModel,
  tuned: LlamaModel,
  pairs: Pair[],
  settings: Partial<RunSettings> = {},
  cb: RunCallbacks = {},
  engine: { limits?: Limits } = {},
): Promise<Results> {
  checkCompatible(base, tuned);
  if (pairs.length === 0) throw new Error("no pairs to analyse");
  const s = resolveSettings(settings, base.config);
  const models = { base, tuned, limits: engine.limits };
  if (runsAttribution(s)) await enableGradients();
  const t0 = performance.now();
  const stages: StageTimes = {};
  const states = await analysePairs(models, pairs, s, {
    ...cb,
    onTimes: (t) => (addTimes(stages, t), cb.onTimes?.(t)),
  });
  const scoring = performance.now() - t0;
  const r = await finishAnalysis(models, pairs, states, s, cb);
  r.timings_ms = { scoring_and_patching: scoring, ...stages, ...r.timings_ms };
  return r;
}
