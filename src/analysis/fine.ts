// Finer exact patches than a whole layer: one attention head (attn.hook_z) at a time, and one token position at
// a time. Each is a named run (one head, or one position, patched) resumed from the patched model's cached
// residual; the engine runs them stacked or layer-major.
import * as tf from "@tensorflow/tfjs-core";
import { makeBatch, pairedInput } from "../data/batch.js";
import type { Pair } from "../data/pairs.js";
import { hookName } from "../model/hooks.js";
import { forward } from "../model/llama.js";
import { runMargins, type Run } from "../engine/runs.js";
import { marginsOfRun, scored } from "../engine/margins.js";
import { gainOf, roles } from "./patches.js";
import type { ModelPair } from "./scoring.js";
import type { Direction, RunSettings } from "./settings.js";
import type { SweepInput } from "./sweep.js";

/** The residual entering layer l of a run, from its cache (the embedding for l = 0). */
const residPre = (cache: { get(name: string): tf.Tensor }, l: number) =>
  l === 0 ? cache.get("hook_embed") : cache.get(hookName("resid_post", l - 1));

/** Gains [run][pair] of `runs` of the direction's destination model, from their margins. */
function gainsOf(
  models: ModelPair,
  batch: SweepInput["batch"],
  runs: Run[],
  direction: Direction,
  margin: SweepInput["margin"],
  s: RunSettings,
): number[][] {
  const m = runMargins(models[roles(direction).dst], batch, runs, { limits: models.limits, perToken: s.perToken });
  return runs.map((r) => Array.from(m.get(r.name)!, (v, i) => gainOf(direction, v, margin.base[i]!, margin.tuned[i]!)));
}

/**
 * Exact per-head patching (the patched model's resid_pre from the sweep input's cache): for every layer and head,
 * the patched model (direction's destination) with that head's attn.hook_z moved toward the source model's by α
 * over the patch mask. Returns [pair][layer][head] gains.
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
  const mask4 = tf.expandDims(patchMask, 3); // [B, T, 1, 1]
  try {
    for (let l = 0; l < L; l++) {
      const zSrc = srcRun.cache.get(zNames[l]!); // [B, T, nH, d]
      const edit = (head: number) => (v: tf.Tensor) =>
        tf.tidy(() => {
          const sel = tf.mul(mask4, tf.reshape(tf.oneHot(tf.tensor1d([head], "int32"), nH), [1, 1, nH, 1]));
          const v4 = tf.reshape(v, [batch.ids.length, batch.T, nH, -1]);
          return tf.reshape(tf.add(v4, tf.mul(tf.mul(sel, tf.sub(zSrc, v4)), s.alpha)), v.shape);
        });
      const runs = Array.from({ length: nH }, (_, h): Run => ({
        name: `head ${h}`,
        layer: l,
        resid: residPre(dstCache, l),
        hooks: { [zNames[l]!]: edit(h) },
      }));
      const g = gainsOf(models, batch, runs, direction, margin, s);
      for (let i = 0; i < n; i++) out[i]!.push(g.map((perHead) => perHead[i]!));
    }
  } finally {
    mask4.dispose();
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
  const opts = { ...scored(batch, models.limits), cache: names };
  const runs = { base: forward(models.base, batch.ids, opts), tuned: forward(models.tuned, batch.ids, opts) };
  const score = (m: "base" | "tuned") => marginsOfRun(runs[m], batch, s.perToken)[0]!;
  const margin = { base: [score("base")], tuned: [score("tuned")] };
  const T = batch.T;
  const valid = tf.tensor3d(
    batch.ids.flatMap((_, r) => Array.from({ length: T }, (_, t) => (t < batch.lengths[r]! ? 1 : 0))),
    [2, T, 1],
  );
  try {
    const out: number[][] = [];
    for (let l = 0; l < L; l++) {
      const hSrc = runs[src].cache.get(hookName("resid_post", l));
      const hDst = runs[dst].cache.get(hookName("resid_post", l));
      // the run for position t enters layer l + 1 (the head, after the last layer) with t of both rows patched
      const patched = (t: number) => () =>
        tf.tidy(() => {
          const sel = tf.mul(tf.reshape(tf.oneHot(tf.tensor1d([t], "int32"), T), [1, T, 1]), valid); // [2, T, 1]
          return tf.add(hDst, tf.mul(tf.mul(sel, tf.sub(hSrc, hDst)), s.alpha));
        });
      const g = gainsOf(
        models,
        batch,
        Array.from({ length: T }, (_, t): Run => ({ name: `position ${t}`, layer: l + 1, resid: patched(t) })),
        direction,
        margin,
        s,
      );
      out.push(g.map((x) => x[0]!));
    }
    return out;
  } finally {
    valid.dispose();
    runs.base.dispose();
    runs.tuned.dispose();
  }
}
