// The intervention engine: named patched runs of one model on one set of rows, each read out as a value — the
// margins of a batch of pairs (runMargins, what the analysis uses) or a caller's metric of the logits at chosen
// positions (engine/patch.ts). A run says where it enters (a residual at a layer) and what it changes on the way
// (hooks on its own rows); the engine decides how to execute them: runs entering at the same layer stacked along
// the rows a few at a time on a resident model, or layer-major on a streamed one (every run goes through a layer
// before the next layer is brought in, so each layer and head chunk is read once for all of them). Every strategy
// gives the same values (to the float32 rounding of another row count on a row-position-dependent kernel); tests
// run all three.
import * as tf from "@tensorflow/tfjs-core";
import { pairedInput, repeatBatch, type PairBatch } from "../data/batch.js";
import { hookName, type HookName } from "../model/hooks.js";
import {
  forward,
  type ForwardOptions,
  type ForwardResult,
  type Hook,
  type Hooks,
  type LlamaModel,
} from "../model/llama.js";
import { DEFAULT_LIMITS, headGroup, stackGroup, type Limits } from "./limits.js";
import { marginsOfRun } from "./margins.js";

/** One patched run of a model on a batch. */
export interface Run {
  /** What the caller calls it; its margins come back under this name. */
  name: string;
  /** The layer it enters (numLayers: straight to the final norm and head). */
  layer: number;
  /**
   * The residual it enters `layer` with [rows, T, H] (blocks.{layer}.hook_resid_pre). A tensor stays the
   * caller's; a function is called when the run starts and its tensor is the engine's to free.
   */
  resid: tf.Tensor | (() => tf.Tensor);
  /** Hooks on this run's own rows [rows, ...], applied as it goes through the layers it runs. */
  hooks?: Hooks;
}

/** How runs go through the model: "auto" picks layer-major for a streamed model, else stacked. */
export type Strategy = "auto" | "per-run" | "stacked" | "layer-major";

export interface RunOptions {
  /** Memory policy (DEFAULT_LIMITS when left out). */
  limits?: Limits;
  /** Margins from mean per-token log-probabilities instead of sums. */
  perToken?: boolean;
  /** At most this many runs at once, whatever the limits allow (runs whose entries are costly to hold). */
  maxGroup?: number;
  strategy?: Strategy;
}

/**
 * What runs run on and what each one is read out as. The engine stacks one copy of the rows per run (copy k's
 * rows after copy k − 1's) and asks for the copies' values from the head pass of the stack.
 */
export interface RunInput<V> {
  /** Rows one run has, and their padded length. */
  rows: number;
  T: number;
  /** `copies` copies of the rows stacked. */
  stack(copies: number): StackedInput<V>;
}

/** A stack of copies of a RunInput's rows: forward's input and head options, and each copy's value. */
export interface StackedInput<V> {
  ids: number[][];
  /** forward's row options: lengths, and pairedPrompts for packed pairs. */
  rows: Pick<ForwardOptions, "lengths" | "pairedPrompts">;
  /** forward's head options: where logits are taken and (for log-probabilities only) which tokens are scored. */
  head: Pick<ForwardOptions, "logitsAt" | "targets">;
  /** Each copy's value, in copy order, from the stack's forward result (which the engine frees). */
  read(r: ForwardResult): V[];
}

/** A batch of pairs read out as each pair's margin: scored response positions, packed prompts. */
export function marginInput(batch: PairBatch, perToken: boolean): RunInput<Float64Array> {
  const P = batch.pairs.length;
  return {
    rows: batch.ids.length,
    T: batch.T,
    stack: (copies) => {
      const rows = repeatBatch(batch, copies);
      return {
        ids: rows.ids,
        rows: pairedInput(rows),
        head: { logitsAt: rows.logitsAt, targets: rows.targets },
        read: (r) => {
          const m = marginsOfRun(r, rows, perToken);
          return Array.from({ length: copies }, (_, k) => m.slice(k * P, (k + 1) * P));
        },
      };
    },
  };
}

/** A started run: its residual before the layer it is at. */
interface Live {
  run: Run;
  resid: tf.Tensor | null;
}

/**
 * Margins log p(chosen | prompt) − log p(rejected | prompt) of every pair of `batch` under each run, by name.
 * The numbers do not depend on the strategy, the limits or which other runs share the call.
 */
export function runMargins(
  model: LlamaModel,
  batch: PairBatch,
  runs: Run[],
  opts: RunOptions = {},
): Map<string, Float64Array> {
  return runValues(model, marginInput(batch, opts.perToken ?? false), runs, opts);
}

/**
 * Each run's value on `input`, by name: runMargins for any read-out. The values do not depend on the strategy,
 * the limits or which other runs share the call (to float32 rounding on a row-position-dependent kernel).
 */
export function runValues<V>(
  model: LlamaModel,
  input: RunInput<V>,
  runs: Run[],
  opts: Omit<RunOptions, "perToken"> = {},
): Map<string, V> {
  const L = model.config.numLayers;
  const names = new Set<string>();
  for (const r of runs) {
    if (names.has(r.name)) throw new Error(`two runs are named "${r.name}"`);
    names.add(r.name);
    if (!(Number.isInteger(r.layer) && r.layer >= 0 && r.layer <= L))
      throw new RangeError(`run "${r.name}" enters layer ${r.layer}, outside 0..${L}`);
  }
  const out = new Map<string, V>();
  const strategy = opts.strategy && opts.strategy !== "auto" ? opts.strategy : model.source ? "layer-major" : "stacked";
  const o: Ctx<V> = { input, limits: opts.limits ?? DEFAULT_LIMITS, maxGroup: opts.maxGroup ?? Infinity, out };
  if (strategy === "layer-major") layerMajor(model, runs, o);
  else stacked(model, runs, strategy === "per-run" ? 1 : Infinity, o);
  return out;
}

interface Ctx<V> {
  input: RunInput<V>;
  limits: Limits;
  maxGroup: number;
  out: Map<string, V>;
}

/** A run's entry residual, the engine's own (a caller's tensor is cloned: its data is shared, not copied). */
const enter = (run: Run): tf.Tensor => (typeof run.resid === "function" ? run.resid() : tf.clone(run.resid));

/** The runs started (each one's entry residual made), or none of them if one fails. */
function start(runs: Run[]): Live[] {
  const live: Live[] = [];
  try {
    for (const run of runs) live.push({ run, resid: enter(run) });
  } catch (e) {
    tf.dispose(live.map((x) => x.resid!));
    throw e;
  }
  return live;
}

/** The residuals of `live` joined along the rows (the caller frees the result); theirs are freed and cleared. */
function join(live: Live[]): tf.Tensor {
  const parts = live.map((x) => x.resid!);
  for (const x of live) x.resid = null;
  if (parts.length === 1) return parts[0]!;
  const joined = tf.concat(parts);
  tf.dispose(parts);
  return joined;
}

/**
 * The hooks of runs stacked along the rows, `rows` rows each: a site's value is cut into the runs' rows, each
 * run's hook (if it has one there) applied to its own, and the pieces joined again.
 */
function stackedHooks(runs: Run[], rows: number): Record<string, Hook> {
  if (runs.length === 1) return { ...runs[0]!.hooks } as Record<string, Hook>;
  const out: Record<string, Hook> = {};
  for (const site of new Set(runs.flatMap((r) => Object.keys(r.hooks ?? {}) as HookName[]))) {
    out[site] = (v, name) => {
      const parts = runs.map((r, k) => {
        const mine = tf.slice(v, [k * rows], [rows]);
        const hook = r.hooks?.[site];
        if (!hook) return mine;
        const v2 = hook(mine, name);
        if (!tf.util.arraysEqual(v2.shape, mine.shape))
          throw new Error(`hook for ${name} of run "${r.name}" returned shape [${v2.shape}], expected [${mine.shape}]`);
        return v2;
      });
      return tf.concat(parts);
    };
  }
  return out;
}

/** Runs `group` (stacked, entering `layer` with `resid`) to the end and records each one's value. */
function finish<V>(model: LlamaModel, group: Run[], layer: number, resid: tf.Tensor, o: Ctx<V>): void {
  const s = o.input.stack(group.length);
  const r = forward(model, s.ids, {
    ...s.rows,
    ...s.head,
    headBlock: o.limits.head,
    start: { layer, resid },
    hooks: stackedHooks(group, o.input.rows),
  });
  try {
    const values = s.read(r);
    group.forEach((run, k) => o.out.set(run.name, values[k]!));
  } finally {
    r.dispose(); // a read-out that throws (a caller's metric) frees the logits too
  }
}

/**
 * Runs entering the same layer go through it and every layer above stacked, as many per forward as one layer
 * call's activations and the head pass allow (and at most `cap`): one forward per group, resumed at its layer.
 */
function stacked<V>(model: LlamaModel, runs: Run[], cap: number, o: Ctx<V>): void {
  const { numLayers: L } = model.config;
  const { rows: R, T } = o.input;
  const byLayer = new Map<number, Run[]>();
  for (const r of runs) byLayer.set(r.layer, [...(byLayer.get(r.layer) ?? []), r]);
  for (const [layer, group] of byLayer) {
    const fit = headGroup(model.config, R, T, o.limits);
    const G = Math.min(cap, o.maxGroup, layer < L ? Math.min(fit, stackGroup(model.config, R, T, o.limits)) : fit);
    for (let g = 0; g < group.length; g += G) {
      const part = group.slice(g, g + G);
      const resid = join(start(part));
      try {
        finish(model, part, layer, resid, o);
      } finally {
        resid.dispose();
      }
    }
  }
}

/**
 * Layer-major, in waves of as many runs as limits.stackBytes holds residuals for: each run of a wave joins at its
 * layer, every layer is run for all the wave's runs (a stackGroup of them per call), then the head (a headGroup
 * at a time). Each run's residual is its own tensor, freed once its layer call has used it.
 */
function layerMajor<V>(model: LlamaModel, runs: Run[], o: Ctx<V>): void {
  const { numLayers: L, hiddenSize: H } = model.config;
  const { rows: R, T } = o.input;
  const G = Math.min(o.maxGroup, stackGroup(model.config, R, T, o.limits));
  const Gh = Math.min(o.maxGroup, headGroup(model.config, R, T, o.limits));
  const wave = Math.max(G, Gh, Math.floor(o.limits.stackBytes / (4 * R * T * H)));
  for (let w = 0; w < runs.length; w += wave) {
    const order = runs.slice(w, w + wave).sort((a, b) => a.layer - b.layer); // stable: runs of a layer keep their order
    const live: Live[] = [];
    try {
      let next = 0;
      for (let l = order[0]!.layer; l < L; l++) {
        while (next < order.length && order[next]!.layer === l)
          live.push({ run: order[next]!, resid: enter(order[next++]!) });
        throughLayer(model, l, live, G, o);
      }
      while (next < order.length) live.push({ run: order[next]!, resid: enter(order[next++]!) });
      for (let g = 0; g < live.length; g += Gh) {
        const part = live.slice(g, g + Gh);
        const resid = join(part);
        try {
          finish(
            model,
            part.map((x) => x.run),
            L,
            resid,
            o,
          ); // hooks at the final norm, if any
        } finally {
          resid.dispose();
        }
      }
    } finally {
      tf.dispose(live.flatMap((x) => (x.resid ? [x.resid] : []))); // after a failure
    }
  }
}

/** Every live run's residual through layer l, G runs per call; each input is freed once its call has used it. */
function throughLayer<V>(model: LlamaModel, l: number, live: Live[], G: number, o: Ctx<V>): void {
  const R = o.input.rows;
  const site = hookName("resid_post", l);
  for (let g = 0; g < live.length; g += G) {
    const part = live.slice(g, g + G);
    const rows = o.input.stack(part.length);
    const hooks = stackedHooks(
      part.map((x) => x.run),
      R,
    );
    const resid = join(part);
    let h: tf.Tensor;
    try {
      const r = forward(model, rows.ids, {
        ...rows.rows,
        start: { layer: l, resid },
        stopAfter: l,
        cache: [site],
        hooks,
        logitsAt: "none",
        headBlock: o.limits.head,
      });
      h = r.cache.take(site);
      r.dispose();
    } finally {
      resid.dispose();
    }
    if (part.length === 1) part[0]!.resid = h;
    else {
      tf.split(h, part.length).forEach((piece, k) => (part[k]!.resid = piece));
      h.dispose();
    }
  }
}
