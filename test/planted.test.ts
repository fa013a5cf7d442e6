// The analysis on a planted pair: the tuned model equals stories260k except a rank-r change inside one layer's
// mlp.down_proj, so the right answers are known exactly.
import * as tf from "@tensorflow/tfjs-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadModelSync } from "../src/io/model.js";
import { loadTokenizer } from "../src/io/tokenizer.js";
import { tokenizePairs } from "../src/io/pairs.js";
import type { Pair } from "../src/data/pairs.js";
import { disposeModel, forward, type LlamaModel } from "../src/model/llama.js";
import { runAnalysis } from "../src/analysis/run.js";
import { DEFAULT_SETTINGS } from "../src/analysis/settings.js";
import { type Results } from "../src/analysis/schema.js";
import { NATIVE_TOLERANCE, onNative, useBackend } from "./helpers.js";

useBackend();

const K = 2;
const RANK = 2;
let base: LlamaModel;
let tuned: LlamaModel;
let pairs: Pair[];
let res: Results;

/** tuned = base with down_proj of layer K plus Σ_i s_i v_i u_iᵀ (stored [in, out]). */
function plant(m: LlamaModel): LlamaModel {
  const [I, H] = m.layers[K]!.down.shape;
  const delta = tf.tidy(() => {
    const terms = Array.from({ length: RANK }, (_, i) => {
      const v = tf.tensor2d(
        Array.from({ length: I }, (_, j) => Math.cos(0.7 * j + i)),
        [I, 1],
      );
      const u = tf.tensor2d(
        Array.from({ length: H }, (_, j) => Math.sin(1.3 * j + 2 * i)),
        [1, H],
      );
      return tf.mul(tf.matMul(v, u), 0.4 / (i + 1));
    });
    return tf.addN(terms);
  });
  const down = tf.add(m.layers[K]!.down, delta) as tf.Tensor2D;
  delta.dispose();
  return { ...m, layers: m.layers.map((p, l) => (l === K ? { ...p, down } : p)) };
}

const names = ["Lily", "Tom", "Ben", "Mia", "Sam", "Anna"];
const things = ["a little dog", "a red ball", "a sad bird", "a new friend"];

beforeAll(async () => {
  base = loadModelSync("fixtures/models/stories260k");
  tuned = plant(base);
  const tok = loadTokenizer("fixtures/models/stories260k")!;
  const raw = Array.from({ length: 14 }, (_, i) => {
    const n = names[i % names.length]!;
    const t = things[i % things.length]!;
    return {
      line: i + 1,
      prompt: `Once upon a time, ${n} saw ${t}.`,
      chosen: `${n} smiled and said hello.`,
      rejected: `${n} was angry and went home.`,
    };
  });
  pairs = tokenizePairs(raw, tok, base.config.vocabSize).pairs;
  res = await runAnalysis(base, tuned, pairs, {
    ...DEFAULT_SETTINGS,
    bootstrap: 200,
    stabilityReps: 20,
    batchPairs: 3,
  });
}, 120_000);

afterAll(() => {
  tuned.layers[K]!.down.dispose();
  disposeModel(base);
});

describe("planted rank-r change at one layer", () => {
  it("resid_post gains are 0 before layer K and equal the per-pair gap from K on", () => {
    const gaps = res.pairs.map((p) => p.gap);
    expect(Math.min(...gaps.map(Math.abs))).toBeGreaterThan(1e-3); // the plant actually changes margins
    for (const e of res.patching) {
      expect(e.site).toBe("resid_post");
      e.gains.forEach((g, i) => {
        if (e.layer < K) expect(Math.abs(g), `layer ${e.layer} pair ${i}`).toBeLessThanOrEqual(1e-4);
        else expect(Math.abs(g - gaps[i]!), `layer ${e.layer} pair ${i}`).toBeLessThanOrEqual(1e-4);
      });
      expect(e.recovery).toBeCloseTo(e.layer < K ? 0 : 1, 4);
    }
  });

  it("PCA at layer K is rank r and the k = r patch recovers ≥ 99% of the held-out gap", () => {
    expect(res.pca!.layer).toBe(K);
    const ev = res.pca!.explained_variance_ratio;
    expect(ev.slice(0, RANK).reduce((a, b) => a + b, 0)).toBeGreaterThanOrEqual(0.999);
    expect(ev.slice(0, RANK - 1).reduce((a, b) => a + b, 0)).toBeLessThan(0.999); // and not rank r − 1
    const atR = res.pca!.recovery.find((x) => x.k === RANK)!;
    expect(atR.recovery).toBeGreaterThanOrEqual(0.99);
    expect(Math.abs(atR.random_subspace)).toBeLessThan(0.5);
    expect(new Set([...res.pca!.train_pairs, ...res.pca!.test_pairs]).size).toBe(pairs.length);
  });

  it("margins agree with the forward pass's own log-probabilities", () => {
    for (const rec of res.pairs) {
      const p = pairs[rec.index]!;
      for (const [name, m] of [
        ["base", base],
        ["tuned", tuned],
      ] as const) {
        const lp = (resp: number[]) => {
          const ids = [...p.promptIds, ...resp];
          const { logits } = forward(m, [ids]);
          const L = (logits!.arraySync() as number[][][])[0]!;
          logits!.dispose();
          let s = 0;
          for (let t = p.promptIds.length; t < ids.length; t++) {
            const row = L[t - 1]!;
            const mx = Math.max(...row);
            const lse = mx + Math.log(row.reduce((a, v) => a + Math.exp(v - mx), 0));
            s += row[ids[t]!]! - lse;
          }
          return s;
        };
        const c = lp(p.chosenIds);
        const r = lp(p.rejectedIds);
        expect(rec.logp[name].chosen).toBeCloseTo(c, 3);
        expect(rec.logp[name].rejected).toBeCloseTo(r, 3);
        expect(rec.margin[name]).toBeCloseTo(c - r, 3);
      }
    }
  });

  it("LASSO gives weight to no layer before K, controls stay small, the logit lens gap appears at K", () => {
    for (let l = 0; l < K; l++) expect(res.lasso!.coef[l]).toBe(0); // distances are exactly 0 there: constant columns
    expect(res.pairs.every((p) => p.distance.slice(0, K).every((d) => d === 0))).toBe(true);
    const lensGap = res.logit_lens.tuned.map((t, i) => t - res.logit_lens.base[i]!);
    for (let i = 0; i <= K; i++) expect(Math.abs(lensGap[i]!)).toBeLessThan(1e-4); // embed … layer K−1
    expect(Math.abs(lensGap[K + 1]!)).toBeGreaterThan(1e-3);
    const atK = res.patching.find((e) => e.layer === K)!;
    expect(Math.abs(atK.controls!.random_direction.recovery)).toBeLessThan(0.9);
    expect(res.probes).toHaveLength(2 * base.config.numLayers);
  });

  it("is deterministic for a seed", async () => {
    const again = await runAnalysis(base, tuned, pairs.slice(0, 6), {
      ...DEFAULT_SETTINGS,
      bootstrap: 100,
      stabilityReps: 5,
      batchPairs: 4,
      seed: 3,
    });
    const twice = await runAnalysis(base, tuned, pairs.slice(0, 6), {
      ...DEFAULT_SETTINGS,
      bootstrap: 100,
      stabilityReps: 5,
      batchPairs: 2,
      seed: 3,
    });
    // other batches change a pair's float32 rounding (a row's padded length, and on the native kernel a row's place
    // in the matmul's tiles), so across batch sizes: equal to 1e-6, or to helpers' NATIVE_TOLERANCE on native
    const tol = onNative() ? NATIVE_TOLERANCE.abs : 1e-6;
    again.patching.forEach((e, i) =>
      e.recovery_ci.forEach((v, j) => expect(Math.abs(twice.patching[i]!.recovery_ci[j]! - v)).toBeLessThan(tol)),
    );
    expect(twice.lasso!.stability).toEqual(again.lasso!.stability);
    expect(twice.pca!.test_pairs).toEqual(again.pca!.test_pairs);
    // with the same batching, the random controls repeat too (seed 0 included: tfjs reads seed 0 as "none")
    const s0 = { ...DEFAULT_SETTINGS, bootstrap: 100, stabilityReps: 2, batchPairs: 3, seed: 0, layers: [K, K + 1] }; // where h_tuned ≠ h_base
    const [r1, r2] = [
      await runAnalysis(base, tuned, pairs.slice(0, 6), s0),
      await runAnalysis(base, tuned, pairs.slice(0, 6), s0),
    ];
    expect(r2.patching.map((e) => e.controls!.random_direction.gains)).toEqual(
      r1.patching.map((e) => e.controls!.random_direction.gains),
    );
    expect(r2.patching.map((e) => e.recovery_ci)).toEqual(r1.patching.map((e) => e.recovery_ci));
  });

  it("every site and both directions give the answers the plant implies", async () => {
    const r = await runAnalysis(base, tuned, pairs.slice(0, 6), {
      ...DEFAULT_SETTINGS,
      sites: ["resid_post", "resid_pre", "attn_out", "mlp_out"],
      directions: ["tuned->base", "base->tuned"],
      bootstrap: 100,
      stabilityReps: 2,
    });
    const gaps = r.pairs.map((p) => p.gap);
    const gainsOf = (direction: string, site: string, layer: number) =>
      r.patching.find((e) => e.direction === direction && e.site === site && e.layer === layer)!.gains;
    const zero = (g: number[]) => g.forEach((v) => expect(Math.abs(v)).toBeLessThanOrEqual(1e-4));
    const full = (g: number[]) => g.forEach((v, i) => expect(Math.abs(v - gaps[i]!)).toBeLessThanOrEqual(1e-4));
    for (const dir of ["tuned->base", "base->tuned"]) {
      for (let l = 0; l < base.config.numLayers; l++) {
        (l < K ? zero : full)(gainsOf(dir, "resid_post", l));
        (l <= K ? zero : full)(gainsOf(dir, "resid_pre", l)); // resid_pre l = resid_post l−1
        if (l <= K) zero(gainsOf(dir, "attn_out", l)); // attention up to K sees identical inputs
        if (l < K) zero(gainsOf(dir, "mlp_out", l));
      }
      full(gainsOf(dir, "mlp_out", K)); // the planted change lives in this MLP's output
    }
  });

  it("works on any slice of the pairs (indices need not start at 0)", async () => {
    const r = await runAnalysis(base, tuned, pairs.slice(5, 13), {
      ...DEFAULT_SETTINGS,
      bootstrap: 100,
      stabilityReps: 2,
    });
    expect(r.pca!.layer).toBe(K);
    expect(r.pca!.recovery.find((x) => x.k === RANK)!.recovery).toBeGreaterThanOrEqual(0.99);
    expect(r.pairs.map((p) => p.index)).toEqual([5, 6, 7, 8, 9, 10, 11, 12]);
  });

  it("leaves no tensors behind, with the low-rank stage at a middle or the last layer", async () => {
    const before = tf.memory().numTensors;
    await runAnalysis(base, tuned, pairs.slice(0, 4), {
      ...DEFAULT_SETTINGS,
      bootstrap: 100,
      stabilityReps: 2,
      sites: ["resid_post", "attn_out", "mlp_out", "resid_pre"],
      directions: ["tuned->base", "base->tuned"],
    });
    expect(tf.memory().numTensors).toBe(before);
    await runAnalysis(base, tuned, pairs.slice(0, 4), {
      ...DEFAULT_SETTINGS,
      bootstrap: 100,
      stabilityReps: 2,
      controls: false,
      pcaLayer: base.config.numLayers - 1,
    });
    expect(tf.memory().numTensors).toBe(before);
  });
});

describe("position masks", () => {
  it("response masks cover exactly the response tokens of each row; all masks every real token", async () => {
    const { makeBatch, positionMask } = await import("../src/data/batch.js");
    const batch = makeBatch([
      { index: 0, line: 1, promptIds: [1, 2, 3], chosenIds: [4, 5], rejectedIds: [6] },
      { index: 1, line: 2, promptIds: [1], chosenIds: [7, 8, 9, 10], rejectedIds: [11, 12] },
    ]);
    expect(batch.T).toBe(5);
    const resp = (positionMask(batch, "response").arraySync() as number[][][]).map((r) => r.map((x) => x[0]));
    const all = (positionMask(batch, "all").arraySync() as number[][][]).map((r) => r.map((x) => x[0]));
    expect(resp).toEqual([
      [0, 0, 0, 1, 1],
      [0, 0, 0, 1, 0],
      [0, 1, 1, 1, 1],
      [0, 1, 1, 0, 0],
    ]);
    expect(all).toEqual([
      [1, 1, 1, 1, 1],
      [1, 1, 1, 1, 0],
      [1, 1, 1, 1, 1],
      [1, 1, 1, 0, 0],
    ]);
    // the logits that score each response token sit one position earlier
    expect(batch.logitsAt.slice(0, 3)).toEqual([
      [0, 2],
      [0, 3],
      [1, 2],
    ]);
    expect(batch.targets.slice(0, 3)).toEqual([4, 5, 6]);
  });
});
