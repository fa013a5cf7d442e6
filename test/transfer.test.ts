// Steering and subspace transfer: a run saves subspace.safetensors; `prefprobe apply-subspace` carried back to the
// run's own held-out pairs and models must reproduce the run's low-rank and steering numbers (the same patches,
// computed by another path); carried to a planted model pair whose change writes along the same direction it
// must recover what the whole layer does; a steering vector's gain must match a hook-based forward pass.
import * as fs from "node:fs";
import * as path from "node:path";
import * as tf from "@tensorflow/tfjs-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { transferStage } from "../src/analysis/steering.js";
import { margins as pairMargins } from "../src/engine/margins.js";
import { hookName } from "../src/model/hooks.js";
import { resolveSettings } from "../src/analysis/settings.js";
import { writeSafetensors } from "../src/io/safetensors.js";
import type { LlamaModel } from "../src/model/llama.js";
import { DEMO, loadDemo, disposeDemo, runCli, tmpDir, useBackend } from "./helpers.js";
import type { Pair } from "../src/data/pairs.js";

useBackend();

let out: string;
let results: Record<string, any>;
beforeAll(() => {
  out = path.join(tmpDir(), "run");
  const r = runCli(
    "run",
    "--base",
    DEMO.base,
    "--tuned",
    DEMO.tuned,
    "--pairs",
    DEMO.pairs,
    "--out",
    out,
    "--limit",
    "16",
    "--no-controls",
    "--bootstrap",
    "100",
    "--stability",
    "2",
    "--workers",
    "1",
  );
  if (r.code !== 0) throw new Error(r.err);
  results = JSON.parse(fs.readFileSync(path.join(out, "results.json"), "utf8"));
}, 120_000);

describe("apply-subspace", () => {
  it("on the run's own held-out pairs and models it reproduces the run's low-rank recoveries and steering gains", () => {
    const lines = fs.readFileSync(DEMO.pairs, "utf8").trim().split("\n");
    const test = results.pca.test_pairs as number[];
    const pairsFile = path.join(tmpDir(), "test.jsonl");
    fs.writeFileSync(pairsFile, test.map((i) => lines[results.pairs[i].line - 1]).join("\n") + "\n");
    const json = path.join(tmpDir(), "transfer.json");
    const r = runCli(
      "apply-subspace",
      "--subspace",
      path.join(out, "subspace.safetensors"),
      "--base",
      DEMO.base,
      "--tuned",
      DEMO.tuned,
      "--pairs",
      pairsFile,
      "--out",
      json,
    );
    expect(r.code, r.err).toBe(0);
    expect(r.out).toMatch(/Patching only the saved subspace's \d+ directions recovers/);
    const t = JSON.parse(fs.readFileSync(json, "utf8"));
    expect(t.layer).toBe(results.pca.layer);
    expect(t.n_pairs).toBe(test.length);
    for (const s of t.subspace) {
      const run = results.pca.recovery.find((x: { k: number }) => x.k === s.k);
      if (!run) continue; // the run's k grid goes past the number of saved components
      expect(s.recovery).toBeCloseTo(run.recovery, 5);
      expect(s.random_subspace).toBeCloseTo(run.random_subspace, 5);
    }
    expect(t.subspace.length).toBeGreaterThan(2);
    // the whole-layer patch on these pairs = the run's exact resid_post gains at that layer over the same pairs
    const gains = test.map((i) => results.pairs[i].gains[`tuned->base resid_post ${t.layer}`]);
    const gaps = test.map((i) => results.pairs[i].gap);
    expect(t.full_layer_recovery).toBeCloseTo(
      gains.reduce((a: number, b: number) => a + b, 0) / gaps.reduce((a: number, b: number) => a + b, 0),
      5,
    );
    const md = t.steering.find((v: { vector: string }) => v.vector === "mean difference");
    const runMd = results.pca.steering.find((v: { vector: string }) => v.vector === "mean difference");
    md.by_strength.forEach((b: { recovery: number }, i: number) =>
      expect(b.recovery).toBeCloseTo(runMd.by_strength[i].recovery, 5),
    );
  });

  it("refuses a subspace of another width, of a layer the models lack, or a file that is not a subspace, in one line", () => {
    const last = (r: { err: string }) => r.err.trim().split("\n").pop();
    const json = path.join(tmpDir(), "x.json");
    const narrow = path.join(tmpDir(), "narrow.safetensors");
    writeSafetensors(
      narrow,
      {
        components: { dtype: "F32", shape: [1, 32], data: new Float32Array(32).fill(0.1) },
        mean_diff: { dtype: "F32", shape: [32], data: new Float32Array(32) },
      },
      { site: "resid_post", layer: "1" },
    );
    const wide = runCli(
      "apply-subspace",
      "--subspace",
      narrow,
      "--base",
      DEMO.base,
      "--tuned",
      DEMO.tuned,
      "--pairs",
      DEMO.pairs,
      "--out",
      json,
    );
    expect(wide.code).toBe(1);
    expect(last(wide)).toMatch(
      /^prefprobe: error: --subspace .* is for hidden size 32; fixtures\/models\/stories260k has 64$/,
    );
    const shallow = runCli(
      "apply-subspace",
      "--subspace",
      path.join(out, "subspace.safetensors"),
      "--base",
      "fixtures/models/llama-tiny-a",
      "--tuned",
      "fixtures/models/llama-tiny-a",
      "--pairs",
      DEMO.pairs,
      "--out",
      json,
    );
    expect(shallow.code).toBe(1);
    expect(last(shallow)).toMatch(
      /^prefprobe: error: --subspace .* is for layer \d+; fixtures\/models\/llama-tiny-a has \d+ layers$/,
    );
    const bogus = runCli(
      "apply-subspace",
      "--subspace",
      path.join(out, "activations.safetensors"),
      "--base",
      DEMO.base,
      "--tuned",
      DEMO.tuned,
      "--pairs",
      DEMO.pairs,
      "--out",
      json,
    );
    expect(bogus.code).toBe(1);
    expect(last(bogus)).toMatch(/^prefprobe: error: --subspace .*: not a prefprobe subspace file/);
    expect(fs.existsSync(json)).toBe(false);
  });
});

describe("transfer to another model pair (planted)", () => {
  let demo: { base: LlamaModel; tuned: LlamaModel; pairs: Pair[] };
  beforeAll(() => (demo = loadDemo(4)));
  afterAll(() => disposeDemo(demo));

  /** base with down_proj of layer K plus u·vᵀ (stored [in, out] = v uᵀ): the change writes along u. */
  function planted(
    base: LlamaModel,
    K: number,
    u: Float32Array,
    seed: number,
  ): { model: LlamaModel; dispose: () => void } {
    const [I, H] = base.layers[K]!.down.shape;
    const down = tf.tidy(() =>
      tf.add(base.layers[K]!.down, tf.matMul(tf.randomNormal([I, 1], 0, 0.3, "float32", seed), tf.tensor2d(u, [1, H]))),
    ) as tf.Tensor2D;
    return {
      model: { ...base, layers: base.layers.map((p, l) => (l === K ? { ...p, down } : p)) },
      dispose: () => down.dispose(),
    };
  }

  it("a direction found on one planted pair recovers the whole layer's effect on another pair planted along it, and a random direction does not", async () => {
    const K = 2;
    const H = demo.base.config.hiddenSize;
    const u = Float32Array.from({ length: H }, (_, j) => Math.sin(1.7 * j + 0.3));
    const norm = Math.hypot(...u);
    for (let j = 0; j < H; j++) u[j]! /= norm;
    const other = planted(demo.base, K, u, 11); // another tuned model: same write direction u, other read vector
    try {
      const s = resolveSettings({}, demo.base.config);
      const sub = { layer: K, components: u, meanDiff: Float32Array.from(u, (x) => 0.5 * x) };
      const r = await transferStage({ base: demo.base, tuned: other.model }, demo.pairs, sub, s);
      expect(Math.abs(r.full_layer_recovery - 1)).toBeLessThan(1e-3); // resid_post at K carries the whole change
      expect(r.subspace[0]!.k).toBe(1);
      expect(Math.abs(r.subspace[0]!.share_of_full_layer - 1)).toBeLessThan(1e-3);
      expect(Math.abs(r.subspace[0]!.random_subspace)).toBeLessThan(0.2);
    } finally {
      other.dispose();
    }
  });

  it("a steering gain is the margin of the base model with β·v added by a hook at that layer", async () => {
    const s = resolveSettings({ positions: "all" }, demo.base.config);
    const H = demo.base.config.hiddenSize;
    const K = 3;
    const mu = Float32Array.from({ length: H }, (_, j) => 0.05 * Math.cos(j));
    const r = await transferStage(
      { base: demo.base, tuned: demo.tuned },
      demo.pairs,
      { layer: K, components: mu, meanDiff: mu },
      s,
    );
    const v = tf.tensor1d(mu);
    try {
      const base = pairMargins(demo.base, demo.pairs);
      const tuned = pairMargins(demo.tuned, demo.pairs);
      const steered = pairMargins(demo.base, demo.pairs, {
        hooks: { [hookName("resid_post", K)]: (h) => tf.add(h, tf.mul(v, 2)) },
      });
      const gap = tuned.reduce((a, x, i) => a + x - base[i]!, 0);
      const expected = steered.reduce((a, x, i) => a + x - base[i]!, 0) / gap;
      const md = r.steering.find((x) => x.vector === "mean difference")!;
      expect(md.by_strength.find((b) => b.strength === 2)!.recovery).toBeCloseTo(expected, 4);
    } finally {
      v.dispose();
    }
  });
});
