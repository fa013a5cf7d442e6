// Attribution patching against independent computations: central finite differences of the exact patch
// (d/dα of gain(α) at α = 0 is exactly what attribution estimates), the identities a planted model implies, and
// the exact sweep where the change is small enough to be near-linear.
import * as tf from "@tensorflow/tfjs-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { attributionBatch } from "../src/analysis/attribution.js";
import { interpolate } from "../src/analysis/patches.js";
import { runAnalysis } from "../src/analysis/run.js";
import { gainsByKey, makePlan, scoreBatch, type ModelPair } from "../src/analysis/scoring.js";
import { resolveSettings, type RunSettings } from "../src/analysis/settings.js";
import { sweepBatch, sweepInput } from "../src/analysis/sweep.js";
import type { Pair } from "../src/data/pairs.js";
import { backendCopies, loadModelSync } from "../src/io/model.js";
import { enableGradients } from "../src/model/gradients.js";
import { disposeModel, HEAD_BLOCK, targetLogprobGradient, type LlamaModel } from "../src/model/llama.js";
import { layerBytesOf } from "../src/io/stream.js";
import { DEMO, disposeDemo, loadDemo, useBackend } from "./helpers.js";

useBackend();

let demo: ModelPair & { pairs: Pair[] };
beforeAll(async () => {
  await enableGradients();
  demo = loadDemo(2);
});
afterAll(() => disposeDemo(demo));

const ALL_SITES: Pick<RunSettings, "sites" | "directions"> = {
  sites: ["resid_post", "attn_out", "mlp_out", "resid_pre"],
  directions: ["tuned->base", "base->tuned"],
};

/** Attribution and exact gains at α = ±eps for every combo and pair of one batch. */
function measure(models: ModelPair, pairs: Pair[], s: RunSettings, eps: number) {
  const plan = makePlan(s, models.base.config.numLayers);
  const sc = scoreBatch(models, pairs, plan, s);
  try {
    const before = tf.memory().numTensors;
    const attr = attributionBatch(models, sc, plan, s);
    expect(tf.memory().numTensors).toBe(before);
    const at = (alpha: number) =>
      sweepBatch(models, sweepInput(sc), plan.combos, () => interpolate(alpha), { ...s, alpha });
    const plus = at(eps);
    const minus = at(-eps);
    return {
      plan,
      attr,
      plus: pairs.map((_, i) => gainsByKey(plan.combos, plus, i)),
      minus: pairs.map((_, i) => gainsByKey(plan.combos, minus, i)),
    };
  } finally {
    sc.dispose();
  }
}

describe("attribution patching = the derivative of the exact patch", () => {
  for (const [positions, perToken] of [
    ["all", false],
    ["response", true],
  ] as const) {
    it(`matches central finite differences of the exact sweep at every site, layer, direction and pair (positions ${positions}${perToken ? ", per-token scores" : ""})`, () => {
      const s = resolveSettings({ ...ALL_SITES, positions, perToken }, demo.base.config);
      const eps = 1e-2;
      const { attr, plus, minus } = measure(demo, demo.pairs, s, eps);
      let worst = 0;
      let count = 0;
      for (let i = 0; i < demo.pairs.length; i++) {
        for (const key of Object.keys(plus[i]!)) {
          const fd = (plus[i]![key]! - minus[i]![key]!) / (2 * eps);
          const est = attr[i]!.gains[key]!;
          worst = Math.max(worst, Math.abs(est - fd) / (3e-3 + 1e-3 * Math.abs(fd)));
          count++;
        }
      }
      expect(count).toBe(demo.pairs.length * 2 * 4 * demo.base.config.numLayers);
      // the second-order term cancels in a central difference; float32 margins (sums over ~50 tokens) leave
      // ~1e-5 of noise in each gain, ~1e-3 after dividing by 2·eps
      expect(worst).toBeLessThan(1);
    });
  }

  it("per position, the estimates sum to the pair's estimate, and a pair's numbers do not depend on its batch", () => {
    const s = resolveSettings({ sites: ["resid_post"], positions: "all" }, demo.base.config);
    const plan = makePlan(s, demo.base.config.numLayers);
    const sc = scoreBatch(demo, demo.pairs, plan, s);
    const alone = scoreBatch(demo, demo.pairs.slice(1, 2), plan, s);
    try {
      const all = attributionBatch(demo, sc, plan, s);
      const one = attributionBatch(demo, alone, plan, s);
      const key = "tuned->base resid_post";
      for (const a of all) {
        expect(a.positions.key).toBe(key);
        a.positions.chosen.forEach((_, l) => {
          const g = a.gains[`${key} ${l}`]!;
          const sum = [...a.positions.chosen[l]!, ...a.positions.rejected[l]!].reduce((x, y) => x + y, 0);
          expect(Math.abs(sum - g)).toBeLessThan(1e-4 * (1 + Math.abs(g)));
        });
      }
      const p = demo.pairs[1]!;
      expect(all[1]!.positions.chosen[0]!.length).toBe(p.promptIds.length + p.chosenIds.length);
      expect(Object.keys(one[0]!.gains).length).toBe(demo.base.config.numLayers);
      for (const [k, g] of Object.entries(one[0]!.gains))
        expect(Math.abs(g - all[1]!.gains[k]!)).toBeLessThan(1e-4 * (1 + Math.abs(g)));
      one[0]!.heads
        .flat()
        .forEach((h, j) => expect(Math.abs(h - all[1]!.heads.flat()[j]!)).toBeLessThan(1e-4 * (1 + Math.abs(h))));
    } finally {
      sc.dispose();
      alone.dispose();
    }
  });
});

describe("on a planted model (tuned = base except a rank-1 change of mlp.down_proj at layer K)", () => {
  const K = 2;
  let base: LlamaModel;
  beforeAll(() => (base = loadModelSync(DEMO.base)));
  afterAll(() => disposeModel(base));

  /** Attribution and exact gains per pair for a planted change of the given size. */
  function planted(scale: number) {
    const [I, H] = base.layers[K]!.down.shape;
    const down = tf.tidy(() =>
      tf.add(
        base.layers[K]!.down,
        tf.mul(
          tf.matMul(tf.randomNormal([I, 1], 0, 1, "float32", 3), tf.randomNormal([1, H], 0, 1, "float32", 4)),
          scale,
        ),
      ),
    ) as tf.Tensor2D;
    const tuned: LlamaModel = { ...base, layers: base.layers.map((p, l) => (l === K ? { ...p, down } : p)) };
    const s = resolveSettings({ ...ALL_SITES, positions: "all" }, base.config);
    const plan = makePlan(s, base.config.numLayers);
    const sc = scoreBatch({ base, tuned }, demo.pairs, plan, s);
    try {
      const attr = attributionBatch({ base, tuned }, sc, plan, s);
      const exact = sweepBatch({ base, tuned }, sweepInput(sc), plan.combos, () => interpolate(1), s);
      return { attr, exact: demo.pairs.map((_, i) => gainsByKey(plan.combos, exact, i)) };
    } finally {
      sc.dispose();
      down.dispose();
    }
  }

  it("estimates are exactly 0 where the two models' activations agree, and the heads add up to attn_out", () => {
    for (const a of planted(0.01).attr) {
      for (let l = 0; l < K; l++) expect(a.gains[`tuned->base resid_post ${l}`]).toBe(0);
      for (let l = 0; l <= K; l++) expect(a.gains[`tuned->base attn_out ${l}`]).toBe(0);
      for (let l = 0; l < base.config.numLayers; l++) {
        // z → attn_out is the same linear map (o_proj) in both models, so Σ_heads Δz·∂m/∂z = Δattn_out·∂m/∂attn_out
        const heads = a.heads[l]!.reduce((x, y) => x + y, 0);
        const out = a.gains[`tuned->base attn_out ${l}`]!;
        expect(Math.abs(heads - out)).toBeLessThan(1e-4 * (1 + Math.abs(out)));
      }
    }
  });

  it("agrees with the exact sweep as the change gets small, with an error that shrinks in proportion to it (first order)", () => {
    const worst = (scale: number) => {
      const { attr, exact } = planted(scale);
      let w = 0;
      attr.forEach((a, i) => {
        for (const key of [
          "tuned->base resid_post",
          "tuned->base mlp_out",
          "base->tuned resid_post",
          "base->tuned mlp_out",
        ]) {
          for (let l = K; l < base.config.numLayers; l++) {
            const e = exact[i]![`${key} ${l}`]!;
            expect(Math.abs(e)).toBeGreaterThan(1e-3);
            w = Math.max(w, Math.abs(a.gains[`${key} ${l}`]! - e) / Math.abs(e));
          }
        }
      });
      return w;
    };
    const coarse = worst(0.003);
    const fine = worst(0.001);
    expect(fine).toBeLessThan(0.1);
    expect(fine / coarse).toBeGreaterThan(0.2);
    expect(fine / coarse).toBeLessThan(0.6);
  });
});

describe("attribution in a run", () => {
  it("--method both records estimates beside exact gains and summarizes their agreement; --method attribution makes no exact patches and no controls", async () => {
    const both = await runAnalysis(demo.base, demo.tuned, demo.pairs, {
      method: "both",
      bootstrap: 100,
      stabilityReps: 2,
    });
    expect(both.patching.every((p) => p.method === "exact" && p.controls)).toBe(true);
    const a = both.attribution!;
    expect(a.entries).toHaveLength(demo.base.config.numLayers);
    for (const e of a.entries) {
      expect(e.exact!.correlation).toBeGreaterThan(0.9);
      const est = both.pairs.map((r) => r.attribution!.gains[`tuned->base resid_post ${e.layer}`]!);
      const ex = both.pairs.map((r) => r.gains[`tuned->base resid_post ${e.layer}`]!);
      expect(e.exact!.max_abs_error).toBeCloseTo(Math.max(...est.map((v, i) => Math.abs(v - ex[i]!))), 10);
    }
    expect(a.heads.mean).toHaveLength(demo.base.config.numLayers);
    expect(a.heads.mean[0]).toHaveLength(demo.base.config.numHeads);
    const top = both.pairs.reduce((x, y) => (Math.abs(y.gap) > Math.abs(x.gap) ? y : x));
    expect(a.heatmap!.pair).toBe(top.index);

    const only = await runAnalysis(demo.base, demo.tuned, demo.pairs, {
      method: "attribution",
      bootstrap: 100,
      stabilityReps: 2,
    });
    expect(only.patching.every((p) => p.method === "attribution" && p.controls === null)).toBe(true);
    expect(only.pairs.every((r) => Object.keys(r.gains).length === 0 && r.random_direction === null)).toBe(true);
    only.patching.forEach((p, l) => expect(p.recovery).toBeCloseTo(a.entries[l]!.recovery_estimate, 5));
  });
});

describe("the head's gradient without a [N, V] tensor (targetLogprobGradient)", () => {
  it("equals autodiff of Σ w log-softmax at the targets, for a resident head in blocks and a streamed head in chunks", () => {
    const { vocabSize: V, hiddenSize: H } = demo.base.config;
    const N = 7;
    const x = tf.randomNormal([N, H], 0, 2, "float32", 3) as tf.Tensor2D;
    const targets = [0, 5, V - 1, 17, 17, 300, 511 % V];
    const weights = [1, -1, 0.5, -0.25, 1, 2, -3];
    const want = tf.grad((v: tf.Tensor) => {
      const lp = tf.logSoftmax(tf.matMul(v, demo.base.lmHead), -1);
      return tf.sum(
        tf.mul(
          tf.gather(
            tf.reshape(lp, [-1]),
            tf.tensor1d(
              targets.map((t, i) => i * V + t),
              "int32",
            ),
          ),
          tf.tensor1d(weights),
        ),
      );
    })(x);
    const scale = Math.max(...Array.from(want.dataSync(), Math.abs));
    const close = (got: tf.Tensor, what: string) => {
      const d = Math.max(...Array.from(got.dataSync(), (v, i) => Math.abs(v - want.dataSync()[i]!)));
      expect(d / scale, what).toBeLessThan(1e-5);
    };
    const chunked = loadModelSync(DEMO.base, {
      stream: "bring-in",
      memoryBudget: backendCopies() * (4 * H + Math.ceil(V / 8) * 4 * H + layerBytesOf(demo.base.config) + 1),
    });
    try {
      close(targetLogprobGradient(demo.base, x, targets, weights), "whole head");
      // blocks of 37 columns: the running max grows many times
      close(targetLogprobGradient(demo.base, x, targets, weights, { ...HEAD_BLOCK, size: 37 }), "blocks of 37");
      expect(chunked.source!.headChunks).toBe(8);
      close(targetLogprobGradient(chunked, x, targets, weights), "a streamed head in 8 chunks");
      expect(() => targetLogprobGradient(demo.base, x, [V, 0, 0, 0, 0, 0, 0], weights)).toThrow(
        /outside the vocabulary/,
      );
    } finally {
      disposeModel(chunked);
      tf.dispose([x, want]);
    }
  });
});
