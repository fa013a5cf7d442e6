// A pair's numbers depend on the pair, not on how the run was cut: batch size, which other layers were swept,
// the shard (test/longrun.test.ts), and the tokenization of a response sitting after its prompt.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readPairs, tokenizeTextPair } from "../src/io/pairs.js";
import { loadTokenizer } from "../src/io/tokenizer.js";
import type { Pair } from "../src/data/pairs.js";
import type { LlamaModel } from "../src/model/llama.js";
import { analysePairs, planBatches } from "../src/analysis/run.js";
import { resolveSettings } from "../src/analysis/settings.js";
import { type PairState } from "../src/analysis/schema.js";
import { DEMO, disposeDemo, expectSame, loadDemo, useBackend } from "./helpers.js";

useBackend();

const MODEL = DEMO.base;
let base: LlamaModel;
let tuned: LlamaModel;
let pairs: Pair[];
beforeAll(() => ({ base, tuned, pairs } = loadDemo(7)));
afterAll(() => disposeDemo({ base, tuned }));

const run = (settings: Parameters<typeof resolveSettings>[0], n = pairs.length) =>
  analysePairs(
    { base, tuned },
    pairs.slice(0, n),
    resolveSettings({ sites: ["resid_post", "attn_out"], ...settings }, base.config),
  );

/** Largest |a − b| relative to max(1, |b|) over every number of two pairs' records and sums. */
function maxRelDiff(a: PairState[], b: PairState[]): number {
  let m = 0;
  const walk = (x: unknown, y: unknown) => {
    if (typeof x === "number" && typeof y === "number") m = Math.max(m, Math.abs(x - y) / Math.max(1, Math.abs(y)));
    else if (Array.isArray(x) && Array.isArray(y)) x.forEach((v, i) => walk(v, y[i]));
    else if (x && y && typeof x === "object")
      for (const k of Object.keys(x)) walk((x as Record<string, unknown>)[k], (y as Record<string, unknown>)[k]);
  };
  a.forEach((st, i) => (walk(st.record, b[i]!.record), walk(Array.from(st.sums), Array.from(b[i]!.sums))));
  return m;
}

describe("a pair's numbers", () => {
  it("do not depend on the batch size (every record field and sum, random-direction control included)", async () => {
    const one = await run({ batchPairs: 1 }, 5);
    const three = await run({ batchPairs: 3 }, 5); // a full batch and a partial one
    const seven = await run({ batchPairs: 7 }, 5); // one batch larger than the pairs
    expect(one.map((s) => s.record.index)).toEqual([0, 1, 2, 3, 4]);
    expect(maxRelDiff(three, one)).toBeLessThan(1e-4);
    expect(maxRelDiff(seven, one)).toBeLessThan(1e-4);
    // the control is really random: it differs between layers and from the real patch
    const r = one[0]!.record;
    expect(r.random_direction!["tuned->base resid_post 0"]).not.toBe(r.random_direction!["tuned->base resid_post 1"]);
  });

  it("do not depend on which other layers are swept", async () => {
    const only3 = await run({ layers: [3] });
    const with2 = await run({ layers: [2, 3] });
    only3.forEach((st, i) => {
      // a record holds each gain under its direction, site and layer, whatever else was swept
      expect(Object.keys(st.record.gains).sort()).toEqual(["tuned->base attn_out 3", "tuned->base resid_post 3"]);
      for (const key of ["tuned->base resid_post 3", "tuned->base attn_out 3"]) {
        expect(st.record.gains[key]).toBe(with2[i]!.record.gains[key]);
        expect(st.record.random_direction![key]).toBe(with2[i]!.record.random_direction![key]);
      }
    });
  });

  it("change with the seed (the key includes it)", async () => {
    const a = await run({ layers: [3], seed: 0 });
    const b = await run({ layers: [3], seed: 1 });
    expect(a[0]!.record.random_direction!["tuned->base resid_post 3"]).not.toBe(
      b[0]!.record.random_direction!["tuned->base resid_post 3"],
    );
    expect(a[0]!.record.gains).toEqual(b[0]!.record.gains);
  });

  it("batches are planned whole and identically for every shard", () => {
    expect(planBatches(pairs, 3)).toEqual([
      [0, 3],
      [3, 6],
      [6, 7],
    ]);
    // a budget splits batches before it is exceeded (here: at most 2 pairs' worth)
    expect(planBatches(pairs, 3, 2.5, (rows) => rows / 2)).toEqual([
      [0, 2],
      [2, 4],
      [4, 6],
      [6, 7],
    ]);
    expect(() => planBatches(pairs, 3, 0.5, (rows) => rows / 2)).toThrow(/pair at line 1 .* needs/);
  });
});

describe("the prompt/response seam", () => {
  it("on the real HH-RLHF file, prompt ids + response ids are the joint text's tokenization, for both responses", () => {
    const tok = loadTokenizer(MODEL)!;
    const { pairs: raw } = readPairs("fixtures/data/hh-rlhf/harmless-base-test.jsonl.gz", { skipBad: true });
    let dummyPrefixes = 0;
    for (const r of raw.slice(0, 150)) {
      const t = tokenizeTextPair(tok, r.prompt!, r.chosen!, r.rejected!);
      expect([...t.promptIds, ...t.chosenIds]).toEqual(tok.encode(r.prompt! + r.chosen!));
      expect([...t.promptIds, ...t.rejectedIds]).toEqual(tok.encode(r.prompt! + r.rejected!));
      expect(t.promptIds.length).toBeGreaterThan(0);
      // what separate tokenization would have added: a lone "▁" before a response that starts with a space
      if (
        tok.encode(r.chosen!, { addSpecialTokens: false })[0] === tok.encode(" ", { addSpecialTokens: false })[0] &&
        t.chosenIds[0] !== tok.encode(" ", { addSpecialTokens: false })[0]
      )
        dummyPrefixes++;
    }
    expect(dummyPrefixes).toBeGreaterThan(50); // the bug the joint tokenization fixes is real on this data
    const ok = tokenizeTextPair(tok, "Human: hi\n\nAssistant:", " Ok", " No");
    expect(ok.chosenIds.map((id) => tok.idToToken(id))).toEqual(["▁O", "k"]);
  });
});

describe("the engine's strategies", () => {
  it("give exactly the gains of one resumed forward per combo, for every site, both directions and every patch kind", async () => {
    const { makePlan, scoreBatch } = await import("../src/analysis/scoring.js");
    const { DEFAULT_LIMITS, headGroup, layerActivationBytes, stackGroup } = await import("../src/engine/limits.js");
    const { sweepBatch, sweepInput } = await import("../src/analysis/sweep.js");
    const { interpolate, meanAblation } = await import("../src/analysis/patches.js");
    const { randomDirectionPatch } = await import("../src/analysis/controls.js");
    const tf = await import("@tensorflow/tfjs-core");
    const s = resolveSettings(
      {
        sites: ["resid_post", "resid_pre", "attn_out", "mlp_out"],
        directions: ["tuned->base", "base->tuned"],
        positions: "response",
      },
      base.config,
    );
    const plan = makePlan(s, base.config.numLayers);
    const sc = scoreBatch({ base, tuned }, pairs.slice(0, 1), plan, s);
    const [R, T] = [sc.batch.ids.length, sc.batch.T];
    const headCopyBytes = 8 * R * T * base.config.hiddenSize; // headGroup's per copy
    const mu = tf.fill([base.config.hiddenSize], 0.1) as import("@tensorflow/tfjs-core").Tensor1D;
    try {
      const before = tf.memory().numTensors;
      const first = () => interpolate(0.7);
      for (const patchFor of [first, randomDirectionPatch(s, sc, base.config.hiddenSize), () => meanAblation(1, mu)]) {
        const perRun = sweepBatch({ base, tuned }, sweepInput(sc), plan.combos, patchFor, s, { strategy: "per-run" });
        expect(perRun.flat().some((g) => Math.abs(g) > 1e-3)).toBe(true);
        for (const strategy of ["stacked", "layer-major"] as const)
          expectSame(
            sweepBatch({ base, tuned }, sweepInput(sc), plan.combos, patchFor, s, { strategy }),
            perRun,
            `${strategy} gains`,
          );
        if (patchFor !== first) continue;
        // with the head taking 3 runs at a time and its logits 5 rows at a time (as at a 128k vocabulary), or
        // each layer 1 or 3 runs (attn_out and mlp_out runs joining in every group), the same
        const three = {
          stackBytes: 3 * headCopyBytes,
          head: { ...DEFAULT_LIMITS.head, elements: 5 * (base.config.vocabSize + DEFAULT_LIMITS.head.size) },
        };
        expect(headGroup(base.config, R, T, three)).toBe(3);
        for (const strategy of ["stacked", "layer-major"] as const)
          expectSame(
            sweepBatch({ base, tuned, limits: three }, sweepInput(sc), plan.combos, patchFor, s, { strategy }),
            perRun,
            `${strategy} gains, head 3 runs`,
          );
        const one = layerActivationBytes(base.config, R, T);
        for (const copies of [1, 3]) {
          const limits = { ...DEFAULT_LIMITS, stackBytes: copies * one };
          expect(stackGroup(base.config, R, T, limits)).toBe(copies);
          for (const strategy of ["stacked", "layer-major"] as const)
            expectSame(
              sweepBatch({ base, tuned, limits }, sweepInput(sc), plan.combos, patchFor, s, { strategy }),
              perRun,
              `${strategy} gains, ${copies} per layer call`,
            );
        }
      }
      // the logit lens likewise: all depths stacked, or 2 at a time with the logits 7 rows at a time
      const { logitLensBatch } = await import("../src/analysis/lens.js");
      const all = logitLensBatch({ base, tuned }, sc, s);
      const two = {
        stackBytes: 2 * headCopyBytes,
        head: { ...DEFAULT_LIMITS.head, elements: 7 * (base.config.vocabSize + DEFAULT_LIMITS.head.size) },
      };
      expect(headGroup(base.config, R, T, two)).toBe(2);
      expectSame(logitLensBatch({ base, tuned, limits: two }, sc, s), all, "lens");
      expect(tf.memory().numTensors).toBe(before);
    } finally {
      sc.dispose();
      mu.dispose();
    }
  });
});
