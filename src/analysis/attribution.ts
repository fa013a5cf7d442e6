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
import { comboKey, type Plan, type ScoredBatch } from "./scoring.js";
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
  const { numLayers: L, numHeads: nH, headDim: d, hiddenSize: H } = model.config;
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
  const base = { lengths: batch.lengths };
  let g: tf.Tensor | null = null;
  try {
    // ∂M/∂resid_post[L−1]: the head's gradient at the scored rows a vocabulary block at a time, then back
    // through the final norm
    g = tf.tidy(() => {
      const x = input(L);
      const dy = targetLogprobGradient(
        model,
        normedRows(model, x, batch.logitsAt),
        batch.targets,
        Array.from(sign.dataSync()),
      );
      return tf.grads((r: tf.Tensor) => normedRows(model, r, batch.logitsAt))([x], dy)[0]!;
    });
    for (let l = L - 1; l >= 0; l--) {
      const [pre, post] = [hookName("resid_pre", l), hookName("resid_post", l)];
      const inLayer = names.filter((n) => n.startsWith(`blocks.${l}.`) && n !== pre && n !== post);
      const dy: tf.Tensor = g;
      let y: tf.Tensor | null = null; // the layer's output: a cached site, which tidy scopes do not free
      const [gx, ...gd] = tf.tidy(() => {
        const zeros = inLayer.map((n) => tf.zeros(n.endsWith("hook_z") ? [B, batch.T, nH, d] : [B, batch.T, H]));
        return tf.grads((x: tf.Tensor, ...deltas: tf.Tensor[]) => {
          const hooks = Object.fromEntries(inLayer.map((n, i) => [n, (v: tf.Tensor) => tf.add(v, deltas[i]!)]));
          const r = forward(model, batch.ids, {
            ...base,
            logitsAt: "none",
            start: { layer: l, resid: x },
            stopAfter: l,
            cache: [post],
            hooks,
          });
          return (y = r.cache.take(post));
        })([input(l), ...zeros], dy);
      });
      (y as tf.Tensor | null)?.dispose();
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

/** Attribution estimates for every pair of a scored batch: the plan's combos, per position for the first key, per head for the first direction. */
export function attributionBatch(
  models: { base: LlamaModel; tuned: LlamaModel },
  sc: ScoredBatch,
  plan: Plan,
  s: RunSettings,
): PairAttribution[] {
  const { numLayers: L, numHeads: nH } = models.base.config;
  const { batch } = sc;
  const B = batch.ids.length;
  const n = B / 2;
  const mask = s.positions === "response" ? sc.mask.response : sc.mask.all; // [B, T, 1]
  const zNames = Array.from({ length: L }, (_, l) => hookName("z", l));
  const out: PairAttribution[] = Array.from({ length: n }, () => ({
    gains: {},
    positions: { key: "", chosen: [], rejected: [] },
    heads: [],
  }));
  const firstKey = plan.combos.length ? comboKey(plan.combos[0]!) : "";
  const directions = [...new Set(plan.combos.map((c) => c.direction))] as Direction[];
  for (const [di, direction] of directions.entries()) {
    const { dst } = roles(direction);
    const combos = plan.combos.filter((c) => c.direction === direction);
    // a window's estimate is the sum of its layers' (first order is additive)
    const windowOf = (c: (typeof combos)[number]) => windowLayers(c.layer, s.window, L).map((j) => hookName(c.site, j));
    const siteNames = [...new Set(combos.flatMap(windowOf))];
    const names = di === 0 ? [...siteNames, ...zNames.filter((z) => !siteNames.includes(z))] : siteNames;
    // the residuals entering each layer, and z, from the scoring pass's cache (makePlan caches z for attribution;
    // a plan made without it gets z from one more plain forward per model)
    const cached = sc.runs[dst].cache;
    const zRuns =
      di === 0 && !sc.runs.base.cache.has(zNames[0]!)
        ? {
            base: forward(models.base, batch.ids, { lengths: batch.lengths, logitsAt: "none", cache: zNames }),
            tuned: forward(models.tuned, batch.ids, { lengths: batch.lengths, logitsAt: "none", cache: zNames }),
          }
        : null;
    const grads = batchGradients(models[dst], batch, names, s.perToken, (l) =>
      cached.get(l === 0 ? "hook_embed" : hookName("resid_post", l - 1)),
    );
    try {
      const act = (m: "base" | "tuned", nm: HookName) =>
        zRuns && nm.endsWith("hook_z") ? zRuns[m].cache.get(nm) : sc.runs[m].cache.get(nm);
      // α (h_tuned − h_base) · g per row and position → [B, T]
      const perPosition = (nm: HookName) =>
        tf.tidy(() => {
          const prod = tf.mul(tf.sub(act("tuned", nm), act("base", nm)), grads.get(nm)!);
          const flat = prod.rank === 4 ? tf.sum(prod, [2, 3]) : tf.sum(prod, 2);
          return tf.mul(tf.mul(flat, tf.squeeze(mask, [2])), s.alpha);
        });
      const overWindow = (c: (typeof combos)[number]) => tf.addN(windowOf(c).map(perPosition));
      for (const c of combos) {
        const key = comboKey(c);
        const rowSums = readValues(() => tf.sum(overWindow(c), 1));
        for (let i = 0; i < n; i++) (out[i]!.gains[key] ??= []).push(rowSums[2 * i]! + rowSums[2 * i + 1]!);
        if (key === firstKey) {
          const pos = readValues(() => overWindow(c));
          for (let i = 0; i < n; i++) {
            const row = (r: number) => Array.from(pos.subarray(r * batch.T, r * batch.T + batch.lengths[r]!));
            out[i]!.positions.key = key;
            out[i]!.positions.chosen.push(row(2 * i));
            out[i]!.positions.rejected.push(row(2 * i + 1));
          }
        }
      }
      if (di === 0) {
        for (const nm of zNames) {
          // per head: sum over head_dim and the masked positions of both rows
          const perHead = readValues(() =>
            tf.tidy(() => {
              const prod = tf.mul(
                tf.mul(tf.sub(act("tuned", nm), act("base", nm)), grads.get(nm)!),
                tf.expandDims(mask, 3),
              );
              return tf.mul(tf.sum(prod, [1, 3]), s.alpha); // [B, nH]
            }),
          );
          for (let i = 0; i < n; i++)
            out[i]!.heads.push(
              Array.from({ length: nH }, (_, h) => perHead[2 * i * nH + h]! + perHead[(2 * i + 1) * nH + h]!),
            );
        }
      }
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
  const keyIndex = new Map<string, number>();
  const entries = plan.combos.map((c) => {
    const key = comboKey(c);
    const li = keyIndex.get(key) ?? 0;
    keyIndex.set(key, li + 1);
    const est = records.map((r) => r.attribution!.gains[key]![li]!);
    const exactGains = records[0]!.gains[key] ? records.map((r) => r.gains[key]![li]!) : null;
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
