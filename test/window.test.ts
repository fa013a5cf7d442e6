// Windows of consecutive layers patched together (--window): against full forward passes with every window
// layer hooked, against the identity a residual window implies, and attribution against finite differences.
import * as tf from "@tensorflow/tfjs-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { attributionBatch } from "../src/analysis/attribution.js";
import { interpolate } from "../src/analysis/patches.js";
import { runAnalysis } from "../src/analysis/run.js";
import { gainsByKey, makePlan, scoreBatch, type ModelPair } from "../src/analysis/scoring.js";
import { margins as pairMargins } from "../src/engine/margins.js";
import { resolveSettings } from "../src/analysis/settings.js";
import { sweepBatch, sweepInput } from "../src/analysis/sweep.js";
import type { Pair } from "../src/data/pairs.js";
import { enableGradients } from "../src/model/gradients.js";
import { forward } from "../src/model/llama.js";
import { disposeDemo, loadDemo, useBackend } from "./helpers.js";

useBackend();

let demo: ModelPair & { pairs: Pair[] };
beforeAll(async () => {
  await enableGradients();
  demo = loadDemo(3);
});
afterAll(() => disposeDemo(demo));

const close = (a: number, b: number, tol = 1e-4) => expect(Math.abs(a - b)).toBeLessThan(tol * (1 + Math.abs(b)));

describe("--window", () => {
  it("a window equals a full forward pass with each of its layers' site replaced by the source model's", () => {
    const s = resolveSettings({ sites: ["mlp_out", "attn_out"], window: 3, controls: false }, demo.base.config);
    const plan = makePlan(s, demo.base.config.numLayers);
    const sc = scoreBatch(demo, demo.pairs, plan, s);
    try {
      const gains = sweepBatch(demo, sweepInput(sc), plan.combos, () => interpolate(1), s);
      const L = demo.base.config.numLayers;
      const tunedRun = forward(demo.tuned, sc.batch.ids, {
        lengths: sc.batch.lengths,
        logitsAt: "none",
        cache: (n) => /hook_(mlp|attn)_out$/.test(n),
      });
      try {
        for (const [ci, c] of plan.combos.entries()) {
          const hooks: Record<string, () => tf.Tensor> = {};
          for (let j = c.layer; j < Math.min(L, c.layer + 3); j++)
            hooks[`blocks.${j}.hook_${c.site}`] = () => tf.clone(tunedRun.cache.get(`blocks.${j}.hook_${c.site}`));
          const patched = pairMargins(demo.base, demo.pairs, { hooks });
          patched.forEach((m, i) => close(gains[ci]![i]!, m - sc.margin.base[i]!));
        }
      } finally {
        tunedRun.dispose();
      }
    } finally {
      sc.dispose();
    }
  });

  it("window 1 is the single-layer sweep, and a residual-stream window (α = 1, all positions) is its last layer alone", () => {
    const s1 = resolveSettings(
      { sites: ["resid_post", "mlp_out"], directions: ["tuned->base", "base->tuned"] },
      demo.base.config,
    );
    const s2 = { ...s1, window: 2 };
    const plan = makePlan(s2, demo.base.config.numLayers);
    const sc = scoreBatch(demo, demo.pairs, plan, s1);
    try {
      const single = sweepBatch(demo, sweepInput(sc), plan.combos, () => interpolate(1), s1, { strategy: "per-run" });
      const w1 = sweepBatch(demo, sweepInput(sc), plan.combos, () => interpolate(1), s1, { hooked: true });
      w1.forEach((g, ci) => g.forEach((v, i) => close(v, single[ci]![i]!, 1e-5)));
      const w2 = sweepBatch(demo, sweepInput(sc), plan.combos, () => interpolate(1), s2);
      const L = demo.base.config.numLayers;
      plan.combos.forEach((c, ci) => {
        if (c.site !== "resid_post") return;
        const last = plan.combos.findIndex(
          (d) => d.site === c.site && d.direction === c.direction && d.layer === Math.min(L - 1, c.layer + 1),
        );
        w2[ci]!.forEach((v, i) => close(v, single[last]![i]!, 1e-5));
      });
    } finally {
      sc.dispose();
    }
  });

  it("a window's attribution estimate is the derivative of its exact gain (central finite differences)", () => {
    const s = resolveSettings({ sites: ["mlp_out", "resid_pre"], window: 2 }, demo.base.config);
    const plan = makePlan(s, demo.base.config.numLayers);
    const sc = scoreBatch(demo, demo.pairs, plan, s);
    try {
      const attr = attributionBatch(demo, sc, plan, s);
      const eps = 1e-2;
      const at = (alpha: number) =>
        sweepBatch(demo, sweepInput(sc), plan.combos, () => interpolate(alpha), { ...s, alpha });
      const plus = at(eps);
      const minus = at(-eps);
      demo.pairs.forEach((_, i) => {
        const gp = gainsByKey(plan.combos, plus, i);
        const gm = gainsByKey(plan.combos, minus, i);
        for (const [key, v] of Object.entries(gp))
          expect(Math.abs(attr[i]!.gains[key]! - (v - gm[key]!) / (2 * eps))).toBeLessThan(
            3e-3 + 1e-3 * Math.abs(v / eps),
          );
      });
    } finally {
      sc.dispose();
    }
  });

  it("a run with --window records it and keeps both controls (mean ablation at every window layer)", async () => {
    const r = await runAnalysis(demo.base, demo.tuned, demo.pairs, {
      window: 2,
      sites: ["mlp_out"],
      bootstrap: 100,
      stabilityReps: 2,
    });
    expect(r.patching.every((p) => p.window === 2 && p.controls !== null)).toBe(true);
    expect(
      r.patching.every(
        (p) =>
          Number.isFinite(p.controls!.mean_ablation.recovery) && Number.isFinite(p.controls!.random_direction.recovery),
      ),
    ).toBe(true);
    expect(() => resolveSettings({ window: 0 })).toThrow(/window must be an integer ≥ 1/);
  });
});
