// DPO tuning: the loss at the start is log 2, gradients match finite differences, only the selected weights
// move, a --rank 1 update has rank 1, and real rank-1 training at one layer localizes exactly there.
import * as tf from "@tensorflow/tfjs-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadModelSync } from "../src/io/model.js";
import { weightRefs, withWeights } from "../src/model/weights.js";
import { loadTokenizer } from "../src/io/tokenizer.js";
import { readPairs, tokenizePairs } from "../src/io/pairs.js";
import type { Pair } from "../src/data/pairs.js";
import { disposeModel, type LlamaModel } from "../src/model/llama.js";
import { enableGradients } from "../src/model/gradients.js";
import { DEFAULT_TUNE, evaluatePairs, selectWeights, tuneDPO } from "../src/train/dpo.js";
import { runAnalysis } from "../src/analysis/run.js";
import { DEFAULT_SETTINGS } from "../src/analysis/settings.js";
import { makeBatch, responseLogprobs } from "../src/data/batch.js";
import { forward } from "../src/model/llama.js";
import { useBackend } from "./helpers.js";

useBackend();

let base: LlamaModel;
let train: Pair[];
let test: Pair[];
beforeAll(async () => {
  await enableGradients();
  base = loadModelSync("fixtures/models/stories260k");
  const tok = loadTokenizer("fixtures/models/stories260k")!;
  train = tokenizePairs(readPairs("fixtures/data/stories/train.jsonl").pairs, tok, 512, { limit: 24 }).pairs;
  test = tokenizePairs(readPairs("fixtures/data/stories/test.jsonl").pairs, tok, 512, { limit: 12 }).pairs;
});
afterAll(() => disposeModel(base));

/** Sum of chosen-minus-rejected log-probs of the model on pairs, computed without autodiff. */
function marginSum(m: LlamaModel, pairs: Pair[]): number {
  const batch = makeBatch(pairs);
  const { logits } = forward(m, batch.ids, { lengths: batch.lengths, logitsAt: batch.logitsAt });
  const lp = responseLogprobs(logits!, batch, false);
  logits!.dispose();
  let s = 0;
  for (let i = 0; i < pairs.length; i++) s += lp[2 * i]! - lp[2 * i + 1]!;
  return s;
}

describe("DPO", () => {
  it("selects weights by substring or whole-name glob (the tricky cases: test/tune.test.ts)", () => {
    expect(selectWeights(base, ["layers.2.mlp.down_proj"]).map((w) => w.name)).toEqual([
      "model.layers.2.mlp.down_proj.weight",
    ]);
    expect(selectWeights(base, ["model.layers.*.mlp.up_proj.weight"]).map((w) => w.name)).toHaveLength(5);
    expect(selectWeights(base, ["*"]).length).toBe(weightRefs(base).length);
    expect(() => selectWeights(base, ["nope"])).toThrow(/matches no weight/);
  });

  it("the gradient of the margin matches central finite differences", () => {
    const name = "model.layers.3.mlp.down_proj.weight";
    const W0 = weightRefs(base).find((w) => w.name === name)!.tensor;
    const W = tf.variable(W0);
    const pairs = train.slice(0, 2);
    const batch = makeBatch(pairs);
    const f = () =>
      tf.tidy(() => {
        const m = withWeights(base, new Map([[name, W]]));
        const { logits } = forward(m, batch.ids, { lengths: batch.lengths, logitsAt: batch.logitsAt });
        const tokenLp = tf.sum(tf.mul(tf.logSoftmax(logits!), tf.oneHot(tf.tensor1d(batch.targets, "int32"), 512)), -1);
        const sign = tf.tensor1d(batch.rowOf.map((r) => (r % 2 === 0 ? 1 : -1)));
        return tf.sum(tf.mul(tokenLp, sign)) as tf.Scalar;
      });
    const { value, grads } = tf.variableGrads(f, [W]);
    expect(value.dataSync()[0]).toBeCloseTo(marginSum(base, pairs), 3);
    const g = grads[W.name]!.arraySync() as number[][];
    const w0 = W0.arraySync() as number[][];
    for (const [i, j] of [
      [0, 0],
      [17, 5],
      [100, 63],
      [171, 30],
    ] as Array<[number, number]>) {
      const h = 2e-2;
      const at = (d: number) => {
        const w = w0.map((r) => r.slice());
        w[i]![j]! += d;
        const m = withWeights(base, new Map([[name, tf.tensor2d(w)]]));
        const v = marginSum(m, pairs);
        m.layers[3]!.down.dispose();
        return v;
      };
      const fd = (at(h) - at(-h)) / (2 * h);
      expect(
        Math.abs(fd - g[i]![j]!),
        `(${i}, ${j}): autodiff ${g[i]![j]} vs finite difference ${fd}`,
      ).toBeLessThanOrEqual(0.02 * Math.max(1, Math.abs(fd)));
    }
    tf.dispose([value, grads[W.name]!, W]);
  });

  it("starts at loss log 2, lowers the loss, and moves only the selected weight, by a rank-1 update", async () => {
    const res = await tuneDPO(base, train.slice(0, 12), {
      ...DEFAULT_TUNE,
      train: ["layers.2.mlp.down_proj"],
      rank: 1,
      epochs: 2,
      lr: 2e-2,
      seed: 1,
    });
    expect(res.history[0]!.loss).toBeCloseTo(Math.log(2), 4); // policy = reference at step 1
    expect(res.history[res.history.length - 1]!.loss).toBeLessThan(res.history[0]!.loss);
    expect(res.trained).toEqual(["model.layers.2.mlp.down_proj.weight"]);
    const before = weightRefs(base);
    const after = weightRefs(res.model);
    before.forEach((w, i) => {
      const same = tf.tidy(() => tf.max(tf.abs(tf.sub(w.tensor, after[i]!.tensor))).dataSync()[0]!);
      if (w.name === "model.layers.2.mlp.down_proj.weight") expect(same).toBeGreaterThan(1e-4);
      else expect(same, w.name).toBe(0);
    });
    // ΔW = a bᵀ: every 2×2 minor vanishes relative to the entries' scale
    const d = tf.tidy(
      () =>
        tf
          .sub(
            after[before.findIndex((w) => w.name.includes("layers.2.mlp.down"))]!.tensor,
            before.find((w) => w.name.includes("layers.2.mlp.down"))!.tensor,
          )
          .arraySync() as number[][],
    );
    const scale = Math.max(...d.flat().map(Math.abs)) ** 2;
    for (const [i, j, k, l] of [
      [0, 1, 0, 1],
      [5, 50, 3, 60],
      [10, 171, 2, 40],
    ] as const) {
      expect(Math.abs(d[i]![k]! * d[j]![l]! - d[i]![l]! * d[j]![k]!)).toBeLessThan(1e-5 * scale);
    }
    // seed 0 reproduces the same low-rank initialization, hence the same trained weight
    const again = await tuneDPO(base, train.slice(0, 4), {
      ...DEFAULT_TUNE,
      train: ["layers.2.mlp.down_proj"],
      rank: 1,
      epochs: 1,
      lr: 2e-2,
      seed: 0,
    });
    const twice = await tuneDPO(base, train.slice(0, 4), {
      ...DEFAULT_TUNE,
      train: ["layers.2.mlp.down_proj"],
      rank: 1,
      epochs: 1,
      lr: 2e-2,
      seed: 0,
    });
    expect(Array.from(twice.ownTensors[0]!.dataSync())).toEqual(Array.from(again.ownTensors[0]!.dataSync()));
    tf.dispose([...again.ownTensors, ...twice.ownTensors]);
    const ev = evaluatePairs(base, res.model, test);
    expect(ev.meanMarginTuned).toBeGreaterThan(ev.meanMarginBase);
    tf.dispose(res.ownTensors);
  });

  it("real rank-1 training at layer K localizes at K: gains 0 before, = gap from K on; PCA at K is rank 1", async () => {
    const K = 3;
    const res = await tuneDPO(base, train.slice(0, 12), {
      ...DEFAULT_TUNE,
      train: [`layers.${K}.mlp.down_proj`],
      rank: 1,
      epochs: 2,
      lr: 2e-2,
      seed: 2,
    });
    const r = await runAnalysis(base, res.model, test, {
      ...DEFAULT_SETTINGS,
      bootstrap: 100,
      stabilityReps: 2,
      batchPairs: 6,
      controls: false,
    });
    const gaps = r.pairs.map((p) => p.gap);
    expect(r.summary.mean_gap).toBeGreaterThan(0.05);
    for (const e of r.patching) {
      e.gains.forEach((g, i) => {
        if (e.layer < K) expect(Math.abs(g)).toBeLessThanOrEqual(1e-4);
        else expect(Math.abs(g - gaps[i]!)).toBeLessThanOrEqual(1e-4);
      });
    }
    expect(r.pca!.layer).toBe(K);
    expect(r.pca!.explained_variance_ratio[0]).toBeGreaterThan(0.999);
    expect(r.pca!.recovery.find((x) => x.k === 1)!.recovery).toBeGreaterThanOrEqual(0.95);
    tf.dispose(res.ownTensors);
  });
});
