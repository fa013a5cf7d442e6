// Identities of the hookable forward pass: self-patching, resuming, positional logits, batching.
import * as tf from "@tensorflow/tfjs-core";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadModelSync } from "../src/io/model.js";
import { disposeModel, forward, type LlamaModel } from "../src/model/llama.js";
import { BLOCK_SITES, hookName } from "../src/model/hooks.js";
import { maxAbsDiff, useBackend } from "./helpers.js";

useBackend();

let model: LlamaModel;
beforeAll(() => {
  model = loadModelSync("fixtures/models/llama-tiny-a");
});
afterAll(() => disposeModel(model));

const L = 4;
const V = 128;
const arbRows = fc.array(fc.array(fc.integer({ min: 0, max: V - 1 }), { minLength: 1, maxLength: 12 }), {
  minLength: 1,
  maxLength: 3,
});
const pad = (rows: number[][]) => {
  const T = Math.max(...rows.map((r) => r.length));
  return { ids: rows.map((r) => [...r, ...new Array(T - r.length).fill(0)]), lengths: rows.map((r) => r.length), T };
};
const siteNames = (l: number) => BLOCK_SITES.map((s) => hookName(s, l));

describe("forward identities", () => {
  it("patching any site with its own cached value changes nothing", () => {
    fc.assert(
      fc.property(arbRows, fc.integer({ min: 0, max: L - 1 }), fc.integer({ min: 0, max: 5 }), (rows, l, s) => {
        const { ids, lengths } = pad(rows);
        const site = siteNames(l)[s]!;
        const base = forward(model, ids, { lengths, cache: [site] });
        let called = 0;
        const patched = forward(model, ids, { lengths, hooks: { [site]: () => (called++, base.cache.get(site)) } });
        expect(called).toBe(1);
        expect(maxAbsDiff(patched.logits!.dataSync(), base.logits!.dataSync())).toBe(0);
        // and replacing with something else does change the output
        const zeroed = forward(model, ids, { lengths, hooks: { [site]: (v: tf.Tensor) => tf.zerosLike(v) } });
        expect(maxAbsDiff(zeroed.logits!.dataSync(), base.logits!.dataSync())).toBeGreaterThan(1e-3);
        tf.dispose([base.logits!, patched.logits!, zeroed.logits!]);
        base.cache.dispose();
      }),
      { numRuns: 25 },
    );
  });

  it("resuming from a cached residual at layer l equals the full run, and stopAfter stops there", () => {
    fc.assert(
      fc.property(arbRows, fc.integer({ min: 0, max: L }), (rows, l) => {
        const { ids, lengths } = pad(rows);
        const site = l === 0 ? "hook_embed" : `blocks.${l - 1}.hook_resid_post`;
        const full = forward(model, ids, { lengths, cache: [site, "blocks.3.hook_resid_post"] });
        const resumed = forward(model, ids, {
          lengths,
          start: { layer: l, resid: full.cache.get(site) },
          cache: ["blocks.3.hook_resid_post"],
        });
        expect(maxAbsDiff(resumed.logits!.dataSync(), full.logits!.dataSync())).toBeLessThanOrEqual(1e-5);
        expect(full.cache.get(site).isDisposed).toBe(false); // the caller's start tensor is left alone
        if (l > 0) {
          const stopped = forward(model, ids, { lengths, stopAfter: l - 1, cache: [site] });
          if (l - 1 < L - 1) expect(stopped.logits).toBeNull();
          else stopped.logits!.dispose();
          expect(maxAbsDiff(stopped.cache.get(site).dataSync(), full.cache.get(site).dataSync())).toBe(0);
          stopped.cache.dispose();
        }
        full.dispose();
        resumed.dispose();
      }),
      { numRuns: 25 },
    );
  });

  it("logits at chosen positions equal the full logits there", () => {
    fc.assert(
      fc.property(arbRows, fc.array(fc.tuple(fc.nat(), fc.nat()), { minLength: 1, maxLength: 6 }), (rows, picks) => {
        const { ids, lengths, T } = pad(rows);
        const at = picks.map(([b, t]) => [b % rows.length, t % T] as [number, number]);
        const full = forward(model, ids, { lengths });
        const some = forward(model, ids, { lengths, logitsAt: at });
        expect(some.logits!.shape).toEqual([at.length, V]);
        const F = full.logits!.arraySync() as number[][][];
        const S = some.logits!.arraySync() as number[][];
        at.forEach(([b, t], i) => expect(maxAbsDiff(S[i]!, F[b]![t]!)).toBeLessThanOrEqual(1e-5));
        tf.dispose([full.logits!, some.logits!]);
      }),
      { numRuns: 25 },
    );
  });

  it("a right-padded batch gives each row the logits it gets alone", () => {
    fc.assert(
      fc.property(arbRows, (rows) => {
        const { ids, lengths } = pad(rows);
        const batch = forward(model, ids, { lengths });
        const Bl = batch.logits!.arraySync() as number[][][];
        rows.forEach((r, b) => {
          const one = forward(model, [r]);
          const O = (one.logits!.arraySync() as number[][][])[0]!;
          // float32 sums over a padded batch may be ordered differently: equal to rounding, not bit for bit
          expect(maxAbsDiff(Bl[b]!.slice(0, r.length).flat(), O.flat())).toBeLessThanOrEqual(1e-4);
          one.logits!.dispose();
        });
        batch.logits!.dispose();
      }),
      { numRuns: 25 },
    );
  });

  it("hook_z has shape [B, T, heads, head_dim] and a hook returning the wrong shape is an error", () => {
    const r = forward(model, [[1, 2, 3]], { cache: ["blocks.0.attn.hook_z"] });
    expect(r.cache.get("blocks.0.attn.hook_z").shape).toEqual([1, 3, 8, 8]);
    const before = tf.memory().numTensors;
    expect(() =>
      forward(model, [[1, 2, 3]], { hooks: { "blocks.1.hook_mlp_out": () => tf.zeros([1, 3, 5]) } }),
    ).toThrow(/shape/);
    expect(tf.memory().numTensors).toBeLessThanOrEqual(before + 1); // only the hook's own stray tensor
    tf.dispose([r.logits!]);
    r.cache.dispose();
  });

  it("rejects out-of-range ids, ragged rows and bad lengths", () => {
    expect(() => forward(model, [[1, 200]])).toThrow(/outside the vocabulary/);
    expect(() => forward(model, [[1, 2], [3]])).toThrow(/same \(padded\) length/);
    expect(() => forward(model, [[1, 2]], { lengths: [3] })).toThrow(/lengths/);
    // targets: one id per scored position, each in the vocabulary; nested lists named in a short message
    const at: Array<[number, number]> = [
      [0, 0],
      [0, 1],
    ];
    expect(() => forward(model, [[1, 2]], { logitsAt: at, targets: [3, 200] })).toThrow(
      /target id 200 outside the vocabulary/,
    );
    expect(() =>
      forward(model, [[1, 2]], {
        logitsAt: at,
        targets: [
          [3, 4],
          [5, 6],
        ] as unknown as number[],
      }),
    ).toThrow(/^targets must be one integer token id per logitsAt position, got an array$/);
    const before = tf.memory().numTensors;
    const wrong = tf.zeros([1, 3, 64]);
    expect(() => forward(model, [[1, 2]], { start: { layer: 1, resid: wrong } })).toThrow(
      /start residual has shape \[1,3,64\], expected \[1,2,64\]/,
    );
    wrong.dispose();
    expect(tf.memory().numTensors).toBe(before);
  });
});
