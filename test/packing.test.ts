// Shared prompts (forward's pairedPrompts): each pair runs as one packed row [prompt, chosen, rejected] and must
// give what the two separate rows give, at every site a hook or cache sees and at every scored position.
import * as fs from "node:fs";
import * as tf from "@tensorflow/tfjs-core";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { loadModelSync } from "../src/io/model.js";
import { hookNames } from "../src/model/hooks.js";
import { disposeModel, forward } from "../src/model/llama.js";
import { packPairs } from "../src/model/packing.js";
import { arbConfig, randomWeights, writeModelFolder } from "./random-model.js";
import { useBackend } from "./helpers.js";

useBackend();

/** Random pairs for a vocabulary: a prompt and two responses each (responses may be empty of shared tokens). */
const arbPairs = (vocab: number) =>
  fc.array(
    fc.record({
      prompt: fc.array(fc.integer({ min: 0, max: vocab - 1 }), { minLength: 1, maxLength: 9 }),
      chosen: fc.array(fc.integer({ min: 0, max: vocab - 1 }), { minLength: 1, maxLength: 8 }),
      rejected: fc.array(fc.integer({ min: 0, max: vocab - 1 }), { minLength: 1, maxLength: 8 }),
    }),
    { minLength: 1, maxLength: 3 },
  );

const arbCase = arbConfig.chain((cfg) =>
  fc.record({ cfg: fc.constant(cfg), seed: fc.integer({ min: 1, max: 2 ** 30 }), pairs: arbPairs(cfg.vocab) }),
);

/** Right-padded rows (chosen, rejected per pair), their lengths and the scored positions. */
function rowsOf(pairs: Array<{ prompt: number[]; chosen: number[]; rejected: number[] }>) {
  const seqs = pairs.flatMap((p) => [
    [...p.prompt, ...p.chosen],
    [...p.prompt, ...p.rejected],
  ]);
  const T = Math.max(...seqs.map((s) => s.length));
  const at = seqs.flatMap((s, r) => s.map((_, t): [number, number] => [r, t]));
  return {
    ids: seqs.map((s) => [...s, ...new Array<number>(T - s.length).fill(0)]),
    lengths: seqs.map((s) => s.length),
    prompts: pairs.map((p) => p.prompt.length),
    T,
    at,
  };
}

describe("shared prompts (pairedPrompts)", () => {
  it("give every site, logit and scored log-prob of the separate rows, and run symmetric hooks the same", () => {
    fc.assert(
      fc.property(arbCase, ({ cfg, seed, pairs }) => {
        const dir = writeModelFolder({ cfg, seed, dtype: "F32", shards: 1 }, randomWeights(cfg, seed));
        const model = loadModelSync(dir);
        try {
          const { ids, lengths, prompts, T, at } = rowsOf(pairs);
          // every site but the attention matrices: a pass that watches one runs the rows apart (hooks.test.ts)
          const names = hookNames(model.config).filter((n) => !/attn\.hook_(attn_scores|pattern)$/.test(n));
          const targets = at.map(([r, t]) => (ids[r]![t]! + 1) % cfg.vocab);
          // a hook that edits every row alike (as every patch does): scale the residual after layer 0
          const hooks = { "blocks.0.hook_resid_post": (v: tf.Tensor) => tf.mul(v, 0.9) };
          const common = { lengths, cache: names, logitsAt: at, hooks };
          const apart = forward(model, ids, common);
          const packed = forward(model, ids, { ...common, pairedPrompts: prompts });
          const close = (a: ArrayLike<number>, b: ArrayLike<number>, what: string) => {
            let worst = 0;
            for (let i = 0; i < a.length; i++)
              worst = Math.max(worst, Math.abs(a[i]! - b[i]!) / Math.max(1, Math.abs(a[i]!)));
            expect(worst, what).toBeLessThan(2e-5);
          };
          close(apart.logits!.dataSync(), packed.logits!.dataSync(), "logits");
          for (const n of names) {
            const [a, b] = [apart.cache.get(n), packed.cache.get(n)];
            expect(b.shape, n).toEqual(a.shape);
            const width = a.size / (ids.length * T);
            const [x, y] = [a.dataSync(), b.dataSync()];
            // valid positions only: past a row's length the packed run holds no token of that row
            const keep = (v: ArrayLike<number>) =>
              Array.from(v).filter((_, i) => Math.floor(i / width) % T < lengths[Math.floor(i / width / T)]!);
            close(keep(x), keep(y), n);
          }
          const lpA = forward(model, ids, { lengths, logitsAt: at, targets, hooks }).logprobs!;
          const lpB = forward(model, ids, { lengths, logitsAt: at, targets, hooks, pairedPrompts: prompts }).logprobs!;
          close(lpA, lpB, "scored log-probs");
          // resuming at a layer from a [B, T, H] residual works the same packed
          const start = { layer: cfg.layers - 1, resid: apart.cache.get(`blocks.${cfg.layers - 1}.hook_resid_pre`) };
          close(
            forward(model, ids, { lengths, start, logitsAt: at, targets }).logprobs!,
            forward(model, ids, { lengths, start, logitsAt: at, targets, pairedPrompts: prompts }).logprobs!,
            "resumed",
          );
          apart.dispose();
          packed.dispose();
          // fewer positions than the separate rows (the prompt once per pair)
          const pk = packPairs(ids, lengths, prompts);
          expect(pk.rows * pk.T).toBeLessThanOrEqual(ids.length * T);
          pairs.forEach((p, i) =>
            expect(pk.ids[i]!.slice(0, p.prompt.length + p.chosen.length + p.rejected.length)).toEqual([
              ...p.prompt,
              ...p.chosen,
              ...p.rejected,
            ]),
          );
        } finally {
          disposeModel(model);
          fs.rmSync(dir, { recursive: true, force: true });
        }
      }),
      { numRuns: 15, seed: 20261125 },
    );
  });

  it("refuse a hook or start residual that differs between a pair's two prompts, rows whose ids differ in the prompt, and odd row counts", () => {
    const model = loadModelSync("fixtures/models/llama-tiny-b");
    try {
      const ids = [
        [1, 2, 3, 4],
        [1, 2, 5, 0],
      ];
      const lengths = [4, 3];
      const rowNoise = (v: tf.Tensor) =>
        tf.add(v, tf.concat([tf.zeros([1, ...v.shape.slice(1)]), tf.onesLike(tf.slice(v, [1], [1]))]));
      expect(() =>
        forward(model, ids, { lengths, pairedPrompts: [2], hooks: { "blocks.0.hook_resid_post": rowNoise } }),
      ).toThrow(
        /the hook at blocks\.0\.hook_resid_post gives a pair's chosen and rejected rows different prompt values/,
      );
      // the same hook is fine on the separate rows; a start residual whose rows differ in the prompt is refused too
      const apart = forward(model, ids, {
        lengths,
        hooks: { "blocks.0.hook_resid_post": rowNoise },
        cache: ["blocks.1.hook_resid_pre"],
      });
      const resid = apart.cache.get("blocks.1.hook_resid_pre");
      expect(() => forward(model, ids, { lengths, pairedPrompts: [2], start: { layer: 1, resid } })).toThrow(
        /the start residual of layer 1 gives a pair's chosen and rejected rows different prompt values/,
      );
      apart.dispose();
      expect(() =>
        forward(
          model,
          [
            [1, 2, 3],
            [1, 9, 3],
          ],
          { pairedPrompts: [2] },
        ),
      ).toThrow(/differ at prompt position 1/);
      expect(() => forward(model, [[1, 2, 3]], { pairedPrompts: [1] })).toThrow(/two rows per pair/);
      expect(() => forward(model, ids, { lengths, pairedPrompts: [4] })).toThrow(/prompt length 4 outside 1\.\.3/);
    } finally {
      disposeModel(model);
    }
  });
});
