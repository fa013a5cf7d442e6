// Finer exact patches than a whole layer: one attention head (attn.hook_z) at a time, and one token position at
// a time. Each copy of the batch patches one head (or one position), and the copies run stacked through the
// layers above and the head, a few at a time (stackedGains: layer-major on a streamed model), resumed from the
// patched model's cached resid_pre.
import * as tf from "@tensorflow/tfjs-core";
import { makeBatch, marginsOf, pairedInput, rowLogprobs } from "../data/batch.js";
import type { Pair } from "../data/pairs.js";
import { hookName } from "../model/hooks.js";
import { forward } from "../model/llama.js";
import { roles } from "./patches.js";
import { stackedGains, type ModelPair } from "./scoring.js";
import type { Direction, RunSettings } from "./settings.js";
import type { SweepInput } from "./sweep.js";

/** The residual entering layer l of a run, from its cache (the embedding for l = 0). */
const residPre = (cache: { get(name: string): tf.Tensor }, l: number) => (l === 0 ? cache.get("hook_embed") : cache.get(hookName("resid_post", l - 1)));

/** `count` copies of x stacked along the first axis. */
const stack = (x: tf.Tensor, count: number) => tf.tidy(() => tf.concat(Array.from({ length: count }, () => x)));

/**
 * Exact per-head patching (the patched model's resid_pre from the sweep input's cache): for every layer and head, the patched model (direction's destination) with that head's
 * attn.hook_z moved toward the source model's by α over the patch mask. Returns [pair][layer][head] gains.
 */
export function headSweep(models: ModelPair, input: SweepInput, direction: Direction, s: RunSettings): number[][][] {
  const { numLayers: L, numHeads: nH } = models.base.config;
  const { dst, src } = roles(direction);
  const { batch, margin, patchMask } = input;
  const dstCache = input.caches[dst];
  if (!dstCache) throw new Error(`headSweep: no ${dst} activations cached`);
  const zNames = Array.from({ length: L }, (_, l) => hookName("z", l));
  // z is not among a scoring pass's cached sites: the source model's come from one more forward
  const srcRun = forward(models[src], batch.ids, { ...pairedInput(batch), logitsAt: "none", cache: zNames });
  const n = batch.ids.length / 2;
  const out = Array.from({ length: n }, () => [] as number[][]);
  try {
    const mask4 = tf.expandDims(patchMask, 3); // [B, T, 1, 1]
    try {
      for (let l = 0; l < L; l++) {
        const zSrc = srcRun.cache.get(zNames[l]!);
        const edit = (first: number, count: number) => (v: tf.Tensor) =>
          tf.tidy(() => {
            // copy k of the stacked rows patches head first + k only
            const B = batch.ids.length;
            const onehot = tf.reshape(tf.oneHot(tf.range(first, first + count, 1, "int32"), nH), [count, 1, 1, nH, 1]);
            const sel = tf.mul(tf.tile(tf.expandDims(mask4, 0), [count, 1, 1, 1, 1]), onehot); // [count, B, T, nH, 1]
            const v5 = tf.reshape(v, [count, B, batch.T, nH, -1]);
            return tf.reshape(tf.add(v5, tf.mul(tf.mul(sel, tf.sub(tf.expandDims(zSrc, 0), v5)), s.alpha)), v.shape);
          });
        const g = stackedGains(models[dst], batch, l, nH, (_f, count) => stack(residPre(dstCache, l), count), (first, count) => ({ [zNames[l]!]: edit(first, count) }), direction, margin, s.perToken);
        for (let i = 0; i < n; i++) out[i]!.push(g.map((perHead) => perHead[i]!));
      }
    } finally {
      mask4.dispose();
    }
  } finally {
    srcRun.dispose();
  }
  return out;
}

/**
 * Exact per-position patching of one pair at resid_post: for every layer l and position t, the patched model with
 * both rows' resid_post at (l, t) moved toward the source model's by α (a position past a row's end is left
 * alone). Returns [layer][position] gains, position over the longer row.
 */
export function positionSweep(models: ModelPair, pair: Pair, direction: Direction, s: RunSettings): number[][] {
  const { numLayers: L } = models.base.config;
  const { dst, src } = roles(direction);
  const batch = makeBatch([pair]);
  const names = ["hook_embed", ...Array.from({ length: L }, (_, l) => hookName("resid_post", l))];
  const opts = { ...pairedInput(batch), logitsAt: batch.logitsAt, targets: batch.targets, cache: names };
  const runs = { base: forward(models.base, batch.ids, opts), tuned: forward(models.tuned, batch.ids, opts) };
  const score = (m: "base" | "tuned") => marginsOf(rowLogprobs(runs[m].logprobs!, batch, s.perToken))[0]!;
  const margin = { base: [score("base")], tuned: [score("tuned")] };
  const T = batch.T;
  const valid = tf.tensor3d(batch.ids.flatMap((_, r) => Array.from({ length: T }, (_, t) => (t < batch.lengths[r]! ? 1 : 0))), [2, T, 1]);
  try {
    const out: number[][] = [];
    for (let l = 0; l < L; l++) {
      const hSrc = runs[src].cache.get(hookName("resid_post", l));
      const hDst = runs[dst].cache.get(hookName("resid_post", l));
      // copy k enters layer l + 1 (the head, after the last layer) with position first + k of both rows patched
      const start = (first: number, count: number) =>
        tf.tidy(() => {
          const onehot = tf.reshape(tf.oneHot(tf.range(first, first + count, 1, "int32"), T), [count, 1, T, 1]);
          const sel = tf.mul(onehot, tf.expandDims(valid, 0)); // [count, 2, T, 1]
          const patched = tf.add(tf.expandDims(hDst, 0), tf.mul(tf.mul(sel, tf.expandDims(tf.sub(hSrc, hDst), 0)), s.alpha));
          return tf.reshape(patched, [count * 2, T, hDst.shape[2]!]);
        });
      const g = stackedGains(models[dst], batch, l + 1, T, start, () => ({}), direction, margin, s.perToken);
      out.push(g.map((x) => x[0]!));
    }
    return out;
  } finally {
    valid.dispose();
    runs.base.dispose();
    runs.tuned.dispose();
  }
}
