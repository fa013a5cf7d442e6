// Unpatched runs: a model's margins on pairs in one call, and a residual stream at a layer.
import type * as tf from "@tensorflow/tfjs-core";
import { makeBatch, marginsOf, pairedInput, rowLogprobs, type PairBatch } from "../data/batch.js";
import type { Pair } from "../data/pairs.js";
import { hookName } from "../model/hooks.js";
import { forward, type ForwardResult, type Hooks, type LlamaModel } from "../model/llama.js";
import { DEFAULT_LIMITS, type Limits } from "./limits.js";

/** Per-pair margins of a forward run with the batch's logitsAt and targets (see scored()). */
export const marginsOfRun = (r: ForwardResult, batch: PairBatch, perToken = false): Float64Array =>
  marginsOf(rowLogprobs(r.logprobs!, batch, perToken));

/** The forward options that score a batch's responses: packed pairs, the response positions and their tokens. */
export const scored = (batch: PairBatch, limits: Limits = DEFAULT_LIMITS) => ({
  ...pairedInput(batch),
  logitsAt: batch.logitsAt,
  targets: batch.targets,
  headBlock: limits.head,
});

export interface MarginOptions {
  /** Hooks applied to every forward pass (an ablation, a steering vector). */
  hooks?: Hooks;
  /** Margins from mean per-token log-probabilities instead of sums. */
  perToken?: boolean;
  /** Pairs per forward (4); the numbers do not depend on it. */
  batchPairs?: number;
  limits?: Limits;
}

/** The pairs of a list or of a batch (a batch is scored again in batches of batchPairs, to the same numbers). */
const pairsOf = (pairs: Pair[] | PairBatch): Pair[] => (Array.isArray(pairs) ? pairs : pairs.pairs);

/**
 * Per pair, log p(chosen | prompt) (entry 2i) and log p(rejected | prompt) (entry 2i + 1) under `model`, summed
 * over the response tokens (or their mean with perToken).
 */
export function responseLogprobsOf(
  model: LlamaModel,
  batchOrPairs: Pair[] | PairBatch,
  opts: MarginOptions = {},
): Float64Array {
  const pairs = pairsOf(batchOrPairs);
  const out = new Float64Array(2 * pairs.length);
  const size = opts.batchPairs ?? 4;
  if (!(Number.isInteger(size) && size >= 1))
    throw new RangeError(`batchPairs must be a positive integer, got ${size}`);
  for (let i = 0; i < pairs.length; i += size) {
    const batch = makeBatch(pairs.slice(i, i + size));
    const r = forward(model, batch.ids, { ...scored(batch, opts.limits), hooks: opts.hooks });
    out.set(rowLogprobs(r.logprobs!, batch, opts.perToken ?? false), 2 * i);
    r.dispose();
  }
  return out;
}

/**
 * Margins log p(chosen | prompt) − log p(rejected | prompt) of each pair (or each pair of a batch) under `model`,
 * in pair order: `margins(model, loadPairs(file, tokenizerFolder))`. (Text pairs: io/margins.ts.)
 */
export const margins = (model: LlamaModel, pairs: Pair[] | PairBatch, opts: MarginOptions = {}): Float64Array =>
  marginsOf(responseLogprobsOf(model, pairs, opts));

/** A model's blocks.{layer}.hook_resid_post on a batch (the forward stops there); the caller owns it. */
export function residAfter(model: LlamaModel, batch: PairBatch, layer: number): tf.Tensor {
  const site = hookName("resid_post", layer);
  const r = forward(model, batch.ids, { ...pairedInput(batch), stopAfter: layer, cache: [site], logitsAt: "none" });
  const h = r.cache.take(site);
  r.dispose();
  return h;
}
