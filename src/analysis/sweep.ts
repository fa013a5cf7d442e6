// Stage 2, the patch sweep: for every (direction, site, layer) of the plan, run the patched model on a batch
// and read each pair's gain. The real patch and every control go through this one loop.
import * as tf from "@tensorflow/tfjs-core";
import { marginsOf, pairedInput, repeatBatch, rowLogprobs, type PairBatch } from "../data/batch.js";
import { forward, type Hook, type LlamaModel } from "../model/llama.js";
import type { ActivationCache } from "../model/hooks.js";
import { hookName } from "../model/hooks.js";
import { gainOf, patchedMargins, roles, windowLayers, type Patch } from "./patches.js";
import { headGroup, stackGroup, type Combo, type ModelPair, type ScoredBatch } from "./scoring.js";
import type { RunSettings } from "./settings.js";

/** What a sweep over one batch reads: the batch, the cached activations of each model, the unpatched margins. */
export interface SweepInput {
  batch: PairBatch;
  caches: { base?: ActivationCache; tuned?: ActivationCache };
  margin: { base: ArrayLike<number>; tuned: ArrayLike<number> };
  patchMask: tf.Tensor;
}

/** The sweep input of a scored batch. */
export const sweepInput = (sc: ScoredBatch): SweepInput => ({
  batch: sc.batch,
  caches: { base: sc.runs.base.cache, tuned: sc.runs.tuned.cache },
  margin: sc.margin,
  patchMask: sc.mask.patch,
});

/**
 * Gains [combo][pair of the batch] of the patch `patchFor(combo, comboIndex)` at each combo, one resumed forward
 * per combo. The reference for sweepLayerMajor, which computes the same gains.
 */
export function sweepPerLayer(models: ModelPair, input: SweepInput, combos: Combo[], patchFor: (c: Combo, ci: number) => Patch, s: RunSettings): number[][] {
  return combos.map((c, ci) => {
    const { dst, src } = roles(c.direction);
    const site = hookName(c.site, c.layer);
    const dstCache = cacheOf(input, dst, c);
    const hDst = dstCache.get(site);
    const hSrc = input.caches[src]?.get(site) ?? hDst;
    const m = patchedMargins(models[dst], input.batch, c, patchFor(c, ci), { dst: hDst, src: hSrc, dstCache }, input.patchMask, s.perToken);
    return Array.from(m, (v, i) => gainOf(c.direction, v, input.margin.base[i]!, input.margin.tuned[i]!));
  });
}

/**
 * Gains [combo][pair] of patching every layer of each combo's window (layers l … l+window−1) at its site
 * together: one forward of the patched model from its cached resid_pre at l, with each window layer's site moved
 * from its current value (which the earlier window layers have already changed) toward the source's cached value
 * by the combo's patch (patchFor is asked for each window layer). With α = 1 and every position patched, a
 * residual-stream window equals patching its last layer alone.
 */
export function sweepWindows(models: ModelPair, input: SweepInput, combos: Combo[], patchFor: (c: Combo, ci: number) => Patch, s: RunSettings): number[][] {
  return combos.map((c, ci) => {
    const { dst, src } = roles(c.direction);
    const dstCache = cacheOf(input, dst, c);
    const hooks: Record<string, Hook> = {};
    for (const j of windowLayers(c.layer, s.window, models[dst].config.numLayers)) {
      const site = hookName(c.site, j);
      const hSrc = input.caches[src]?.get(site) ?? dstCache.get(site);
      const patch = patchFor({ ...c, layer: j }, ci);
      hooks[site] = (v) => patch(v, hSrc, input.patchMask);
    }
    const { batch } = input;
    const r = forward(models[dst], batch.ids, { ...pairedInput(batch), logitsAt: batch.logitsAt, targets: batch.targets, start: { layer: c.layer, resid: dstCache.get(hookName("resid_pre", c.layer)) }, hooks });
    const m = marginsOf(rowLogprobs(r.logprobs!, batch, s.perToken));
    r.dispose();
    return Array.from(m, (v, i) => gainOf(c.direction, v, input.margin.base[i]!, input.margin.tuned[i]!));
  });
}

function cacheOf(input: SweepInput, model: "base" | "tuned", c: Combo): ActivationCache {
  const cache = input.caches[model];
  if (!cache) throw new Error(`sweep: no ${model} activations cached for ${c.direction}`);
  return cache;
}

/** One patched run in a layer-major sweep: where it enters the model and with what. */
interface Stream {
  ci: number;
  start: number; // first layer it runs (L: only the head)
  resid: tf.Tensor; // the residual it enters `start` with (then the sweep's, which frees it)
  hook?: { site: string; value: tf.Tensor }; // attn_out/mlp_out: the site value it uses at layer `start`
}

/**
 * Gains [combo][pair of the batch] of the patch `patchFor(combo, comboIndex)` at each combo. A patch that reads
 * no source activation (mean-ablation) may be swept with only the patched model's cache. Patches of a streamed
 * model are swept layer-major (each layer read once), of a resident one per combo (faster when nothing has to
 * be read in: one forward call per combo instead of one per layer); the gains are the same bit for bit.
 */
export function sweepBatch(models: ModelPair, input: SweepInput, combos: Combo[], patchFor: (c: Combo, ci: number) => Patch, s: RunSettings): number[][] {
  if (s.window > 1) return sweepWindows(models, input, combos, patchFor, s);
  const streamed = (["base", "tuned"] as const).some((m) => models[m].source && combos.some((c) => roles(c.direction).dst === m));
  return streamed ? sweepLayerMajor(models, input, combos, patchFor, s) : sweepPerLayer(models, input, combos, patchFor, s);
}

/**
 * sweepBatch layer-major: every patched run of a model goes through the layers together, each run joining at
 * its layer, a few runs per layer call (throughLayer); then through the head, as many at once as its logits
 * allow. Each layer's weights (and the head) are read once per batch instead of once per patched run, which is
 * what a streamed model needs, and the gains are those of one resumed forward per combo (sweepPerLayer). Each
 * run's residual is its own tensor, freed as soon as its layer call has used it, so the runs' residuals are held
 * about once, not twice.
 */
export function sweepLayerMajor(models: ModelPair, input: SweepInput, combos: Combo[], patchFor: (c: Combo, ci: number) => Patch, s: RunSettings): number[][] {
  const out: number[][] = combos.map(() => []);
  for (const dst of ["base", "tuned"] as const) {
    const mine = combos.map((c, ci) => ({ c, ci })).filter(({ c }) => roles(c.direction).dst === dst);
    if (!mine.length) continue;
    const model = models[dst];
    const L = model.config.numLayers;
    const dstCache = cacheOf(input, dst, mine[0]!.c);
    // a run's tensors are made when it joins (at its layer)
    const enter = ({ c, ci }: { c: Combo; ci: number }): Stream => {
      const site = hookName(c.site, c.layer);
      const hDst = dstCache.get(site);
      const value = patchFor(c, ci)(hDst, input.caches[roles(c.direction).src]?.get(site) ?? hDst, input.patchMask);
      if (c.site === "resid_post") return { ci, start: c.layer + 1, resid: value };
      if (c.site === "resid_pre") return { ci, start: c.layer, resid: value };
      return { ci, start: c.layer, resid: tf.clone(dstCache.get(hookName("resid_pre", c.layer))), hook: { site, value } };
    };
    const startOf = (c: Combo) => (c.site === "resid_post" ? c.layer + 1 : c.layer);
    let running: Stream[] = [];
    let joining: Stream[] = [];
    let resids: tf.Tensor[] = []; // running[k]'s residual before the current layer
    try {
      for (let l = 0; l <= L; l++) {
        joining = [];
        for (const m of mine.filter(({ c }) => startOf(c) === l)) joining.push(enter(m));
        running = [...running, ...joining];
        resids = [...resids, ...joining.map((st) => st.resid)];
        if (!running.length || l === L) continue;
        resids = throughLayer(model, input.batch, l, running, joining, resids);
        for (const st of joining) st.hook?.value.dispose();
        joining = [];
      }
      // the head, for as many runs at a time as its logits allow
      const P = input.batch.pairs.length;
      const G = headGroup(model.config, input.batch);
      for (let g = 0; g < running.length; g += G) {
        const group = running.slice(g, g + G);
        const rows = repeatBatch(input.batch, group.length);
        const resid = joinRuns(resids, g, group.length);
        let m: Float64Array;
        try {
          const r = forward(model, rows.ids, { ...pairedInput(rows), start: { layer: L, resid }, logitsAt: rows.logitsAt, targets: rows.targets });
          m = marginsOf(rowLogprobs(r.logprobs!, rows, s.perToken));
          r.dispose();
        } finally {
          resid.dispose();
        }
        group.forEach((st, k) => {
          const c = combos[st.ci]!;
          out[st.ci] = Array.from(m.subarray(k * P, (k + 1) * P), (v, i) => gainOf(c.direction, v, input.margin.base[i]!, input.margin.tuned[i]!));
        });
      }
    } finally {
      tf.dispose(resids); // disposing twice is a no-op
      for (const st of joining) tf.dispose([st.resid, ...(st.hook ? [st.hook.value] : [])]); // after a failure mid-layer
    }
  }
  return out;
}

/** Runs g … g+n−1's residuals as one tensor, which the caller frees; their own tensors are freed when joined. */
function joinRuns(resids: tf.Tensor[], g: number, n: number): tf.Tensor {
  if (n === 1) return resids[g]!;
  const joined = tf.concat(resids.slice(g, g + n));
  tf.dispose(resids.slice(g, g + n));
  return joined;
}

/**
 * The running streams' residuals after layer l (`joining` entered at l), a stackGroup of streams per call so
 * the layer's activations stay bounded; each input is freed once its call has used it (on failure too). The
 * layer's weights are brought in once and serve every call.
 */
function throughLayer(model: LlamaModel, batch: PairBatch, l: number, running: Stream[], joining: Stream[], resids: tf.Tensor[]): tf.Tensor[] {
  const R = batch.ids.length;
  const G = stackGroup(model.config, batch);
  const site = hookName("resid_post", l);
  const out: tf.Tensor[] = [];
  try {
    for (let g = 0; g < running.length; g += G) {
      const group = running.slice(g, g + G);
      const hooks: Record<string, Hook> = {};
      for (const st of joining) {
        const at = group.indexOf(st);
        if (!st.hook || at < 0) continue;
        const prev = hooks[st.hook.site];
        const value = st.hook.value;
        // replace this run's rows of the site, keep every other run's
        hooks[st.hook.site] = (v, name) => {
          const base = prev ? prev(v, name) : v;
          return tf.concat([tf.slice(base, [0, 0, 0], [at * R, -1, -1]), value, tf.slice(base, [(at + 1) * R, 0, 0], [-1, -1, -1])].filter((t) => t.shape[0]! > 0));
        };
      }
      const rows = repeatBatch(batch, group.length);
      const resid = joinRuns(resids, g, group.length);
      let h: tf.Tensor;
      try {
        const r = forward(model, rows.ids, { ...pairedInput(rows), start: { layer: l, resid }, stopAfter: l, cache: [site], hooks, logitsAt: "none" });
        h = r.cache.take(site);
        r.dispose();
      } finally {
        resid.dispose();
      }
      if (group.length === 1) out.push(h);
      else {
        out.push(...tf.split(h, group.length));
        h.dispose();
      }
    }
  } catch (e) {
    tf.dispose(out);
    throw e;
  } finally {
    tf.dispose(resids);
  }
  return out;
}
