// Attribution patching: the first-order (gradient) estimate of every patch of the sweep at once. A patch that
// moves a site from h_dst toward h_src by α changes the patched model's margin by about
//   α (h_src − h_dst) · ∂margin_dst/∂h_dst,
// summed over the patched positions of both rows of a pair; in gain terms (patches.ts gainOf) that is
// α (h_tuned − h_base) · ∂margin_dst/∂h_dst in either direction. One backward pass per destination model, a
// layer at a time from the scoring pass's cached residuals, gives it for every site, layer, position and head.
import * as tf from "@tensorflow/tfjs-core";
import { makeBatch, type PairBatch } from "../data/batch.js";
import { hookName, type HookName } from "../model/hooks.js";
import { gradientsEnabled } from "../model/gradients.js";
import { forward, normedRows, targetLogprobGradient, type LlamaModel } from "../model/llama.js";
import { pearson } from "../stats/stats.js";
import { readValues } from "../model/read.js";
import { roles, windowLayers } from "./patches.js";
import { comboKey, runKey, type Plan, type ScoredBatch } from "./scoring.js";
import type { Direction, RunSettings } from "./settings.js";
import type { AttributionSummary, PairAttribution, PairRecord } from "./schema.js";

/**
 * ∂(Σ_pairs margin)/∂h at each named site of `model` on the batch, as tensors shaped like the sites (the
 * caller disposes them). Each pair's margin depends only on its own two rows, so a pair's rows hold its own
 * gradient. Backpropagated a layer at a time: the head's gradient first, then each layer's vector-Jacobian product
 * from its cached input, last layer first, so the gradient tape holds one layer's activations at a time (not the
 * whole model's), and a streamed model works as a resident one. `residIn(l)` gives the residual entering layer l
 * (l = numLayers: entering the final norm) in the caller's [B, T, H] layout, e.g. from a scoring pass's cache;
 * without it one plain forward makes them. Needs the gradient registry (enableGradients).
 */
export function siteGradients(
  model: LlamaModel,
  batch: PairBatch,
  names: HookName[],
  perToken: boolean,
  residIn?: (l: number) => tf.Tensor,
): Map<HookName, tf.Tensor> {
  if (!gradientsEnabled()) throw new Error("attribution patching needs gradients: await enableGradients() first");
  const L = model.config.numLayers;
  const B = batch.ids.length;
  const count = new Array<number>(B).fill(0);
  for (const r of batch.rowOf) count[r]!++;
  const sign = tf.tensor1d(batch.rowOf.map((r) => (r % 2 === 0 ? 1 : -1) / (perToken ? count[r]! : 1)));
  const own = residIn
    ? null
    : forward(model, batch.ids, {
        lengths: batch.lengths,
        logitsAt: "none",
        cache: ["hook_embed", ...Array.from({ length: L }, (_, l) => hookName("resid_post", l))],
      });
  const input = residIn ?? ((l: number) => own!.cache.get(l === 0 ? "hook_embed" : hookName("resid_post", l - 1)));
  const want = new Set<string>(names);
  const out = new Map<HookName, tf.Tensor>();
  let g: tf.Tensor | null = null;
  try {
    g = headGradient(model, batch, () => input(L), sign);
    for (let l = L - 1; l >= 0; l--) {
      const [pre, post] = [hookName("resid_pre", l), hookName("resid_post", l)];
      const inLayer = names.filter((n) => n.startsWith(`blocks.${l}.`) && n !== pre && n !== post);
      const dy: tf.Tensor = g;
      const [gx, ...gd] = layerVjp(model, batch, l, inLayer, () => input(l), dy);
      inLayer.forEach((n, i) => out.set(n, gd[i]!));
      if (want.has(post)) out.set(post, dy);
      else dy.dispose();
      g = gx!;
      if (want.has(pre)) out.set(pre, tf.clone(g));
    }
    return out;
  } catch (e) {
    for (const t of out.values()) t.dispose();
    throw e;
  } finally {
    if (g && ![...out.values()].includes(g)) g.dispose();
    sign.dispose();
    own?.dispose();
  }
}

/**
 * ∂M/∂resid_post[L−1] for M = Σ sign · log p(target) at the scored rows, with x the residual entering the final
 * norm: the head's gradient a vocabulary block at a time (no [positions, vocabulary] tensor), then back through
 * the final norm.
 */
function headGradient(model: LlamaModel, batch: PairBatch, xOf: () => tf.Tensor, sign: tf.Tensor1D): tf.Tensor {
  return tf.tidy(() => {
    const x = xOf(); // made inside the tidy scope: a slice the caller makes is freed with it
    const rows = normedRows(model, x, batch.logitsAt);
    const dy = targetLogprobGradient(model, rows, batch.targets, Array.from(sign.dataSync()));
    return tf.grads((r: tf.Tensor) => normedRows(model, r, batch.logitsAt))([x], dy)[0]!;
  });
}

/**
 * Layer l's vector-Jacobian product with dy (∂M/∂ its output), from its input x: [∂M/∂x, ∂M/∂(each of
 * `inLayer`'s sites)], the sites' gradients taken as those of a zero added to each. x = xOf(), made inside the
 * tidy scope as the head's is.
 */
function layerVjp(
  model: LlamaModel,
  batch: PairBatch,
  l: number,
  inLayer: HookName[],
  xOf: () => tf.Tensor,
  dy: tf.Tensor,
): tf.Tensor[] {
  const { numHeads: nH, headDim: d, hiddenSize: H } = model.config;
  const [B, post] = [batch.ids.length, hookName("resid_post", l)];
  let y: tf.Tensor | null = null; // the layer's output: a cached site, which tidy scopes do not free
  const grads = tf.tidy(() => {
    const zeros = inLayer.map((n) => tf.zeros(n.endsWith("hook_z") ? [B, batch.T, nH, d] : [B, batch.T, H]));
    return tf.grads((x0: tf.Tensor, ...deltas: tf.Tensor[]) => {
      const hooks = Object.fromEntries(inLayer.map((n, i) => [n, (v: tf.Tensor) => tf.add(v, deltas[i]!)]));
      const r = forward(model, batch.ids, {
        lengths: batch.lengths,
        logitsAt: "none",
        start: { layer: l, resid: x0 },
        stopAfter: l,
        cache: [post],
        hooks,
      });
      return (y = r.cache.take(post));
    })([xOf(), ...zeros], dy);
  });
  (y as tf.Tensor | null)?.dispose();
  return grads;
}

/**
 * siteGradients for a batch of pairs, one pair at a time (a pair's margin depends on its two rows only, so its
 * gradients are the batch's at its rows): the tape then holds one pair's layer, not the batch's. `residIn` as
 * siteGradients', in the batch's [B, T, H] layout; the gradients come back in it (0 past a pair's length).
 */
function batchGradients(
  model: LlamaModel,
  batch: PairBatch,
  names: HookName[],
  perToken: boolean,
  residIn: (l: number) => tf.Tensor,
): Map<HookName, tf.Tensor> {
  const parts = batch.pairs.map((p, i) => {
    const one = makeBatch([p]);
    const rows = (t: tf.Tensor) => tf.slice(t, [2 * i, 0, 0], [2, one.T, -1]);
    const g = siteGradients(model, one, names, perToken, (l) => rows(residIn(l)));
    if (one.T === batch.T) return g;
    for (const [n, t] of g) {
      g.set(n, tf.pad(t, t.shape.map((_, k) => (k === 1 ? [0, batch.T - one.T] : [0, 0])) as Array<[number, number]>));
      t.dispose();
    }
    return g;
  });
  return new Map(
    names.map((n) => {
      const all = parts.map((g) => g.get(n)!);
      const joined = all.length === 1 ? all[0]! : tf.concat(all, 0);
      if (all.length > 1) tf.dispose(all);
      return [n, joined];
    }),
  );
}

/** A site's activation in either model: from the scoring pass's cache, or (z) from `zRuns` when it had to run. */
type Activation = (m: "base" | "tuned", name: HookName) => tf.Tensor;

/**
 * Each combo's estimate per pair into `out` (its window's sites summed: first order is additive), and the first
 * key's per-position estimates; `perPosition(site)` is α (h_tuned − h_base) · g per row and position [B, T].
 */
function comboEstimates(
  out: PairAttribution[],
  combos: Plan["combos"],
  windowOf: (c: Plan["combos"][number]) => HookName[],
  perPosition: (name: HookName) => tf.Tensor,
  firstKey: string,
  batch: PairBatch,
): void {
  const overWindow = (c: Plan["combos"][number]) => tf.addN(windowOf(c).map(perPosition));
  for (const c of combos) {
    const key = comboKey(c);
    const rowSums = readValues(() => tf.sum(overWindow(c), 1));
    for (let i = 0; i < out.length; i++) out[i]!.gains[runKey(c)] = rowSums[2 * i]! + rowSums[2 * i + 1]!;
    if (key !== firstKey) continue;
    const pos = readValues(() => overWindow(c));
    for (let i = 0; i < out.length; i++) {
      const row = (r: number) => Array.from(pos.subarray(r * batch.T, r * batch.T + batch.lengths[r]!));
      out[i]!.positions.key = key;
      out[i]!.positions.chosen.push(row(2 * i));
      out[i]!.positions.rejected.push(row(2 * i + 1));
    }
  }
}

/** Per layer and head, the estimate summed over head_dim and the masked positions of both rows, into `out`. */
function headEstimates(
  out: PairAttribution[],
  zNames: HookName[],
  act: Activation,
  grads: Map<HookName, tf.Tensor>,
  mask: tf.Tensor,
  alpha: number,
  nH: number,
): void {
  for (const nm of zNames) {
    const perHead = readValues(() =>
      tf.tidy(() => {
        const prod = tf.mul(tf.mul(tf.sub(act("tuned", nm), act("base", nm)), grads.get(nm)!), tf.expandDims(mask, 3));
        return tf.mul(tf.sum(prod, [1, 3]), alpha); // [B, nH]
      }),
    );
    for (let i = 0; i < out.length; i++)
      out[i]!.heads.push(
        Array.from({ length: nH }, (_, h) => perHead[2 * i * nH + h]! + perHead[(2 * i + 1) * nH + h]!),
      );
  }
}

/** Attribution estimates for every pair of a scored batch: the plan's combos, per position for the first key, per head for the first direction. */
export function attributionBatch(
  models: { base: LlamaModel; tuned: LlamaModel },
  sc: ScoredBatch,
  plan: Plan,
  s: RunSettings,
): PairAttribution[] {
  const { numLayers: L, numHeads: nH } = models.base.config;
  const { batch } = sc;
  const mask = s.positions === "response" ? sc.mask.response : sc.mask.all; // [B, T, 1]
  const zNames = Array.from({ length: L }, (_, l) => hookName("z", l));
  const out: PairAttribution[] = Array.from({ length: batch.ids.length / 2 }, () => ({
    gains: {},
    positions: { key: "", chosen: [], rejected: [] },
    heads: [],
  }));
  const firstKey = plan.combos.length ? comboKey(plan.combos[0]!) : "";
  const directions = [...new Set(plan.combos.map((c) => c.direction))] as Direction[];
  for (const [di, direction] of directions.entries()) {
    const { dst } = roles(direction);
    const combos = plan.combos.filter((c) => c.direction === direction);
    const windowOf = (c: (typeof combos)[number]) =>
      windowLayers(c.layer, s.window, L).map((j): HookName => hookName(c.site, j));
    const siteNames = [...new Set(combos.flatMap(windowOf))];
    const names = di === 0 ? [...siteNames, ...zNames.filter((z) => !siteNames.includes(z))] : siteNames;
    // the residuals entering each layer, and z, from the scoring pass's cache (makePlan caches z for attribution;
    // a plan made without it gets z from one more plain forward per model)
    const cached = sc.runs[dst].cache;
    const zOpts = { lengths: batch.lengths, logitsAt: "none" as const, cache: zNames };
    const zRuns =
      di === 0 && !sc.runs.base.cache.has(zNames[0]!)
        ? { base: forward(models.base, batch.ids, zOpts), tuned: forward(models.tuned, batch.ids, zOpts) }
        : null;
    const grads = batchGradients(models[dst], batch, names, s.perToken, (l) =>
      cached.get(l === 0 ? "hook_embed" : hookName("resid_post", l - 1)),
    );
    try {
      const act: Activation = (m, nm) =>
        zRuns && nm.endsWith("hook_z") ? zRuns[m].cache.get(nm) : sc.runs[m].cache.get(nm);
      const perPosition = (nm: HookName) =>
        tf.tidy(() => {
          const prod = tf.mul(tf.sub(act("tuned", nm), act("base", nm)), grads.get(nm)!);
          const flat = prod.rank === 4 ? tf.sum(prod, [2, 3]) : tf.sum(prod, 2);
          return tf.mul(tf.mul(flat, tf.squeeze(mask, [2])), s.alpha);
        });
      comboEstimates(out, combos, windowOf, perPosition, firstKey, batch);
      if (di === 0) headEstimates(out, zNames, act, grads, mask, s.alpha, nH);
    } finally {
      for (const g of grads.values()) g.dispose();
      zRuns?.base.dispose();
      zRuns?.tuned.dispose();
    }
  }
  return out;
}

/** Summarizes the pairs' attribution records (null when the run made none); `gap` is each pair's gap. */
export function attributionSummary(
  records: PairRecord[],
  plan: Plan,
  gap: ArrayLike<number>,
): AttributionSummary | null {
  if (!records.length || !records[0]!.attribution) return null;
  const meanGap = Array.from(gap).reduce((a, b) => a + b, 0) / records.length;
  const entries = plan.combos.map((c) => {
    const key = runKey(c);
    const est = records.map((r) => r.attribution!.gains[key]!);
    const exactGains = records[0]!.gains[key] !== undefined ? records.map((r) => r.gains[key]!) : null;
    const mean = (x: number[]) => x.reduce((a, b) => a + b, 0) / x.length;
    return {
      direction: c.direction,
      site: c.site,
      layer: c.layer,
      mean_estimate: mean(est),
      recovery_estimate: mean(est) / meanGap,
      exact: exactGains
        ? {
            recovery: mean(exactGains) / meanGap,
            correlation: pearson(est, exactGains),
            max_abs_error: Math.max(...est.map((v, i) => Math.abs(v - exactGains[i]!))),
          }
        : null,
    };
  });
  const L = records[0]!.attribution!.heads.length;
  const nH = records[0]!.attribution!.heads[0]?.length ?? 0;
  const headMean = Array.from({ length: L }, (_, l) =>
    Array.from(
      { length: nH },
      (_, h) => records.reduce((a, r) => a + r.attribution!.heads[l]![h]!, 0) / records.length,
    ),
  );
  let top = 0;
  for (let i = 1; i < records.length; i++) if (Math.abs(gap[i]!) > Math.abs(gap[top]!)) top = i;
  const r = records[top]!;
  const firstKey = r.attribution!.positions.key;
  return {
    entries,
    heads: {
      direction: plan.combos[0]?.direction ?? "tuned->base",
      mean: headMean,
      recovery: headMean.map((row) => row.map((v) => v / meanGap)),
    },
    heatmap: firstKey
      ? {
          pair: r.index,
          key: firstKey,
          gap: r.gap,
          layers: plan.combos.filter((c) => comboKey(c) === firstKey).map((c) => c.layer),
          ids: r.ids,
          chosen: r.attribution!.positions.chosen,
          rejected: r.attribution!.positions.rejected,
        }
      : null,
  };
}
