// Activation patching from code, in the manner of TransformerLens's patching utilities and nnsight: run a
// source (the "clean" input) and a destination (the "corrupted" input), then rerun the destination with one or
// more sites, at chosen positions and heads, taking the source's values, and read the same metric of the logits
// in every run. The patched runs are the engine's named runs (engine/runs.ts): each enters at the first layer it
// changes with the destination's own residual there, and the engine stacks them within its memory limits, as it
// does the analysis's sweeps. The metric is the caller's: a function of the logits (or of chosen tokens'
// log-probabilities) at the positions it names.
import * as tf from "@tensorflow/tfjs-core";
import { makeBatch, marginsOf, rowLogprobs } from "../data/batch.js";
import type { Pair } from "../data/pairs.js";
import { hookName, isHookName, type ActivationCache, type HookName } from "../model/hooks.js";
import { forward, type ForwardResult, type Hook, type LlamaModel } from "../model/llama.js";
import { DEFAULT_LIMITS, type Limits } from "./limits.js";
import { runValues, type Run, type RunInput } from "./runs.js";

/** Token ids: one sequence, or several rows of any lengths (right-padded inside, each with its own length). */
export type Tokens = number[] | number[][];

/** A position a metric reads: a position of row 0, or [row, position]. */
export type Position = number | [number, number];

/** What a metric is computed from, at each of its positions in order. */
export interface MetricInput {
  /** Without `targets`: the logits there, vocabulary-size float32 arrays (null with targets). */
  logits: Float32Array[] | null;
  /** With `targets`: log p(targets[i]) at position i (float64, through the analysis's scored head; else null). */
  logprobs: Float64Array | null;
}

/** A number read from a run's logits: which positions, and what it is of them. */
export interface Metric {
  /** The positions whose next-token logits it reads. */
  at: Position[];
  /** One token per position: only their log-probabilities are computed (no [positions, vocabulary] logits). */
  targets?: number[];
  value(x: MetricInput): number;
}

/** One site a patched run takes from the source. */
export interface PatchSite {
  /** The hook whose value is replaced: blocks.3.hook_resid_post, blocks.2.attn.hook_z, hook_embed … (hookName). */
  hook: HookName | string;
  /** The destination's positions that take the source's value; every position when left out. */
  positions?: number[];
  /** The source position each of `positions` takes its value from; `positions` themselves when left out. */
  sourcePositions?: number[];
  /** Only these heads, on a site with a heads axis (attn.hook_q/k/v/z, hook_rot_q/k, hook_attn_scores, hook_pattern). */
  heads?: number[];
}

/** Where the patched values come from. */
export interface PatchSource {
  ids: Tokens;
  /** Its activations from forward(…, { cache }) on these ids, holding every patched hook; stays the caller's. */
  cache?: ActivationCache;
  /** The model it runs on (the patched model when left out): a model of the same shapes patches across models. */
  model?: LlamaModel;
}

export interface PatchSpec {
  source: Tokens | PatchSource;
  dest: Tokens;
  /** One patched run per entry; an array of sites is one run patching all of them. */
  sites: Array<PatchSite | PatchSite[]>;
  metric: Metric;
  /** The metric on the source run, when its positions differ there (a source of another length). */
  sourceMetric?: Metric;
  limits?: Limits;
}

/** The metric of the source run, of the destination run, and of each patched run in `sites` order. */
export interface PatchResult {
  source: number;
  dest: number;
  patched: number[];
}

/** Right-padded rows with their lengths. */
interface Rows {
  ids: number[][];
  lengths: number[];
  T: number;
}

/** One site of a patched run, checked: where its value keeps positions and heads, and what moves where. */
interface SitePlan {
  hook: HookName;
  posAxis: number;
  headAxis: number | null;
  positions: number[];
  from: number[];
  heads: number[] | null;
}

/** A patched run: its sites, and the layer it enters (the first it changes). */
interface RunPlan {
  sites: SitePlan[];
  layer: number;
}

/** A site's value [B, T, heads, d] (q, k, v, z, rot_q, rot_k) or [B, heads, Tq, Tk] (scores, pattern); else [B, T, …]. */
function siteAxes(hook: HookName): { posAxis: number; headAxis: number | null } {
  const kind = hook.slice(hook.lastIndexOf(".") + 1);
  if (!hook.includes(".attn.")) return { posAxis: 1, headAxis: null };
  if (kind === "hook_attn_scores" || kind === "hook_pattern") return { posAxis: 2, headAxis: 1 }; // query positions
  return { posAxis: 1, headAxis: 2 };
}

/** The layer a run changing `hook` enters: its own block's (the embedding's: 0; the final norm's: past the last). */
function entryLayer(hook: HookName, numLayers: number): number {
  const layer = /^blocks\.(\d+)\./.exec(hook)?.[1];
  if (layer !== undefined) return Number(layer);
  return hook.startsWith("ln_final.") ? numLayers : 0;
}

function tokenRows(t: Tokens, what: string): Rows {
  const ids = (t.length > 0 && Array.isArray(t[0]) ? t : [t]) as number[][];
  if (ids.length === 0 || ids.some((r) => !Array.isArray(r) || r.length === 0))
    throw new RangeError(`${what} needs at least one token in every row`);
  const T = Math.max(...ids.map((r) => r.length));
  return {
    ids: ids.map((r) => [...r, ...new Array<number>(T - r.length).fill(0)]),
    lengths: ids.map((r) => r.length),
    T,
  };
}

const sameLengths = (a: Rows, b: Rows) => a.T === b.T && a.lengths.every((n, i) => n === b.lengths[i]);

/** Non-repeating integers in [0, n), or a one-line error naming `what`. */
function indices(xs: number[], n: number, what: string): number[] {
  for (const x of xs)
    if (!(Number.isInteger(x) && x >= 0 && x < n)) throw new RangeError(`${what} ${x} is outside 0..${n - 1}`);
  if (new Set(xs).size !== xs.length) throw new RangeError(`${what}s repeat: [${xs.join(", ")}]`);
  return xs;
}

/** A site of a patched run, checked against the model and both inputs. */
function sitePlan(site: PatchSite, dest: Rows, src: Rows, numLayers: number): SitePlan {
  const hook = site.hook;
  const layer = /^blocks\.(\d+)\./.exec(hook)?.[1];
  if (!isHookName(hook) || (layer !== undefined && Number(layer) >= numLayers))
    throw new RangeError(`unknown hook site "${hook}" (see hookNames(config))`);
  const { posAxis, headAxis } = siteAxes(hook);
  if (site.heads && headAxis === null) throw new RangeError(`${hook} has no heads to choose from`);
  if (site.sourcePositions && !site.positions) throw new RangeError(`${hook}: sourcePositions need positions`);
  if (!site.sourcePositions && !sameLengths(dest, src))
    throw new RangeError(
      `the source and the destination differ in length, so ${hook} needs positions and sourcePositions (where each destination position's value comes from)`,
    );
  const positions = indices(site.positions ?? [...dest.ids[0]!.keys()], dest.T, `${hook}: position`);
  const from = site.sourcePositions ?? positions;
  if (from.length !== positions.length)
    throw new RangeError(`${hook}: ${positions.length} positions but ${from.length} sourcePositions`);
  for (const p of from)
    if (!(Number.isInteger(p) && p >= 0 && p < src.T))
      throw new RangeError(`${hook}: source position ${p} is outside 0..${src.T - 1}`);
  // heads are checked against the value's own heads axis when it is patched (k and v have the kv heads)
  const heads = site.heads ? indices(site.heads, Number.MAX_SAFE_INTEGER, `${hook}: head`) : null;
  return { hook, posAxis, headAxis, positions, from, heads };
}

/**
 * `dest` with the plan's positions (and heads) taken from `src`: src's positions moved to where they go, then
 * chosen element by element (tf.where), so a patched entry is the source's value exactly.
 */
function replaceAt(dest: tf.Tensor, src: tf.Tensor, p: SitePlan): tf.Tensor {
  return tf.tidy(() => {
    const T = dest.shape[p.posAxis]!;
    const fromIdx = new Int32Array(T); // unpatched positions take position 0: the mask drops them
    p.positions.forEach((t, i) => (fromIdx[t] = p.from[i]!));
    const moved = tf.gather(src, tf.tensor1d(fromIdx, "int32"), p.posAxis);
    if (!tf.util.arraysEqual(moved.shape, dest.shape))
      throw new Error(
        `the source's ${p.hook} is [${src.shape}], which does not fit the destination's [${dest.shape}] at the positions patched`,
      );
    const shape = dest.shape.map(() => 1);
    shape[p.posAxis] = T;
    const nHeads = p.headAxis === null ? 1 : dest.shape[p.headAxis]!;
    if (p.headAxis !== null) shape[p.headAxis] = nHeads;
    for (const h of p.heads ?? [])
      if (h >= nHeads) throw new RangeError(`${p.hook}: head ${h} is outside 0..${nHeads - 1}`);
    const mask = new Uint8Array(T * nHeads); // [T, heads] or [heads, T], by which axis comes first
    const first = p.headAxis !== null && p.headAxis < p.posAxis;
    for (const t of p.positions)
      for (let h = 0; h < nHeads; h++)
        if (!p.heads || p.heads.includes(h)) mask[first ? h * T + t : t * nHeads + h] = 1;
    return tf.where(tf.tensor(mask, shape, "bool"), moved, dest);
  });
}

/** The metric's positions as [row, position] within the rows, or a one-line error naming `what`. */
function metricAt(m: Metric, rows: Rows, what: string): Array<[number, number]> {
  if (!Array.isArray(m.at) || m.at.length === 0) throw new RangeError(`${what} reads no positions`);
  if (m.targets && m.targets.length !== m.at.length)
    throw new RangeError(`${what} has ${m.targets.length} targets for ${m.at.length} positions`);
  return m.at.map((a) => {
    const [r, t] = typeof a === "number" ? [0, a] : a;
    if (!(Number.isInteger(r) && r >= 0 && r < rows.ids.length))
      throw new RangeError(`${what} reads row ${r}, but there are ${rows.ids.length}`);
    if (!(Number.isInteger(t) && t >= 0 && t < rows.lengths[r]!))
      throw new RangeError(`${what} reads position ${t} of row ${r}, which has ${rows.lengths[r]} tokens`);
    return [r, t];
  });
}

/** Each copy's metric from a forward over `copies` stacked copies of rows read at N positions each. */
function readMetric(metric: Metric, r: ForwardResult, copies: number, N: number): number[] {
  const all = r.logprobs ? null : (r.logits!.dataSync() as Float32Array);
  const V = r.logits?.shape[1] ?? 0;
  return Array.from({ length: copies }, (_, k) => {
    const x: MetricInput = r.logprobs
      ? { logits: null, logprobs: r.logprobs.slice(k * N, (k + 1) * N) }
      : {
          logits: Array.from({ length: N }, (_, i) => all!.slice((k * N + i) * V, (k * N + i + 1) * V)),
          logprobs: null,
        };
    const v = metric.value(x);
    if (typeof v !== "number") throw new TypeError(`the metric returned ${typeof v}, not a number`);
    return v;
  });
}

/** The rows read out as the metric, for the engine: copy k's rows and positions after copy k − 1's. */
function metricInput(rows: Rows, at: Array<[number, number]>, metric: Metric): RunInput<number> {
  const R = rows.ids.length;
  const repeat = <T>(xs: T[], n: number): T[] => Array.from({ length: n }, () => xs).flat();
  return {
    rows: R,
    T: rows.T,
    stack: (copies) => ({
      ids: repeat(rows.ids, copies),
      rows: { lengths: repeat(rows.lengths, copies) },
      head: {
        logitsAt: Array.from({ length: copies }, (_, k) => at.map(([r, t]): [number, number] => [r + k * R, t])).flat(),
        targets: metric.targets && repeat(metric.targets, copies),
      },
      read: (r) => readMetric(metric, r, copies, at.length),
    }),
  };
}

/** One unpatched run: the metric, and the sites asked for, cached (the caller frees the cache). */
function plainRun(
  model: LlamaModel,
  rows: Rows,
  at: Array<[number, number]>,
  metric: Metric,
  cache: HookName[],
  limits: Limits,
): { value: number; cache: ActivationCache } {
  const s = metricInput(rows, at, metric).stack(1);
  const r = forward(model, s.ids, { ...s.rows, ...s.head, headBlock: limits.head, cache });
  try {
    const value = s.read(r)[0]!;
    r.logits?.dispose();
    return { value, cache: r.cache };
  } catch (e) {
    r.dispose();
    throw e;
  }
}

/** The engine's runs for the plans: each enters at its layer with the destination's residual there. */
function patchedRuns(plans: RunPlan[], destCache: ActivationCache, srcCache: ActivationCache, L: number): Run[] {
  const entry = (l: number) => destCache.get(l < L ? hookName("resid_pre", l) : hookName("resid_post", L - 1));
  return plans.map((plan, k): Run => {
    const embed = plan.sites.filter((s) => s.hook === "hook_embed");
    const hooks: Record<string, Hook> = {};
    for (const hook of new Set(plan.sites.map((s) => s.hook).filter((h) => h !== "hook_embed"))) {
      const mine = plan.sites.filter((s) => s.hook === hook);
      // sites of one hook in one run apply in the order given
      hooks[hook] = (v) => mine.reduce((x, s) => replaceAt(x, srcCache.get(hook), s), v);
    }
    // a run entering past hook_embed starts from the patched embedding itself (== blocks.0.hook_resid_pre)
    const resid = embed.length
      ? () => tf.tidy(() => embed.reduce((x, s) => replaceAt(x, srcCache.get("hook_embed"), s), entry(0)))
      : entry(plan.layer);
    return { name: String(k), layer: plan.layer, resid, hooks };
  });
}

/** The source: its rows, the model it runs on, and its cache when the caller has one. */
function sourceOf(
  source: Tokens | PatchSource,
  model: LlamaModel,
): { rows: Rows; model: LlamaModel; cache?: ActivationCache } {
  const s: PatchSource = Array.isArray(source) ? { ids: source } : source;
  return { rows: tokenRows(s.ids, "the source"), model: s.model ?? model, cache: s.cache };
}

/**
 * Patches sites from a source run into a destination run of `model` and reads `metric` in each: the source run,
 * the destination run, and one patched run per entry of `sites` (all of an array's sites at once). Source and
 * destination must be the same length (every row) unless every site gives both positions and sourcePositions.
 * Every tensor made is freed, also when a site, a hook or the metric fails.
 */
export function patch(model: LlamaModel, spec: PatchSpec): PatchResult {
  const L = model.config.numLayers;
  const dest = tokenRows(spec.dest, "the destination");
  const src = sourceOf(spec.source, model);
  if (src.rows.ids.length !== dest.ids.length)
    throw new RangeError(`the source has ${src.rows.ids.length} rows and the destination ${dest.ids.length}`);
  const plans = spec.sites.map((g): RunPlan => {
    const sites = (Array.isArray(g) ? g : [g]).map((s) => sitePlan(s, dest, src.rows, L));
    return { sites, layer: Math.min(L, ...sites.map((s) => entryLayer(s.hook, L))) };
  });
  const at = metricAt(spec.metric, dest, "the metric");
  const srcMetric = spec.sourceMetric ?? spec.metric;
  const srcAt = metricAt(srcMetric, src.rows, spec.sourceMetric ? "the source metric" : "the metric (on the source)");
  const limits = spec.limits ?? DEFAULT_LIMITS;
  const needed = [...new Set(plans.flatMap((p) => p.sites.map((s) => s.hook)))];
  for (const h of needed)
    if (src.cache && !src.cache.has(h)) throw new Error(`the source's cache has no ${h}, which is patched`);
  const s = plainRun(src.model, src.rows, srcAt, srcMetric, src.cache ? [] : needed, limits);
  try {
    const entries = [
      ...new Set(plans.map((p) => (p.layer < L ? hookName("resid_pre", p.layer) : hookName("resid_post", L - 1)))),
    ];
    const d = plainRun(model, dest, at, spec.metric, entries, limits);
    try {
      const runs = patchedRuns(plans, d.cache, src.cache ?? s.cache, L);
      const values = runValues(model, metricInput(dest, at, spec.metric), runs, { limits });
      return { source: s.value, dest: d.value, patched: runs.map((r) => values.get(r.name)!) };
    } finally {
      d.cache.dispose();
    }
  } finally {
    s.cache.dispose();
  }
}

/** A per-layer site by its short name, as hookName takes it: resid_pre, attn_out, z, pattern, post … */
export type SweepSite = Parameters<typeof hookName>[0];

export interface SweepSpec extends Omit<PatchSpec, "sites"> {
  site: SweepSite;
  /** The layers swept (every layer when left out). */
  layers?: number[];
  /**
   * "layer" (default): each layer's site at every position (or `positions`); "position": each layer at each
   * position on its own; "head": each layer's heads one at a time, at every position (or `positions`).
   */
  by?: "layer" | "position" | "head";
  /** The destination positions patched (by "position": swept); every position when left out. */
  positions?: number[];
  /** Where in the source each of `positions` comes from (needed when the lengths differ). */
  sourcePositions?: number[];
  /** by "head": the heads swept (every head of the site when left out). */
  heads?: number[];
}

/** A sweep's table: values[i][j] is the metric with layers[i]'s site patched at column j (a position or a head). */
export interface SweepTable {
  hooks: HookName[];
  layers: number[];
  /** The positions or heads of the columns (null by layer: one column, the whole site). */
  columns: number[] | null;
  values: number[][];
  source: number;
  dest: number;
}

/** How many heads a per-head site has: key-value heads for k, v and rot_k, query heads otherwise. */
function headsOf(model: LlamaModel, hook: HookName): number {
  if (siteAxes(hook).headAxis === null) throw new RangeError(`${hook} has no heads to sweep`);
  return /\.attn\.hook_(k|v|rot_k)$/.test(hook) ? model.config.numKvHeads : model.config.numHeads;
}

/**
 * Patches one site kind layer by layer, TransformerLens-style: each layer alone, each (layer, position) or each
 * (layer, head), all through one patch() call (so the engine stacks the runs). Each entry is the number the
 * single patch gives, whichever other layers the sweep covers.
 */
export function patchSweep(model: LlamaModel, spec: SweepSpec): SweepTable {
  const L = model.config.numLayers;
  const layers = indices(spec.layers ?? [...Array(L).keys()], L, "layer");
  const hooks = layers.map((l) => hookName(spec.site, l));
  const by = spec.by ?? "layer";
  const where = { positions: spec.positions, sourcePositions: spec.sourcePositions };
  let columns: number[] | null = null;
  let sitesAt: (hook: HookName, j: number) => PatchSite = (hook) => ({ hook, ...where });
  if (by === "position") {
    const dest = tokenRows(spec.dest, "the destination");
    columns = spec.positions ?? [...dest.ids[0]!.keys()];
    const from = spec.sourcePositions ?? columns;
    sitesAt = (hook, j) => ({
      hook,
      positions: [columns![j]!],
      ...(spec.sourcePositions ? { sourcePositions: [from[j]!] } : {}),
    });
  } else if (by === "head") {
    columns = spec.heads ?? [...Array(headsOf(model, hooks[0] ?? hookName(spec.site, 0))).keys()];
    sitesAt = (hook, j) => ({ hook, ...where, heads: [columns![j]!] });
  } else if (by !== "layer") throw new RangeError(`by must be "layer", "position" or "head", got "${String(by)}"`);
  const width = columns?.length ?? 1;
  const sites = hooks.flatMap((hook) => Array.from({ length: width }, (_, j) => sitesAt(hook, j)));
  const r = patch(model, { ...spec, sites });
  const values = layers.map((_, i) => r.patched.slice(i * width, (i + 1) * width));
  return { hooks, layers, columns, values, source: r.source, dest: r.dest };
}

/** The logit difference logit(a) − logit(b) at a position (TransformerLens's usual metric). */
export function logitDiff(a: number, b: number, position: Position): Metric {
  return {
    at: [position],
    value: ({ logits }) => {
      const z = logits![0]!;
      for (const t of [a, b])
        if (!(Number.isInteger(t) && t >= 0 && t < z.length))
          throw new RangeError(`logitDiff: token ${t} is outside the vocabulary [0, ${z.length})`);
      return z[a]! - z[b]!;
    },
  };
}

/** log p(token) at a position: the next-token log-probability of `token` after the prefix up to `position`. */
export const tokenLogprob = (token: number, position: Position): Metric => ({
  at: [position],
  targets: [token],
  value: ({ logprobs }) => logprobs![0]!,
});

/**
 * A pair's margin log p(chosen | prompt) − log p(rejected | prompt), as margins() computes it: for rows
 * [prompt + chosen, prompt + rejected] (the destination's, or the source's as sourceMetric).
 */
export function pairMargin(pair: Pick<Pair, "promptIds" | "chosenIds" | "rejectedIds">, perToken = false): Metric {
  const batch = makeBatch([{ index: 0, line: 0, ...pair }]);
  return {
    at: batch.logitsAt,
    targets: batch.targets,
    value: ({ logprobs }) => marginsOf(rowLogprobs(logprobs!, batch, perToken))[0]!,
  };
}
