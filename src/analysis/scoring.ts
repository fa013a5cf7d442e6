// Stage 1, scoring and caching: both models on a batch of pairs, response log-probabilities and margins,
// with the activations later stages of the same batch read. One ScoredBatch owns those tensors.
import * as tf from "@tensorflow/tfjs-core";
import type { Pair } from "../data/pairs.js";
import { makeBatch, marginsOf, pairedInput, positionMask, repeatBatch, rowLogprobs, type PairBatch } from "../data/batch.js";
import { hookName, type HookName } from "../model/hooks.js";
import { nativeMatMulActive } from "../model/native.js";
import { forward, GROUPED_ATTENTION_MIN, groupedAttention, NATIVE_GROUPED_MIN, type ForwardOptions, type ForwardResult, type LlamaModel } from "../model/llama.js";
import type { LlamaConfig } from "../model/config.js";
import { gainOf, sitesNeeded, windowLayers } from "./patches.js";
import { runsAttribution, type Direction, type PairAttribution, type PairRecord, type RunSettings, type Site } from "./settings.js";

/** The two models compared. */
export interface ModelPair {
  base: LlamaModel;
  tuned: LlamaModel;
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

/** The "direction site" key under which a pair's gains are recorded. */
export const comboKey = (c: { direction: Direction; site: Site }): string => `${c.direction} ${c.site}`;

/** Expands settings into the combos to patch (direction-major, then site, then layer) and the sites to cache. */
export function makePlan(s: RunSettings, L: number): Plan {
  const layers = s.layers ?? Array.from({ length: L }, (_, l) => l);
  const combos = s.directions.flatMap((direction) => s.sites.flatMap((site) => layers.map((layer) => ({ direction, site, layer }))));
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
  for (const k of ["hiddenSize", "intermediateSize", "numLayers", "numHeads", "numKvHeads", "headDim", "vocabSize"] as const satisfies ReadonlyArray<keyof LlamaConfig>) {
    if (a[k] !== b[k]) throw new Error(`base and tuned models differ in ${k} (${a[k]} vs ${b[k]}): they must share architecture shape and vocabulary`);
  }
}

/** Runs both models on `pairs` with the plan's caches; the caller disposes the result. */
export function scoreBatch(models: ModelPair, pairs: Pair[], plan: Plan, s: RunSettings): ScoredBatch {
  const batch = makeBatch(pairs);
  const run = (m: LlamaModel) => forward(m, batch.ids, { ...pairedInput(batch), cache: plan.cacheSites, logitsAt: batch.logitsAt, targets: batch.targets });
  const runs = { base: run(models.base), tuned: run(models.tuned) };
  const logp = { base: rowLogprobs(runs.base.logprobs!, batch, s.perToken), tuned: rowLogprobs(runs.tuned.logprobs!, batch, s.perToken) };
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
  gains: Record<string, number[]>;
  attribution: PairAttribution | null;
  heads: number[][] | null;
  randomDirection: Record<string, number[]> | null;
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
    logp: { base: { chosen: sc.logp.base[2 * i]!, rejected: sc.logp.base[2 * i + 1]! }, tuned: { chosen: sc.logp.tuned[2 * i]!, rejected: sc.logp.tuned[2 * i + 1]! } },
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

/** Gains [combo][pair of the batch] regrouped per pair as "direction site" → per layer. */
export function gainsByKey(combos: Combo[], gains: number[][], i: number): Record<string, number[]> {
  const out: Record<string, number[]> = {};
  combos.forEach((c, ci) => (out[comboKey(c)] ??= []).push(gains[ci]![i]!));
  return out;
}

/**
 * Gains of `copies` patched runs of `model` from layer `layer` on, as [copy][pair of the batch]: copies k … run
 * stacked along the rows, a few at a time (stackGroup through a layer, headGroup through the head, at most
 * maxGroup), entering with `start(first, count)` (freed here) and hooked by `hooks(first, count)`. A resident
 * model runs each group through every layer and the head in one forward; a streamed one goes layer-major (as
 * many copies at once as limits.stackBytes holds), so each layer and head chunk is brought in once for all of
 * them. `margin` holds the unpatched margins.
 */
export function stackedGains(
  model: LlamaModel,
  batch: PairBatch,
  layer: number,
  copies: number,
  start: (first: number, count: number) => tf.Tensor,
  hooks: (first: number, count: number) => Record<string, (v: tf.Tensor) => tf.Tensor>,
  direction: Direction,
  margin: { base: ArrayLike<number>; tuned: ArrayLike<number> },
  perToken: boolean,
  maxGroup = Infinity,
): number[][] {
  const n = batch.ids.length / 2;
  const out: number[][] = [];
  const record = (m: Float64Array, count: number) => {
    for (let k = 0; k < count; k++) out.push(Array.from({ length: n }, (_, i) => gainOf(direction, m[k * n + i]!, margin.base[i]!, margin.tuned[i]!)));
  };
  // through the head from `from` on (the final norm and head only when from is past the last layer)
  const finish = (resid: tf.Tensor, from: number, count: number, hk: Record<string, (v: tf.Tensor) => tf.Tensor> = {}) => {
    const rows = repeatBatch(batch, count);
    const r = forward(model, rows.ids, { ...pairedInput(rows), logitsAt: rows.logitsAt, targets: rows.targets, start: { layer: from, resid }, hooks: hk });
    record(marginsOf(rowLogprobs(r.logprobs!, rows, perToken)), count);
    r.dispose();
  };
  const G = Math.min(maxGroup, stackGroup(model.config, batch));
  const Gh = Math.min(maxGroup, headGroup(model.config, batch));
  if (!model.source) {
    for (let first = 0; first < copies; first += Math.min(G, Gh)) {
      const count = Math.min(G, Gh, copies - first);
      const resid = start(first, count);
      finish(resid, layer, count, hooks(first, count));
      resid.dispose();
    }
    return out;
  }
  const L = model.config.numLayers;
  const R = batch.ids.length;
  const wave = Math.max(G, Gh, Math.floor(limits.stackBytes / (4 * R * batch.ids[0]!.length * model.config.hiddenSize)));
  for (let w0 = 0; w0 < copies; w0 += wave) {
    const groups = Array.from({ length: Math.ceil(Math.min(wave, copies - w0) / G) }, (_, i) => ({ first: w0 + i * G, count: Math.min(G, copies - w0 - i * G, wave - i * G) }));
    let parts: tf.Tensor[] = [];
    let all: tf.Tensor | null = null;
    try {
      for (const g of groups) parts.push(start(g.first, g.count));
      for (let l = layer; l < L; l++) {
        const site = hookName("resid_post", l);
        parts = parts.map((resid, gi) => {
          const { first, count } = groups[gi]!;
          const rows = repeatBatch(batch, count);
          const r = forward(model, rows.ids, { ...pairedInput(rows), start: { layer: l, resid }, stopAfter: l, cache: [site], hooks: hooks(first, count), logitsAt: "none" });
          const h = r.cache.take(site);
          r.dispose();
          resid.dispose();
          return h;
        });
      }
      all = parts.length === 1 ? parts[0]! : tf.concat(parts);
      if (all !== parts[0]) tf.dispose(parts);
      parts = [];
      const count = groups.reduce((a, g) => a + g.count, 0);
      for (let k = 0; k < count; k += Gh) {
        const c = Math.min(Gh, count - k);
        const resid = tf.slice(all, [k * R, 0, 0], [c * R, -1, -1]);
        finish(resid, L, c, hooks(w0 + k, c)); // hooks at the final norm, if any
        resid.dispose();
      }
    } finally {
      tf.dispose(parts);
      all?.dispose();
    }
  }
  return out;
}

/** A model's resid_post at `layer` on a batch (its forward stops there); the caller owns it. */
export function residPostAt(model: LlamaModel, batch: PairBatch, layer: number): tf.Tensor {
  const site = hookName("resid_post", layer);
  const r = forward(model, batch.ids, { ...pairedInput(batch), stopAfter: layer, cache: [site], logitsAt: "none" });
  const h = r.cache.take(site);
  r.dispose();
  return h;
}

/**
 * Margins log p(chosen | prompt) − log p(rejected | prompt) of each pair under `model`, optionally with hooks
 * (e.g. an ablation) applied to every forward pass. Batches of `batchPairs`; the numbers do not depend on it.
 */
export function pairMargins(model: LlamaModel, pairs: Pair[], opts: { hooks?: ForwardOptions["hooks"]; perToken?: boolean; batchPairs?: number } = {}): Float64Array {
  const out = new Float64Array(pairs.length);
  const size = opts.batchPairs ?? 4;
  for (let i = 0; i < pairs.length; i += size) {
    const batch = makeBatch(pairs.slice(i, i + size));
    const r = forward(model, batch.ids, { ...pairedInput(batch), logitsAt: batch.logitsAt, targets: batch.targets, hooks: opts.hooks });
    out.set(marginsOf(rowLogprobs(r.logprobs!, batch, opts.perToken ?? false)), i);
    r.dispose();
  }
  return out;
}

/**
 * An upper estimate of the float32 bytes one scoring batch holds at its peak: both models' cached sites, one
 * layer's transient activations and attention scores, and the logits (with their log-softmax) at `scored`
 * response positions.
 */
export function batchBytes(cfg: LlamaConfig, plan: Plan, rows: number, T: number, scored: number): number {
  const cached = 2 * plan.cacheSites.length * rows * T * cfg.hiddenSize;
  const logits = 3 * scored * cfg.vocabSize;
  return 4 * (cached + logits) + layerActivationBytes(cfg, rows, T);
}

/** Score-sized tensors attention holds at once: the scores, scaled, masked and their softmax, and the mask. */
const SCORE_COPIES = 5;

/**
 * An upper estimate of the float32 bytes one layer's transient activations and attention scores take for `rows`
 * rows of T tokens (tested against the wasm heap's own allocations). Batched attention holds every (row, head)'s
 * scores and softmax at once, but only below the length where "auto" attention goes one kv group at a time; packed
 * rows can be shorter than T, so the bound allows either.
 */
export function layerActivationBytes(cfg: LlamaConfig, rows: number, T: number): number {
  const { hiddenSize: H, intermediateSize: I, numHeads: nH, numKvHeads: nKv, headDim: d } = cfg;
  const g = nH / nKv;
  const rowLimit = nativeMatMulActive() ? NATIVE_GROUPED_MIN : (nH * GROUPED_ATTENTION_MIN) / g; // a row's batched scores at most
  const batchedScores = rows * Math.min(nH * T * T, groupedAttention(cfg, T) ? rowLimit : Infinity);
  return 4 * (rows * T * (8 * H + 4 * I + 3 * (nH + 2 * nKv) * d) + SCORE_COPIES * (batchedScores + g * T * T));
}

/**
 * stackBytes: what one layer call of stacked copies of a batch may take in transient activations
 * (layerActivationBytes); more copies go through the layer in turns, so a 16-layer sweep's 17 runs do not all
 * sit in one wasm heap at once. The head's logits are bounded by headBlock.elements (llama.ts). At 1B width, one
 * thread's whole 1-pair analysis peaked at 5.77 GiB RSS with 128 MiB and 5.83 with 256, in the same time.
 */
export const limits = { stackBytes: 2 ** 27 };

/** How many stacked copies of `batch` one layer call may take (at least 1): limits.stackBytes over one copy's layerActivationBytes. */
export const stackGroup = (cfg: LlamaConfig, batch: PairBatch): number => Math.max(1, Math.floor(limits.stackBytes / layerActivationBytes(cfg, batch.ids.length, batch.ids[0]!.length)));

/**
 * How many stacked copies of `batch` one head pass may take (at least 1): about two copies of their residuals (the
 * caller's slice and the forward's own) within limits.stackBytes, as the final norm takes only the scored rows;
 * the logits go through the head in slices of rows (headBlock).
 */
export const headGroup = (cfg: LlamaConfig, batch: PairBatch): number => Math.max(1, Math.floor(limits.stackBytes / (8 * batch.ids.length * batch.ids[0]!.length * cfg.hiddenSize)));
