// Exact per-head and per-position patches against full forward passes from the embedding with one hook.
import * as tf from "@tensorflow/tfjs-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { headSweep, positionSweep } from "../src/analysis/fine.js";
import { runAnalysis } from "../src/analysis/run.js";
import { makePlan, scoreBatch, type ModelPair } from "../src/analysis/scoring.js";
import { margins as pairMargins } from "../src/engine/margins.js";
import { hookName } from "../src/model/hooks.js";
import { resolveSettings } from "../src/analysis/settings.js";
import { sweepInput } from "../src/analysis/sweep.js";
import type { Pair } from "../src/data/pairs.js";
import { forward } from "../src/model/llama.js";
import { disposeDemo, loadDemo, useBackend } from "./helpers.js";

useBackend();

let demo: ModelPair & { pairs: Pair[] };
beforeAll(() => {
  // two demo pairs with their prompts cut to the last 8 tokens: a per-position sweep runs once per position
  const d = loadDemo(2);
  demo = { ...d, pairs: d.pairs.map((p) => ({ ...p, promptIds: p.promptIds.slice(-8) })) };
});
afterAll(() => disposeDemo(demo));

const close = (a: number, b: number) => expect(Math.abs(a - b)).toBeLessThan(1e-4 * (1 + Math.abs(b)));

describe("exact per-head patching", () => {
  it("each (layer, head) gain equals a full forward with that head's z replaced by the tuned model's", () => {
    const s = resolveSettings({ positions: "all" }, demo.base.config);
    const plan = makePlan(s, demo.base.config.numLayers);
    const sc = scoreBatch(demo, demo.pairs, plan, s);
    try {
      const grid = headSweep(demo, sweepInput(sc), "tuned->base", s);
      const { numHeads: nH, headDim: d, numLayers: L } = demo.base.config;
      expect(grid[0]).toHaveLength(L);
      expect(grid[0]![0]).toHaveLength(nH);
      const tunedZ = forward(demo.tuned, sc.batch.ids, {
        lengths: sc.batch.lengths,
        logitsAt: "none",
        cache: (n) => n.endsWith("attn.hook_z"),
      });
      try {
        for (const [l, h] of [
          [0, 0],
          [2, 5],
          [4, nH - 1],
        ] as const) {
          const z = tunedZ.cache.get(`blocks.${l}.attn.hook_z`);
          const onlyHead = tf.reshape(
            tf.tensor1d(Array.from({ length: nH * d }, (_, j) => (Math.floor(j / d) === h ? 1 : 0))),
            [1, 1, nH, d],
          );
          const patched = pairMargins(demo.base, demo.pairs, {
            hooks: { [hookName("z", l)]: (v) => tf.add(v, tf.mul(onlyHead, tf.sub(z, v))) },
          });
          onlyHead.dispose();
          demo.pairs.forEach((_, i) => close(grid[i]![l]![h]!, patched[i]! - sc.margin.base[i]!));
        }
      } finally {
        tunedZ.dispose();
      }
      expect(grid.flat(2).some((g) => Math.abs(g) > 1e-3)).toBe(true);
    } finally {
      sc.dispose();
    }
  });
});

describe("exact per-position patching", () => {
  it("each (layer, position) gain equals a full forward with that position's resid_post replaced in both rows", () => {
    const s = resolveSettings({}, demo.base.config);
    const pair = demo.pairs[0]!;
    const map = positionSweep(demo, pair, "tuned->base", s);
    const T = pair.promptIds.length + Math.max(pair.chosenIds.length, pair.rejectedIds.length);
    expect(map).toHaveLength(demo.base.config.numLayers);
    expect(map[0]).toHaveLength(T);
    const [base] = pairMargins(demo.base, [pair]);
    const ids = [
      [...pair.promptIds, ...pair.chosenIds],
      [...pair.promptIds, ...pair.rejectedIds],
    ];
    const padded = ids.map((r) => [...r, ...new Array(T - r.length).fill(0)]);
    const tuned = forward(demo.tuned, padded, {
      lengths: ids.map((r) => r.length),
      logitsAt: "none",
      cache: (n) => n.endsWith("hook_resid_post"),
    });
    try {
      for (const [l, t] of [
        [0, 0],
        [1, pair.promptIds.length - 1],
        [4, pair.promptIds.length],
        [2, T - 1],
      ] as const) {
        const h = tuned.cache.get(`blocks.${l}.hook_resid_post`);
        const at = tf.tensor3d(
          Array.from({ length: 2 * T }, (_, j) => (j % T === t && j % T < ids[Math.floor(j / T)]!.length ? 1 : 0)),
          [2, T, 1],
        );
        const [patched] = pairMargins(demo.base, [pair], {
          hooks: { [hookName("resid_post", l)]: (v) => tf.add(v, tf.mul(at, tf.sub(h, v))) },
        });
        at.dispose();
        close(map[l]![t]!, patched! - base!);
      }
    } finally {
      tuned.dispose();
    }
  });

  it("a run with --heads and --position-map records the grid, the map and their summaries", async () => {
    const r = await runAnalysis(demo.base, demo.tuned, demo.pairs, {
      heads: true,
      positionMap: true,
      bootstrap: 100,
      stabilityReps: 2,
      controls: false,
    });
    expect(r.pairs.every((p) => p.heads!.length === demo.base.config.numLayers)).toBe(true);
    const l = 3;
    const h = 1;
    close(r.heads!.mean_gain[l]![h]!, (r.pairs[0]!.heads![l]![h]! + r.pairs[1]!.heads![l]![h]!) / 2);
    const top = r.pairs.reduce((a, b) => (Math.abs(b.gap) > Math.abs(a.gap) ? b : a));
    expect(r.position_map!.pair).toBe(top.index);
    expect(r.position_map!.gains).toHaveLength(demo.base.config.numLayers);
  });
});
