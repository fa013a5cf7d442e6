// Edits of the base model's residual stream at one layer, evaluated on pairs: low-rank patches toward the tuned
// model (h_base + α U Uᵀ (h_tuned − h_base)), and steering, which adds a fixed vector with no tuned model at
// inference (h_base + β m v). Used by the low-rank stage on held-out pairs and by apply-subspace, which carries a
// saved subspace to other pairs or another model pair of the same width.
import * as tf from "@tensorflow/tfjs-core";
import type { Pair } from "../data/pairs.js";
import type { LlamaConfig } from "../model/config.js";
import { hookName } from "../model/hooks.js";
import type { Hooks } from "../model/llama.js";
import { makeBatch, positionMask } from "../data/batch.js";
import { randomSubspace } from "../stats/pca.js";
import { mean, seededRandom } from "../stats/stats.js";
import { gainOf, interpolate, subspace } from "./patches.js";
import { margins as pairMargins, residAfter } from "../engine/margins.js";
import { runMargins, type Run } from "../engine/runs.js";
import type { ModelPair } from "./scoring.js";
import type { RunSettings } from "./settings.js";

/** One edit of resid_post at a layer: the new value from the base and tuned values there and the patch mask [B, T, 1]. */
export interface LayerEdit {
  name: string;
  apply: (hBase: tf.Tensor, hTuned: tf.Tensor, mask: tf.Tensor) => tf.Tensor;
}

/** At most how many edits run stacked through the layers above and the head at once (see headGroup). */
export const EDIT_STACK = 8;

/** Steering strengths β tried for each steering vector. */
export const STEERING_STRENGTHS = [0.5, 1, 2, 4];

/**
 * Subspace bases made on first use and reused by every batch of a stage (drawing a random basis of width 2048
 * takes seconds); dispose() frees them.
 */
export class BasisCache {
  private readonly bases = new Map<string, tf.Tensor2D>();
  /** The basis called `key`, made by `make` the first time. */
  get(key: string, make: () => tf.Tensor2D): tf.Tensor2D {
    let b = this.bases.get(key);
    if (!b) this.bases.set(key, (b = tf.keep(make())));
    return b;
  }
  dispose(): void {
    tf.dispose([...this.bases.values()]);
    this.bases.clear();
  }
}

/** The low-rank patch along a basis (made on first use): h_base + α·m·U Uᵀ (h_tuned − h_base). */
export const subspaceEdit = (name: string, alpha: number, basis: () => tf.Tensor2D): LayerEdit => ({
  name,
  apply: (hb, ht, mask) => subspace(alpha, basis())(hb, ht, mask),
});

/** A run's random k-dimensional control basis, seeded by its seed and k (so apply-subspace redraws the run's), kept in `bases`. */
export const randomBasis = (bases: BasisCache, k: number, H: number, seed: number): tf.Tensor2D =>
  // a k = H subspace is the whole space whatever its basis: the identity projects onto it exactly, where
  // Gram–Schmidt on H Gaussian rows costs 2H³ (20 s at 1B width)
  bases.get(`random ${k}`, () =>
    k >= H ? (tf.eye(H) as tf.Tensor2D) : randomSubspace(k, H, seededRandom(seed * 31 + k)),
  );

/** β v [H], what steering adds at a position (freed by the caller's tidy). */
const steeringStep = (v: Float32Array, beta: number): tf.Tensor => tf.mul(tf.tensor1d(v), beta);

/** The steering edit h + β m v (v [H]). */
export const steer =
  (v: Float32Array, beta: number) =>
  (hb: tf.Tensor, _ht: tf.Tensor, mask: tf.Tensor): tf.Tensor =>
    tf.tidy(() => tf.add(hb, tf.mul(mask, steeringStep(v, beta))));

/**
 * Hooks that steer a model as the analysis's steering edits do: h + β v at blocks.{layer}.hook_resid_post, at
 * every position (the edits' mask under the default --positions all, where m = 1 leaves β v's float32 values
 * as they are). So `greedy(model, ids, n, { hooks })` generates under the very intervention whose margins a run
 * reports for that vector and β; a run's vector is its subspace.safetensors's mean_diff at its layer.
 */
export function steeringHooks(
  config: Pick<LlamaConfig, "hiddenSize" | "numLayers">,
  s: { layer: number; direction: ArrayLike<number>; beta: number },
): Hooks {
  const { hiddenSize: H, numLayers: L } = config;
  if (!(Number.isInteger(s.layer) && s.layer >= 0 && s.layer < L))
    throw new RangeError(`steering layer ${s.layer} is outside the model's layers 0..${L - 1}`);
  if (s.direction.length !== H)
    throw new RangeError(`the steering direction has ${s.direction.length} entries; the model's hidden size is ${H}`);
  if (!Number.isFinite(s.beta)) throw new RangeError(`the steering strength β must be a finite number, got ${s.beta}`);
  const v = Float32Array.from(s.direction);
  if (!v.every(Number.isFinite)) throw new RangeError("the steering direction has non-finite entries");
  return { [hookName("resid_post", s.layer)]: (h: tf.Tensor) => tf.tidy(() => tf.add(h, steeringStep(v, s.beta))) };
}

/** The mean of row vectors of length H. */
export function meanRow(rows: Float32Array[], H: number): Float32Array {
  const acc = new Float64Array(H);
  for (const r of rows) for (let j = 0; j < H; j++) acc[j]! += r[j]!;
  return Float32Array.from(acc, (x) => x / Math.max(1, rows.length));
}

/** The fewest leading components whose explained-variance ratios add up to `share` (all when they never do). */
export function componentsFor(ratios: number[], share: number): number {
  let c = 0;
  for (let i = 0; i < ratios.length; i++) if ((c += ratios[i]!) >= share) return i + 1;
  return ratios.length;
}

/**
 * Steering vectors from a mean difference μ [H] and principal directions (rows of `components` [k, H]): μ itself,
 * its projection on the top-k directions, and a random direction with μ's norm (the control).
 */
export function steeringVectors(
  mu: Float32Array,
  components: Float32Array,
  k: number,
  H: number,
  seed: number,
): Array<{ name: string; values: Float32Array }> {
  const proj = new Float32Array(H);
  for (let c = 0; c < k; c++) {
    const u = components.subarray(c * H, (c + 1) * H);
    let d = 0;
    for (let j = 0; j < H; j++) d += u[j]! * mu[j]!;
    for (let j = 0; j < H; j++) proj[j]! += d * u[j]!;
  }
  const r = randomSubspace(1, H, seededRandom(seed * 31 + 7919));
  const unit = r.dataSync() as Float32Array;
  const norm = Math.hypot(...mu);
  const random = Float32Array.from(unit, (x) => x * norm);
  r.dispose();
  return [
    { name: "mean difference", values: mu },
    { name: `top-${k} subspace of the mean difference`, values: proj },
    { name: "random direction (same norm)", values: random },
  ];
}

/**
 * Gains (tuned->base: margin(edited base) − margin(base)) of every edit on the pairs at `idx`, by edit name, each
 * in `idx` order. Each edit is a run entering the base model after `layer`; the engine runs them stacked so the
 * layers above and the head are read once per group. `margins` holds every pair's base and tuned margins (by
 * position in `pairs`).
 */
export async function layerEditGains(
  models: ModelPair,
  pairs: Pair[],
  idx: number[],
  layer: number,
  edits: LayerEdit[],
  s: RunSettings,
  margins: { marginBase: ArrayLike<number>; marginTuned: ArrayLike<number> },
  onPairs: (count: number) => void = () => {},
): Promise<Map<string, number[]>> {
  const out = new Map(edits.map((e) => [e.name, [] as number[]]));
  for (let i = 0; i < idx.length; i += s.batchPairs) {
    const js = idx.slice(i, i + s.batchPairs);
    const batch = makeBatch(js.map((j) => pairs[j]!));
    const hb = residAfter(models.base, batch, layer);
    const ht = residAfter(models.tuned, batch, layer);
    const mask = positionMask(batch, s.positions);
    try {
      const runs = edits.map((e): Run => ({ name: e.name, layer: layer + 1, resid: () => e.apply(hb, ht, mask) }));
      const m = runMargins(models.base, batch, runs, {
        limits: models.limits,
        perToken: s.perToken,
        maxGroup: EDIT_STACK,
      });
      for (const e of edits) {
        const gain = (v: number, i: number) =>
          gainOf("tuned->base", v, margins.marginBase[js[i]!]!, margins.marginTuned[js[i]!]!);
        out.get(e.name)!.push(...Array.from(m.get(e.name)!, gain));
      }
    } finally {
      tf.dispose([hb, ht, mask]);
    }
    onPairs(js.length);
    await new Promise<void>((r) => setImmediate(r));
  }
  return out;
}

/** Each steering vector's norm and, at each strength, its mean gain and recovery (`recovery(edit name)`). */
export function steeringSummary(
  vectors: Array<{ name: string; values: Float32Array }>,
  gains: Map<string, number[]>,
  recovery: (name: string) => number,
): Array<{
  vector: string;
  norm: number;
  by_strength: Array<{ strength: number; mean_gain: number; recovery: number; gains: number[] }>;
}> {
  return vectors.map((v) => ({
    vector: v.name,
    norm: Math.hypot(...v.values),
    by_strength: STEERING_STRENGTHS.map((beta) => ({
      strength: beta,
      mean_gain: mean(gains.get(`steer ${v.name} ${beta}`)!),
      recovery: recovery(`steer ${v.name} ${beta}`),
      gains: gains.get(`steer ${v.name} ${beta}`)!,
    })),
  }));
}

/** A saved subspace: principal directions (rows of `components` [k, H]) and a mean difference at one layer's resid_post. */
export interface SavedSubspace {
  layer: number;
  components: Float32Array;
  meanDiff: Float32Array;
}

/** How much of a saved subspace's effect carries over to these pairs and models (apply-subspace's result). */
export interface TransferResult {
  layer: number;
  n_pairs: number;
  mean_gap: number;
  /** Patching the whole layer (resid_post, tuned->base) on these pairs: the effect there is to transfer. */
  full_layer_recovery: number;
  /** Patching only the saved top-k directions; `share_of_full_layer` = recovery / full_layer_recovery. */
  subspace: Array<{ k: number; recovery: number; random_subspace: number; share_of_full_layer: number }>;
  /** Steering the base model alone with the saved mean difference (and a random direction of its norm). */
  steering: Array<{
    vector: string;
    norm: number;
    by_strength: Array<{ strength: number; mean_gain: number; recovery: number }>;
  }>;
}

/** Patches the saved subspace (and steers with its mean difference) in `models` on `pairs`; pure apart from the models. */
export async function transferStage(
  models: ModelPair,
  pairs: Pair[],
  sub: SavedSubspace,
  s: RunSettings,
  onPairs: (count: number) => void = () => {},
): Promise<TransferResult> {
  const H = models.base.config.hiddenSize;
  if (sub.meanDiff.length !== H || sub.components.length % H !== 0)
    throw new Error(`the subspace is for hidden size ${sub.meanDiff.length}, the models have ${H}`);
  if (!(sub.layer >= 0 && sub.layer < models.base.config.numLayers))
    throw new Error(`the subspace is for layer ${sub.layer}, the models have ${models.base.config.numLayers} layers`);
  const rank = sub.components.length / H;
  const ks = [
    ...new Set([
      ...Array.from({ length: Math.ceil(Math.log2(rank + 1)) }, (_, i) => 2 ** i).filter((k) => k < rank),
      rank,
    ]),
  ];
  const bases = new BasisCache();
  const edits: LayerEdit[] = [{ name: "full layer", apply: interpolate(s.alpha) }];
  for (const k of ks) {
    edits.push(
      subspaceEdit(`saved ${k}`, s.alpha, () =>
        bases.get(`saved ${k}`, () => tf.tensor2d(sub.components.subarray(0, k * H), [k, H])),
      ),
    );
    edits.push(subspaceEdit(`random ${k}`, s.alpha, () => randomBasis(bases, k, H, s.seed)));
  }
  const vectors = steeringVectors(sub.meanDiff, sub.components, 0, H, s.seed).filter((v) => !v.name.startsWith("top-"));
  for (const v of vectors)
    for (const beta of STEERING_STRENGTHS)
      edits.push({ name: `steer ${v.name} ${beta}`, apply: steer(v.values, beta) });
  const opts = { perToken: s.perToken, batchPairs: s.batchPairs, limits: models.limits };
  const margin = {
    marginBase: pairMargins(models.base, pairs, opts),
    marginTuned: pairMargins(models.tuned, pairs, opts),
  };
  const idx = pairs.map((_, i) => i);
  let g: Map<string, number[]>;
  try {
    g = await layerEditGains(models, pairs, idx, sub.layer, edits, s, margin, onPairs);
  } finally {
    bases.dispose();
  }
  const gap = mean(idx.map((i) => margin.marginTuned[i]! - margin.marginBase[i]!));
  const full = mean(g.get("full layer")!) / gap;
  return {
    layer: sub.layer,
    n_pairs: pairs.length,
    mean_gap: gap,
    full_layer_recovery: full,
    subspace: ks.map((k) => {
      const rec = mean(g.get(`saved ${k}`)!) / gap;
      return { k, recovery: rec, random_subspace: mean(g.get(`random ${k}`)!) / gap, share_of_full_layer: rec / full };
    }),
    steering: steeringSummary(vectors, g, (name) => mean(g.get(name)!) / gap),
  };
}
