// Direct Preference Optimization (Rafailov et al. 2023) on tfjs with autodiff:
//   loss = −log σ(β [(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))]), π_ref = the starting model.
// Trainable weights are chosen by name pattern; with a rank r each trained matrix learns a low-rank update
// (α/r)·A·B (LoRA-style: A random, B zero) that is merged into the weight when the model is returned. Everything
// a reader needs to reproduce a run is in docs/tune.md.
import picomatch from "picomatch";
import * as tf from "@tensorflow/tfjs-core";
import type { Pair } from "../data/pairs.js";
import { makeBatch, marginsOf, responseLogprobs, tokenLogprobs, type PairBatch } from "../data/batch.js";
import { enableGradients } from "../model/gradients.js";
import { forward, type LlamaModel } from "../model/llama.js";
import { margins, responseLogprobsOf } from "../engine/margins.js";
import { weightRefs, withWeights, type WeightRef } from "../model/weights.js";
import { permutation, seededRandom, tfSeed } from "../stats/stats.js";

/** Learning-rate schedules after the warm-up (as Hugging Face transformers' get_*_schedule_with_warmup). */
export const SCHEDULES = ["constant", "linear", "cosine"] as const;
export type Schedule = (typeof SCHEDULES)[number];

/** DPO settings. */
export interface TuneSettings {
  beta: number; // DPO β (TRL's `beta`); the loss is TRL's loss_type "sigmoid"
  lr: number; // peak learning rate
  epochs: number;
  batchPairs: number;
  /**
   * Weight name patterns (selectWeights): a pattern with *, ? or [...] is a glob that must match a weight's whole
   * Hugging Face name; any other pattern selects the weights whose name contains it.
   */
  train: string[];
  rank: number | null; // low-rank update per trained matrix; null = full update
  loraAlpha: number | null; // the update is (loraAlpha / rank)·A·B; null = rank (a scale of 1)
  seed: number;
  adamBeta1: number;
  adamBeta2: number;
  adamEpsilon: number; // added to √v̂ (tfjs's Adam; PyTorch's default is 1e-8)
  warmupSteps: number; // learning rate ramped linearly from 0 over these steps
  schedule: Schedule;
}

export const DEFAULT_TUNE: TuneSettings = {
  beta: 0.1,
  lr: 1e-3,
  epochs: 3,
  batchPairs: 8,
  train: ["*"],
  rank: null,
  loraAlpha: null,
  seed: 0,
  adamBeta1: 0.9,
  adamBeta2: 0.999,
  adamEpsilon: 1e-7,
  warmupSteps: 0,
  schedule: "constant",
};

/** Metrics of one optimizer step, on its batch, before its update. */
export interface StepMetrics {
  step: number;
  epoch: number;
  lr: number; // the learning rate this step's update used
  loss: number; // mean over the batch's pairs of −log σ(β·h)
  /**
   * Share of the batch's pairs with β·h > 0, among those whose h is above float32 noise (noiseFloor); null when
   * none is (at step 1 the policy is the reference, so every h is rounding).
   */
  rewardAccuracy: number | null;
  rewardMargin: number; // mean β·h, h = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))
  atNoiseFloor: number; // pairs whose |h| is within float32 noise of the log-probabilities
}

/** An error in the tune settings, named as the CLI spells them. */
export class TuneError extends Error {
  override name = "TuneError";
}

/** Whether a --train pattern is a glob (matched against a whole name) rather than a substring. */
export const isGlob = (pattern: string): boolean => /[*?[\]]/.test(pattern);

/**
 * The weights a list of patterns selects, in the model's order. A glob (*, ?, [...]) must match a weight's whole
 * Hugging Face name (e.g. model.layers.*.mlp.down_proj.weight); any other pattern selects the weights whose name
 * contains it (norm: every norm; layers.1.mlp: layer 1's MLP, not layer 11's). Every pattern must select at least
 * one weight, else TuneError names it.
 */
export function selectWeights(model: LlamaModel, patterns: string[]): WeightRef[] {
  const refs = weightRefs(model);
  if (patterns.length === 0) throw new TuneError("train needs at least one pattern");
  const tests = patterns.map((p) => {
    const test = isGlob(p)
      ? picomatch(p, { dot: true, nobrace: true, noextglob: true })
      : (name: string) => name.includes(p);
    if (!refs.some((w) => test(w.name))) {
      const how = isGlob(p) ? "a glob must match a whole name" : "no weight's name contains it";
      throw new TuneError(
        `train pattern "${p}" matches no weight of the model (${how}; names look like ${refs.find((w) => w.name.includes("layers.0."))?.name ?? refs[0]?.name})`,
      );
    }
    return test;
  });
  return refs.filter((w) => tests.some((t) => t(w.name)));
}

/**
 * |h| at or below this is float32 rounding, not a preference: the policy and reference log-probabilities of a
 * response come from two float32 passes whose sums over tokens carry ~1e-7 relative error each, so h, a difference
 * of four of them, is noise within 8·2⁻²³·(|log π_ref(c)| + |log π_ref(r)|).
 */
export const noiseFloor = (refChosen: number, refRejected: number): number =>
  8 * 2 ** -23 * (Math.abs(refChosen) + Math.abs(refRejected));

/** The learning rate of step `step` (1-based) of `total`: warm-up from 0, then the schedule (transformers' formulas). */
export function learningRate(
  s: Pick<TuneSettings, "lr" | "warmupSteps" | "schedule">,
  step: number,
  total: number,
): number {
  const done = step - 1; // steps before this one
  if (done < s.warmupSteps) return (s.lr * done) / Math.max(1, s.warmupSteps);
  if (s.schedule === "constant") return s.lr;
  const progress = (done - s.warmupSteps) / Math.max(1, total - s.warmupSteps);
  return s.schedule === "linear" ? s.lr * Math.max(0, 1 - progress) : s.lr * 0.5 * (1 + Math.cos(Math.PI * progress));
}

/** Per-row response log-probabilities, differentiably (sums over response tokens, as a row-assignment matmul). */
function rowLogprobs(model: LlamaModel, batch: PairBatch): tf.Tensor1D {
  const { logits } = forward(model, batch.ids, { lengths: batch.lengths, logitsAt: batch.logitsAt });
  const N = batch.targets.length;
  const rows = batch.ids.length;
  const assign = new Float32Array(rows * N);
  batch.rowOf.forEach((r, i) => (assign[r * N + i] = 1));
  return tf.reshape(tf.matMul(tf.tensor2d(assign, [rows, N]), tf.reshape(tokenLogprobs(logits!, batch), [-1, 1])), [
    rows,
  ]) as tf.Tensor1D;
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
  if (s.rank !== null) {
    for (const w of selected) {
      if (w.tensor.rank !== 2) continue;
      const most = Math.min(...w.tensor.shape);
      if (s.rank > most)
        throw new TuneError(
          `rank ${s.rank} is more than ${w.name} can take: a rank-r update of a [${w.matrix ? [w.tensor.shape[1], w.tensor.shape[0]] : w.tensor.shape}] matrix needs r ≤ ${most}`,
        );
    }
  }
  const ref = referenceLogprobs(model, pairs, s.batchPairs);
  const rand = seededRandom(s.seed);
  // Trainable variables: the weight itself, or low-rank factors A [in, r], B [r, out] for matrices.
  const full = new Map<string, tf.Variable>();
  const lowRank = new Map<string, { base: tf.Tensor; A: tf.Variable; B: tf.Variable }>();
  for (const [i, w] of selected.entries()) {
    if (s.rank !== null && w.tensor.rank === 2) {
      const [inDim, outDim] = w.matrix ? w.tensor.shape : [w.tensor.shape[1]!, w.tensor.shape[0]!];
      const r = s.rank;
      const A = tf.variable(
        tf.randomNormal([inDim!, r], 0, 1 / Math.sqrt(inDim!), "float32", tfSeed(s.seed, i)),
        true,
        `A_${i}`,
      );
      const B = tf.variable(tf.zeros([r, outDim!]), true, `B_${i}`);
      lowRank.set(w.name, { base: w.tensor, A, B });
    } else full.set(w.name, tf.variable(w.tensor, true, `W_${i}`));
  }
  /** Current weights in the model's layout (an embedding stays [vocab, hidden]: its update is transposed). */
  const scale = s.rank === null ? 1 : (s.loraAlpha ?? s.rank) / s.rank;
  const current = () => {
    const m = new Map<string, tf.Tensor>(full);
    for (const [name, { base, A, B }] of lowRank) {
      const delta = scale === 1 ? tf.matMul(A, B) : tf.mul(tf.matMul(A, B), scale);
      m.set(name, tf.add(base, base.shape[0] === delta.shape[0] ? delta : tf.transpose(delta)));
    }
    return m;
  };
  const optimizer = tf.train.adam(learningRate(s, 1, 1), s.adamBeta1, s.adamBeta2, s.adamEpsilon);
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
      const lr = learningRate(s, step + 1, steps);
      (optimizer as unknown as { learningRate: number }).learningRate = lr;
      let z: tf.Tensor | null = null;
      const loss = optimizer.minimize(
        () => {
          const lp = rowLogprobs(withWeights(model, current()), batch);
          const even = tf.tensor1d(
            bp.map((_, j) => 2 * j),
            "int32",
          );
          const odd = tf.tensor1d(
            bp.map((_, j) => 2 * j + 1),
            "int32",
          );
          const logits = tf.mul(tf.sub(tf.sub(tf.gather(lp, even), refC), tf.sub(tf.gather(lp, odd), refR)), s.beta);
          z = tf.keep(tf.clone(logits));
          return tf.mean(tf.softplus(tf.neg(logits))) as tf.Scalar;
        },
        true,
        varList,
      )!;
      const zs = Array.from(z!.dataSync() as Float32Array);
      const above = zs.filter((v, j) => Math.abs(v) > s.beta * noiseFloor(...ref.get(bp[j]!.index)!));
      const m: StepMetrics = {
        step: ++step,
        epoch,
        lr,
        loss: loss.dataSync()[0]!,
        rewardAccuracy: above.length ? above.filter((v) => v > 0).length / above.length : null,
        rewardMargin: zs.reduce((a, b) => a + b, 0) / zs.length,
        atNoiseFloor: zs.length - above.length,
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

/**
 * Mean margins, and DPO's reward accuracy: the share of pairs whose margin the tuned model raised, among those
 * whose margin moved by more than float32 noise (noiseFloor of the base log-probabilities; null when none did).
 */
export function evaluatePairs(base: LlamaModel, tuned: LlamaModel, pairs: Pair[], batchPairs = 8) {
  // through the engine's scored path, as every analysis margin
  const lb = responseLogprobsOf(base, pairs, { batchPairs });
  const b = Array.from(marginsOf(lb));
  const t = Array.from(margins(tuned, pairs, { batchPairs }));
  const mean = (x: number[]) => x.reduce((a, v) => a + v, 0) / x.length;
  const moved = t.map((v, i) => Math.abs(v - b[i]!) > noiseFloor(lb[2 * i]!, lb[2 * i + 1]!));
  const counted = moved.filter(Boolean).length;
  return {
    pairs: pairs.length,
    meanMarginBase: mean(b),
    meanMarginTuned: mean(t),
    rewardAccuracy: counted ? t.filter((v, i) => moved[i] && v > b[i]!).length / counted : null,
    atNoiseFloor: pairs.length - counted,
    tunedPrefersChosen: t.filter((v) => v > 0).length / t.length,
    basePrefersChosen: b.filter((v) => v > 0).length / b.length,
  };
}
