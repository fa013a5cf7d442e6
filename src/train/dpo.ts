// Direct Preference Optimization (Rafailov et al. 2023) on tfjs with autodiff:
//   loss = −log σ(β [(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))]), π_ref = the starting model.
// Trainable weights are chosen by name pattern; with a rank r each trained matrix learns a low-rank update
// A·B (LoRA-style: A random, B zero) that is merged into the weight when the model is returned.
import * as tf from "@tensorflow/tfjs-core";
import type { Pair } from "../data/pairs.js";
import { makeBatch, marginsOf, responseLogprobs, tokenLogprobs, type PairBatch } from "../data/batch.js";
import { enableGradients } from "../model/gradients.js";
import { forward, type LlamaModel } from "../model/llama.js";
import { weightRefs, withWeights, type WeightRef } from "../model/weights.js";
import { permutation, seededRandom, tfSeed } from "../stats/stats.js";

/** DPO settings. */
export interface TuneSettings {
  beta: number;
  lr: number;
  epochs: number;
  batchPairs: number;
  train: string[]; // name patterns: a substring of the HF name, or a glob with *
  rank: number | null; // low-rank update per trained matrix; null = full update
  seed: number;
}

export const DEFAULT_TUNE: TuneSettings = { beta: 0.1, lr: 1e-3, epochs: 3, batchPairs: 8, train: ["*"], rank: null, seed: 0 };

/** Metrics of one optimizer step. */
export interface StepMetrics {
  step: number;
  epoch: number;
  loss: number;
  rewardAccuracy: number; // fraction of pairs with a positive implicit reward margin
  rewardMargin: number; // mean β·(Δ log-ratio chosen − Δ log-ratio rejected)
}

/** The weights a list of patterns selects. */
export function selectWeights(model: LlamaModel, patterns: string[]): WeightRef[] {
  const esc = (x: string) => x.replace(/[.+?^${}()|[\]\\]/g, "\\$&");
  // a glob matches the whole name (model. prefix and .weight/.bias suffix optional); a plain pattern matches
  // whole dot-separated parts, so layers.1.mlp does not also select layers.11.mlp
  const toRegex = (p: string) =>
    new RegExp(p.includes("*") ? `^(model\\.)?${p.split("*").map(esc).join(".*")}(\\.weight|\\.bias)?$` : `(^|\\.)${esc(p)}(\\.|$)`);
  const res = patterns.map(toRegex);
  return weightRefs(model).filter((w) => res.some((r) => r.test(w.name)));
}

/** Per-row response log-probabilities, differentiably (sums over response tokens, as a row-assignment matmul). */
function rowLogprobs(model: LlamaModel, batch: PairBatch): tf.Tensor1D {
  const { logits } = forward(model, batch.ids, { lengths: batch.lengths, logitsAt: batch.logitsAt });
  const N = batch.targets.length;
  const rows = batch.ids.length;
  const assign = new Float32Array(rows * N);
  batch.rowOf.forEach((r, i) => (assign[r * N + i] = 1));
  return tf.reshape(tf.matMul(tf.tensor2d(assign, [rows, N]), tf.reshape(tokenLogprobs(logits!, batch), [-1, 1])), [rows]) as tf.Tensor1D;
}

/** Response log-probabilities of the reference model for each pair: [chosen, rejected]. */
function referenceLogprobs(model: LlamaModel, pairs: Pair[], batchPairs: number): Map<number, [number, number]> {
  const ref = new Map<number, [number, number]>();
  for (let i = 0; i < pairs.length; i += batchPairs) {
    const batch = makeBatch(pairs.slice(i, i + batchPairs));
    const { logits } = forward(model, batch.ids, { lengths: batch.lengths, logitsAt: batch.logitsAt });
    const lp = responseLogprobs(logits!, batch, false);
    logits!.dispose();
    batch.pairs.forEach((p, j) => ref.set(p.index, [lp[2 * j]!, lp[2 * j + 1]!]));
  }
  return ref;
}

/**
 * Trains `model` with DPO on `pairs` and returns a new model with the trained weights merged (the input model
 * is left unchanged; untouched weights are shared with it, so free only `ownTensors`), the names trained, and
 * per-step metrics.
 */
export async function tuneDPO(
  model: LlamaModel,
  pairs: Pair[],
  s: TuneSettings,
  onStep?: (m: StepMetrics, total: number) => void,
): Promise<{ model: LlamaModel; trained: string[]; history: StepMetrics[]; ownTensors: tf.Tensor[] }> {
  await enableGradients();
  const selected = selectWeights(model, s.train);
  if (selected.length === 0) throw new Error(`--train ${s.train.join(",")} matches no weight of the model`);
  const ref = referenceLogprobs(model, pairs, s.batchPairs);
  const rand = seededRandom(s.seed);
  // Trainable variables: the weight itself, or low-rank factors A [in, r], B [r, out] for matrices.
  const full = new Map<string, tf.Variable>();
  const lowRank = new Map<string, { base: tf.Tensor; A: tf.Variable; B: tf.Variable }>();
  for (const [i, w] of selected.entries()) {
    if (s.rank !== null && w.tensor.rank === 2) {
      const [inDim, outDim] = w.matrix ? w.tensor.shape : [w.tensor.shape[1]!, w.tensor.shape[0]!];
      const r = Math.min(s.rank, inDim!, outDim!);
      const A = tf.variable(tf.randomNormal([inDim!, r], 0, 1 / Math.sqrt(inDim!), "float32", tfSeed(s.seed, i)), true, `A_${i}`);
      const B = tf.variable(tf.zeros([r, outDim!]), true, `B_${i}`);
      lowRank.set(w.name, { base: w.tensor, A, B });
    } else full.set(w.name, tf.variable(w.tensor, true, `W_${i}`));
  }
  /** Current weights in the model's layout (an embedding stays [vocab, hidden]: its update is transposed). */
  const current = () => {
    const m = new Map<string, tf.Tensor>(full);
    for (const [name, { base, A, B }] of lowRank) {
      const delta = tf.matMul(A, B);
      m.set(name, tf.add(base, base.shape[0] === delta.shape[0] ? delta : tf.transpose(delta)));
    }
    return m;
  };
  const optimizer = tf.train.adam(s.lr);
  const varList = [...full.values(), ...[...lowRank.values()].flatMap((x) => [x.A, x.B])];
  const steps = Math.ceil(pairs.length / s.batchPairs) * s.epochs;
  const history: StepMetrics[] = [];
  let step = 0;
  for (let epoch = 0; epoch < s.epochs; epoch++) {
    const order = permutation(pairs.length, rand);
    for (let i = 0; i < pairs.length; i += s.batchPairs) {
      const bp = order.slice(i, i + s.batchPairs).map((j) => pairs[j]!);
      const batch = makeBatch(bp);
      const refC = tf.tensor1d(bp.map((p) => ref.get(p.index)![0]));
      const refR = tf.tensor1d(bp.map((p) => ref.get(p.index)![1]));
      let z: tf.Tensor | null = null;
      const loss = optimizer.minimize(() => {
        const lp = rowLogprobs(withWeights(model, current()), batch);
        const even = tf.tensor1d(bp.map((_, j) => 2 * j), "int32");
        const odd = tf.tensor1d(bp.map((_, j) => 2 * j + 1), "int32");
        const logits = tf.mul(tf.sub(tf.sub(tf.gather(lp, even), refC), tf.sub(tf.gather(lp, odd), refR)), s.beta);
        z = tf.keep(tf.clone(logits));
        return tf.mean(tf.softplus(tf.neg(logits))) as tf.Scalar;
      }, true, varList)!;
      const zs = Array.from(z!.dataSync() as Float32Array);
      const m: StepMetrics = {
        step: ++step,
        epoch,
        loss: loss.dataSync()[0]!,
        rewardAccuracy: zs.filter((v) => v > 0).length / zs.length,
        rewardMargin: zs.reduce((a, b) => a + b, 0) / zs.length,
      };
      tf.dispose([loss, z!, refC, refR]);
      history.push(m);
      onStep?.(m, steps);
      await new Promise<void>((r) => setImmediate(r));
    }
  }
  const names = [...full.keys(), ...lowRank.keys()];
  const values = tf.tidy(() => {
    const m = current();
    return names.map((k) => tf.clone(m.get(k)!));
  });
  const merged = new Map(names.map((k, i) => [k, values[i]!]));
  for (const v of varList) v.dispose();
  optimizer.dispose();
  const tuned = withWeights(model, merged);
  const own = tuned.lmHead !== model.lmHead && !merged.has("lm_head.weight") ? [...values, tuned.lmHead] : values;
  return { model: tuned, trained: names, history, ownTensors: own };
}

/** Mean margins and the fraction of pairs whose margin the tuned model raised (DPO's reward accuracy). */
export function evaluatePairs(base: LlamaModel, tuned: LlamaModel, pairs: Pair[], batchPairs = 8) {
  const margins = (m: LlamaModel) => {
    const out: number[] = [];
    for (let i = 0; i < pairs.length; i += batchPairs) {
      const batch = makeBatch(pairs.slice(i, i + batchPairs));
      const { logits } = forward(m, batch.ids, { lengths: batch.lengths, logitsAt: batch.logitsAt });
      out.push(...marginsOf(responseLogprobs(logits!, batch, false)));
      logits!.dispose();
    }
    return out;
  };
  const b = margins(base);
  const t = margins(tuned);
  const mean = (x: number[]) => x.reduce((a, v) => a + v, 0) / x.length;
  return {
    pairs: pairs.length,
    meanMarginBase: mean(b),
    meanMarginTuned: mean(t),
    rewardAccuracy: t.filter((v, i) => v > b[i]!).length / t.length,
    tunedPrefersChosen: t.filter((v) => v > 0).length / t.length,
    basePrefersChosen: b.filter((v) => v > 0).length / b.length,
  };
}
