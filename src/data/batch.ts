// A batch of preference pairs as model input: rows (chosen, rejected) per pair, right-padded, with the logit
// positions that score each response token, and response log-probabilities / margins from those logits.
import * as tf from "@tensorflow/tfjs-core";
import { readValues } from "../model/read.js";
import type { Pair } from "./pairs.js";

/** Model input for a batch of pairs: row 2i is pair i's chosen sequence, row 2i+1 its rejected one. */
export interface PairBatch {
  pairs: Pair[];
  ids: number[][]; // [2b][T], right-padded with 0
  lengths: number[];
  respStart: number[]; // per row: position of the first response token
  /** Logit positions [row, pos−1] whose next-token distribution scores response token ids[row][pos]. */
  logitsAt: Array<[number, number]>;
  targets: number[]; // the token id scored at each logitsAt entry
  rowOf: number[]; // the row of each logitsAt entry
  prompts: number[]; // per pair (rows 2i, 2i+1): the prompt length both rows begin with
  T: number;
}

/** forward's row options for a batch: lengths, and the shared prompts so each pair's prompt is computed once. */
export const pairedInput = (batch: PairBatch): { lengths: number[]; pairedPrompts: number[] } => ({
  lengths: batch.lengths,
  pairedPrompts: batch.prompts,
});

/** Builds the padded batch for a list of pairs. */
export function makeBatch(pairs: Pair[]): PairBatch {
  const seqs: Array<{ ids: number[]; start: number }> = [];
  for (const p of pairs) {
    seqs.push({ ids: [...p.promptIds, ...p.chosenIds], start: p.promptIds.length });
    seqs.push({ ids: [...p.promptIds, ...p.rejectedIds], start: p.promptIds.length });
  }
  const T = Math.max(...seqs.map((s) => s.ids.length));
  const logitsAt: Array<[number, number]> = [];
  const targets: number[] = [];
  const rowOf: number[] = [];
  seqs.forEach((s, row) => {
    for (let pos = s.start; pos < s.ids.length; pos++) {
      logitsAt.push([row, pos - 1]);
      targets.push(s.ids[pos]!);
      rowOf.push(row);
    }
  });
  return {
    pairs,
    ids: seqs.map((s) => [...s.ids, ...new Array<number>(T - s.ids.length).fill(0)]),
    lengths: seqs.map((s) => s.ids.length),
    respStart: seqs.map((s) => s.start),
    logitsAt,
    targets,
    rowOf,
    prompts: pairs.map((p) => p.promptIds.length),
    T,
  };
}

/**
 * log p(target) at each of batch.logitsAt from logits [N, V] → [N]. Differentiable (a gather along axis 0
 * of the flattened log-softmax), so training scores responses with the same code as the analysis.
 */
export function tokenLogprobs(logits: tf.Tensor, batch: PairBatch): tf.Tensor1D {
  return tf.tidy(() => {
    const V = logits.shape[1]!;
    const flat = tf.reshape(tf.logSoftmax(logits, -1), [-1]);
    return tf.gather(
      flat,
      tf.tensor1d(
        batch.targets.map((t, i) => i * V + t),
        "int32",
      ),
    ) as tf.Tensor1D;
  });
}

/** Per-row response log-probability (sum, or mean with perToken) from logits [N, V] at batch.logitsAt. */
export function responseLogprobs(logits: tf.Tensor, batch: PairBatch, perToken: boolean): Float64Array {
  return rowLogprobs(
    readValues(() => tokenLogprobs(logits, batch)),
    batch,
    perToken,
  );
}

/** Per-row response log-probability (sum, or mean with perToken) from log p(target) at each of batch.logitsAt (forward's `logprobs`). */
export function rowLogprobs(lp: ArrayLike<number>, batch: PairBatch, perToken: boolean): Float64Array {
  const rows = batch.ids.length;
  const sum = new Float64Array(rows);
  const count = new Float64Array(rows);
  batch.rowOf.forEach((r, i) => {
    sum[r]! += lp[i]!;
    count[r]!++;
  });
  return perToken ? sum.map((s, r) => s / count[r]!) : sum;
}

/** Margins logp(chosen) − logp(rejected) per pair from per-row log-probabilities. */
export function marginsOf(rowLogprobs: Float64Array): Float64Array {
  return Float64Array.from({ length: rowLogprobs.length / 2 }, (_, i) => rowLogprobs[2 * i]! - rowLogprobs[2 * i + 1]!);
}

/** Mask [B, T, 1]: 1 at response positions (respStart ≤ t < length) or, with which = "all", at every valid position. */
export function positionMask(batch: PairBatch, which: "all" | "response"): tf.Tensor3D {
  const B = batch.ids.length;
  const m = new Float32Array(B * batch.T);
  for (let r = 0; r < B; r++)
    for (let t = which === "all" ? 0 : batch.respStart[r]!; t < batch.lengths[r]!; t++) m[r * batch.T + t] = 1;
  return tf.tensor3d(m, [B, batch.T, 1]);
}

/** The batch repeated `copies` times along the rows (copy k's rows follow copy k−1's), for running several streams at once. */
export function repeatBatch(batch: PairBatch, copies: number): PairBatch {
  const R = batch.ids.length;
  const rep = <T>(xs: T[]) => Array.from({ length: copies }, () => xs).flat();
  return {
    pairs: rep(batch.pairs),
    ids: rep(batch.ids),
    lengths: rep(batch.lengths),
    respStart: rep(batch.respStart),
    logitsAt: Array.from({ length: copies }, (_, k) =>
      batch.logitsAt.map(([r, t]): [number, number] => [r + k * R, t]),
    ).flat(),
    targets: rep(batch.targets),
    rowOf: Array.from({ length: copies }, (_, k) => batch.rowOf.map((r) => r + k * R)).flat(),
    prompts: rep(batch.prompts),
    T: batch.T,
  };
}
