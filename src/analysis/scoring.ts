// Stage 1, scoring and caching: both models on a batch of pairs, response log-probabilities and margins,
// with the activations later stages of the same batch read. One ScoredBatch owns those tensors.
import * as tf from "@tensorflow/tfjs-core";
import type { Pair } from "../data/pairs.js";
import { makeBatch, marginsOf, positionMask, rowLogprobs, type PairBatch } from "../data/batch.js";
import { hookName, type HookName } from "../model/hooks.js";
import { forward, type ForwardResult, type LlamaModel } from "../model/llama.js";
import type { LlamaConfig } from "../model/config.js";
import { scoringBytes, type Limits } from "../engine/limits.js";
import { scored } from "../engine/margins.js";
import { sitesNeeded, windowLayers } from "./patches.js";
import { runsAttribution, type Direction, type RunSettings, type Site } from "./settings.js";
import { type PairAttribution, type PairRecord } from "./schema.js";

/** The two models compared, and the memory policy of the engine that runs them (DEFAULT_LIMITS when left out). */
export interface ModelPair {
  base: LlamaModel;
  tuned: LlamaModel;
  limits?: Limits;
}

/** One (direction, site, layer) to patch. */
export interface Combo {
  direction: Direction;
  site: Site;
  layer: number;
}

/** What the per-batch stages do: the patch combos and the sites each model must cache for them. */
export interface Plan {
  combos: Combo[];
  /** Sites a patch reads or resumes from (also the sites whose means mean-ablation needs). */
  patchSites: HookName[];
  /** Everything the scoring pass caches: the embedding, every resid_post and the patch sites (and z for attribution). */
  cacheSites: HookName[];
}

/** The "direction site" of a combo: the group its layers belong to (a report chart, attribution's positions). */
export const comboKey = (c: { direction: Direction; site: Site }): string => `${c.direction} ${c.site}`;

/** The "direction site layer" name under which a pair's gain at a combo is recorded (and its engine run is named). */
export const runKey = (c: Combo): string => `${c.direction} ${c.site} ${c.layer}`;

/** Expands settings into the combos to patch (direction-major, then site, then layer) and the sites to cache. */
export function makePlan(s: RunSettings, L: number): Plan {
  const layers = s.layers ?? Array.from({ length: L }, (_, l) => l);
  const combos = s.directions.flatMap((direction) =>
    s.sites.flatMap((site) => layers.map((layer) => ({ direction, site, layer }))),
  );
  const patchSites = [
    ...new Set(
      combos.flatMap((c) => [
        ...windowLayers(c.layer, s.window, L).flatMap((j) => sitesNeeded(c.site, j)),
        ...(s.window > 1 ? [hookName("resid_pre", c.layer)] : []), // a window's patched run starts there
      ]),
    ),
  ];
  const residPost = Array.from({ length: L }, (_, l) => hookName("resid_post", l));
  // attribution's per-head estimates read both models' z (attn.hook_z) at every layer
  const z = runsAttribution(s) ? Array.from({ length: L }, (_, l) => hookName("z", l)) : [];
  return { combos, patchSites, cacheSites: [...new Set<HookName>(["hook_embed", ...residPost, ...patchSites, ...z])] };
}

/** A batch run through both models: margins, log-probabilities, cached activations and position masks. */
export interface ScoredBatch {
  pairs: Pair[];
  batch: PairBatch;
  runs: { base: ForwardResult; tuned: ForwardResult };
  logp: { base: Float64Array; tuned: Float64Array }; // per row: chosen (2i), rejected (2i+1)
  margin: { base: Float64Array; tuned: Float64Array }; // per pair
  mask: { response: tf.Tensor3D; all: tf.Tensor3D; patch: tf.Tensor3D };
  dispose(): void;
}

/** Checks that two models can be compared position by position. */
export function checkCompatible(base: LlamaModel, tuned: LlamaModel): void {
  const a = base.config;
  const b = tuned.config;
  for (const k of [
    "hiddenSize",
    "intermediateSize",
    "numLayers",
    "numHeads",
    "numKvHeads",
    "headDim",
    "vocabSize",
  ] as const satisfies ReadonlyArray<keyof LlamaConfig>) {
    if (a[k] !== b[k])
      throw new Error(
        `base and tuned models differ in ${k} (${a[k]} vs ${b[k]}): they must share architecture shape and vocabulary`,
      );
  }
}

/** Runs both models on `pairs` with the plan's caches; the caller disposes the result. */
export function scoreBatch(models: ModelPair, pairs: Pair[], plan: Plan, s: RunSettings): ScoredBatch {
  const batch = makeBatch(pairs);
  const run = (m: LlamaModel) => forward(m, batch.ids, { ...scored(batch, models.limits), cache: plan.cacheSites });
  const runs = { base: run(models.base), tuned: run(models.tuned) };
  const logp = {
    base: rowLogprobs(runs.base.logprobs!, batch, s.perToken),
    tuned: rowLogprobs(runs.tuned.logprobs!, batch, s.perToken),
  };
  const response = positionMask(batch, "response");
  const all = positionMask(batch, "all");
  return {
    pairs,
    batch,
    runs,
    logp,
    margin: { base: marginsOf(logp.base), tuned: marginsOf(logp.tuned) },
    mask: { response, all, patch: s.positions === "all" ? all : response },
    dispose: () => {
      runs.base.dispose();
      runs.tuned.dispose();
      tf.dispose([response, all]);
    },
  };
}

/** What the per-batch stages measured for pair i of a scored batch, besides its margins. */
export interface PairMeasures {
  distance: number[];
  cosine: number[];
  gains: Record<string, number>;
  attribution: PairAttribution | null;
  heads: number[][] | null;
  randomDirection: Record<string, number> | null;
  lens: { base: number[]; tuned: number[] };
}

/** The record of pair i of a scored batch. */
export function pairRecord(sc: ScoredBatch, i: number, m: PairMeasures): PairRecord {
  const p = sc.pairs[i]!;
  const { base, tuned } = sc.margin;
  return {
    index: p.index,
    line: p.line,
    tokens: { prompt: p.promptIds.length, chosen: p.chosenIds.length, rejected: p.rejectedIds.length },
    ids: { prompt: [...p.promptIds], chosen: [...p.chosenIds], rejected: [...p.rejectedIds] },
    logp: {
      base: { chosen: sc.logp.base[2 * i]!, rejected: sc.logp.base[2 * i + 1]! },
      tuned: { chosen: sc.logp.tuned[2 * i]!, rejected: sc.logp.tuned[2 * i + 1]! },
    },
    margin: { base: base[i]!, tuned: tuned[i]! },
    gap: tuned[i]! - base[i]!,
    distance: m.distance,
    cosine_distance: m.cosine,
    gains: m.gains,
    attribution: m.attribution,
    heads: m.heads,
    random_direction: m.randomDirection,
    lens: m.lens,
  };
}

/** Gains [combo][pair of the batch] as pair i's record: "direction site layer" → gain. */
export function gainsByKey(combos: Combo[], gains: number[][], i: number): Record<string, number> {
  return Object.fromEntries(combos.map((c, ci) => [runKey(c), gains[ci]![i]!]));
}

/** An upper estimate of the float32 bytes one scoring batch of the plan holds at its peak (engine/limits.ts). */
export const batchBytes = (cfg: LlamaConfig, plan: Plan, rows: number, T: number, scored: number): number =>
  scoringBytes(cfg, plan.cacheSites.length, rows, T, scored);
