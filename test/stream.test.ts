// Streamed models (weights in Node memory in their file dtype, layers brought into the backend on demand)
// compute exactly what resident models compute: every site and the logits, resumed runs, the whole analysis.
import * as fs from "node:fs";
import * as tf from "@tensorflow/tfjs-core";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { tempDir } from "./tempdirs.js";
import { backendCopies, loadModelSync, residentBytes } from "../src/io/model.js";
import { loadPairs } from "../src/io/pairs.js";
import { layerBytesOf, shareResidency, STORED_HEAD_ROWS, StoredWeights, StreamedWeights } from "../src/io/stream.js";
import { nativeMatMulActive, nativeStatus, useNativeKernels } from "../src/model/native.js";
import { loadConfig } from "../src/io/config.js";
import { hookNames } from "../src/model/hooks.js";
import { disposeModel, forward, type LlamaModel } from "../src/model/llama.js";
import { expectedTensors, weightRefs } from "../src/model/weights.js";
import { runAnalysis } from "../src/analysis/run.js";
import { DEFAULT_LIMITS } from "../src/engine/limits.js";
import { arbCase, arbConfig, randomWeights, writeModelFolder } from "./random-model.js";
import { budgetFor, expectClose, expectSame, useBackend } from "./helpers.js";

useBackend();

const configOf = (dir: string) => loadConfig(dir);

/** A budget that holds one layer and an eighth of the head: the head is streamed in 8 vocabulary chunks. */
function chunkedBudget(dir: string): number {
  const cfg = configOf(dir);
  return (
    backendCopies() * (4 * cfg.hiddenSize + Math.ceil(cfg.vocabSize / 8) * 4 * cfg.hiddenSize + layerBytesOf(cfg) + 1)
  );
}

describe("streamed = resident", () => {
  it("every hook site and the logits, bit for bit, on random configs, dtypes and shards (one layer resident at a time)", () => {
    fc.assert(
      fc.property(arbCase, ({ cfg, seed, dtype, shards, rows }) => {
        const dir = writeModelFolder({ cfg, seed, dtype, shards }, randomWeights(cfg, seed));
        const resident = loadModelSync(dir);
        const streamed = loadModelSync(dir, { stream: "bring-in", memoryBudget: budgetFor(dir, 1) });
        const chunked = loadModelSync(dir, { stream: "bring-in", memoryBudget: chunkedBudget(dir) });
        try {
          expect(streamed.source).toBeDefined();
          expect(streamed.source!.headChunks).toBeUndefined();
          expect(chunked.source!.headChunks).toBe(Math.ceil(cfg.vocab / Math.ceil(cfg.vocab / 8)));
          const T = Math.max(...rows.map((r) => r.length));
          const ids = rows.map((r) => [...r, ...new Array(T - r.length).fill(0)]);
          const opts = { lengths: rows.map((r) => r.length), cache: hookNames(resident.config) };
          const a = forward(resident, ids, opts);
          const b = forward(streamed, ids, opts);
          expect(b.logits!.dataSync()).toEqual(a.logits!.dataSync());
          const c = forward(chunked, ids, { lengths: opts.lengths });
          expectSame(c.logits!.dataSync(), a.logits!.dataSync(), "chunked logits"); // the head in other calls

          c.dispose();
          for (const n of a.cache.names()) expect(b.cache.get(n).dataSync(), n).toEqual(a.cache.get(n).dataSync());
          // resuming at the last layer reuses a layer brought in before
          const L = resident.config.numLayers;
          const start = { layer: L - 1, resid: a.cache.get(`blocks.${L - 1}.hook_resid_pre`) };
          const ra = forward(resident, ids, { lengths: opts.lengths, start });
          const rb = forward(streamed, ids, { lengths: opts.lengths, start });
          expect(rb.logits!.dataSync()).toEqual(ra.logits!.dataSync());
          for (const r of [a, b, ra, rb]) r.dispose();
          if (L > 1) expect((streamed.source as StreamedWeights).stats.evictions).toBeGreaterThan(0);
        } finally {
          disposeModel(resident);
          disposeModel(streamed);
          disposeModel(chunked);
          fs.rmSync(dir, { recursive: true, force: true });
        }
      }),
      { numRuns: 15, seed: 20261127 },
    );
  });

  it("scored log-probs (forward's targets): the same bits for every head chunking and vocabulary block, and a float64 log-softmax of the logits", () => {
    fc.assert(
      fc.property(
        arbCase,
        fc.integer({ min: 2, max: 9 }),
        fc.integer({ min: 3, max: 200 }),
        ({ cfg, seed, dtype, shards, rows }, chunks, block) => {
          const dir = writeModelFolder({ cfg, seed, dtype, shards }, randomWeights(cfg, seed));
          const V = cfg.vocab;
          const headBudget =
            backendCopies() *
            (4 * cfg.hidden + Math.ceil(V / chunks) * 4 * cfg.hidden + layerBytesOf(loadConfig(dir)) + 1);
          const resident = loadModelSync(dir);
          const chunked = loadModelSync(dir, { stream: "bring-in", memoryBudget: headBudget });
          try {
            const T = Math.max(...rows.map((r) => r.length));
            const ids = rows.map((r) => [...r, ...new Array(T - r.length).fill(0)]);
            const at = rows.flatMap((r, b) => r.map((_, t): [number, number] => [b, t]));
            const targets = at.map(([b, t]) => (ids[b]![t]! * 7 + t) % V);
            const opts = { lengths: rows.map((r) => r.length), logitsAt: at, targets };
            const whole = forward(resident, ids, opts).logprobs!;
            // float64 oracle from the float32 logits: log p = x_t − (max + log Σ exp(x − max))
            const lg = forward(resident, ids, { lengths: opts.lengths, logitsAt: at });
            const x = lg.logits!.dataSync();
            lg.dispose();
            targets.forEach((t, i) => {
              const row = Array.from(x.subarray(i * V, (i + 1) * V));
              const m = Math.max(...row);
              const want = row[t]! - (m + Math.log(row.reduce((acc, v) => acc + Math.exp(v - m), 0)));
              expect(Math.abs(whole[i]! - want)).toBeLessThan(1e-5 * Math.max(1, Math.abs(want)));
            });
            const a = forward(resident, ids, { ...opts, headBlock: { size: block, elements: 2 ** 22 } }).logprobs!; // blocks that straddle chunks, and a ragged last block
            const loads = (chunked.source as StreamedWeights).stats.loads;
            const b = forward(chunked, ids, {
              ...opts,
              headBlock: { size: block, elements: 3 * (Math.ceil(V / chunks) + block) },
            }).logprobs!; // and the rows 3 at a time through each chunk
            // each layer and head chunk brought in once, however many slices of rows go through the chunk
            expect((chunked.source as StreamedWeights).stats.loads - loads).toBeLessThanOrEqual(
              cfg.layers + chunked.source!.headChunks!,
            );
            expect(chunked.source?.headChunks ?? 1).toBeGreaterThan(1);
            expectSame(Array.from(b), Array.from(a), "chunked log-probs");
            a.forEach((v, i) => expect(Math.abs(v - whole[i]!)).toBeLessThan(1e-5 * Math.max(1, Math.abs(v))));
          } finally {
            disposeModel(resident);
            disposeModel(chunked);
            fs.rmSync(dir, { recursive: true, force: true });
          }
        },
      ),
      { numRuns: 12, seed: 20261125 },
    );
  });

  it("the whole analysis on the demo pair is the same with both models streamed two layers at a time, with the head in chunks, or sharing one layer's room", async () => {
    const base = "fixtures/models/stories260k";
    const pairs = loadPairs("fixtures/data/stories/test.jsonl", base, { limit: 3 });
    const settings = { sites: ["resid_post" as const], bootstrap: 100, stabilityReps: 2 };
    const load = (dir: string, budget?: number) =>
      loadModelSync(dir, budget ? { stream: "bring-in", memoryBudget: budget } : {});
    const budget = budgetFor(base, 2);
    const resident = [load(base), load("fixtures/models/stories260k-dpo")] as const;
    const streamed = [load(base, budget), load("fixtures/models/stories260k-dpo", budget)] as const;
    try {
      const a = await runAnalysis(resident[0], resident[1], pairs, settings);
      const b = await runAnalysis(streamed[0], streamed[1], pairs, settings);
      const strip = (r: typeof a) => ({ ...r, timings_ms: {} });
      expectSame(strip(b), strip(a), "streamed analysis"); // streamed models are swept layer-major, runs stacked
      const chunked = [
        load(base, chunkedBudget(base)),
        load("fixtures/models/stories260k-dpo", chunkedBudget(base)),
      ] as const;
      try {
        expect(chunked[0].source!.headChunks).toBe(8);
        expectSame(strip(await runAnalysis(chunked[0], chunked[1], pairs, settings)), strip(a), "chunked analysis");
      } finally {
        for (const m of chunked) disposeModel(m);
      }
      expect((streamed[0].source as StreamedWeights).stats.loads).toBeGreaterThan(resident[0].config.numLayers);
      // both models sharing one unit's room (as a run's threads do): the same numbers, one layer on the backend
      // after a forward of the layers, one head chunk after the head
      const shared = [
        load(base, chunkedBudget(base)),
        load("fixtures/models/stories260k-dpo", chunkedBudget(base)),
      ] as const;
      try {
        shareResidency(shared.map((m) => m.source));
        const held = tf.memory().numBytes;
        const layer = layerBytesOf(shared[0].config);
        const chunk = (4 * shared[0].config.vocabSize * shared[0].config.hiddenSize) / 8;
        for (const m of shared) forward(m, [[1, 2, 3]], { logitsAt: "none" }).dispose();
        expect(tf.memory().numBytes - held).toBe(layer);
        for (const m of shared) forward(m, [[1, 2, 3]]).dispose();
        expect(tf.memory().numBytes - held).toBe(chunk);
        expectSame(strip(await runAnalysis(shared[0], shared[1], pairs, settings)), strip(a), "shared-room analysis");
        expect(tf.memory().numBytes - held).toBeLessThanOrEqual(layer);
      } finally {
        for (const m of shared) disposeModel(m);
      }
    } finally {
      for (const m of [...resident, ...streamed]) disposeModel(m);
    }
  });

  it("per-head patching and the low-rank stage (at the last layer: the head alone), layer-major on streamed models, give the resident numbers a copy at a time", async () => {
    const base = "fixtures/models/stories260k";
    const pairs = loadPairs("fixtures/data/stories/test.jsonl", base, { limit: 2 });
    const settings = { heads: true, pcaLayer: 4, controls: false, bootstrap: 100, stabilityReps: 2 };
    const load = (dir: string, budget?: number) =>
      loadModelSync(dir, budget ? { stream: "bring-in", memoryBudget: budget } : {});
    const resident = [load(base), load("fixtures/models/stories260k-dpo")] as const;
    const streamed = [
      load(base, budgetFor(base, 2)),
      load("fixtures/models/stories260k-dpo", budgetFor(base, 2)),
    ] as const;
    try {
      const strip = (r: Awaited<ReturnType<typeof runAnalysis>>) => ({ ...r, timings_ms: {} });
      const a = strip(await runAnalysis(resident[0], resident[1], pairs, settings));
      expect(a.pairs[0]!.heads).not.toBeNull();
      expect(a.pca!.layer).toBe(resident[0].config.numLayers - 1);
      // (with the default limits the whole-analysis test above covers several groups in one wave)
      const limits = { ...DEFAULT_LIMITS, stackBytes: 1 }; // one copy per layer call, head pass and wave
      expectSame(
        strip(await runAnalysis(streamed[0], streamed[1], pairs, settings, {}, { limits })),
        a,
        "streamed heads and low rank",
      );
    } finally {
      for (const m of [...resident, ...streamed]) disposeModel(m);
    }
  });

  it("a model loaded with `shared` lends its stored bytes (SharedArrayBuffers) to a second load that reads no weight file, with equal outputs", () => {
    const dir = "fixtures/models/stories260k";
    const a = loadModelSync(dir, { stream: "bring-in", memoryBudget: chunkedBudget(dir), shared: true });
    const stored = (a.source as StreamedWeights).stored!;
    const cfg = configOf(dir);
    expect(new Set(stored.keys())).toEqual(
      new Set([...expectedTensors(cfg).keys()].filter((n) => !(cfg.tieWordEmbeddings && n === "lm_head.weight"))),
    );
    for (const t of stored.values()) expect(t.bytes.buffer).toBeInstanceOf(SharedArrayBuffer);
    // a folder holding only config.json: the second model can only come from the stored bytes
    const bare = tempDir("bare");
    fs.copyFileSync(`${dir}/config.json`, `${bare}/config.json`);
    const b = loadModelSync(bare, { stream: "bring-in", memoryBudget: chunkedBudget(dir), stored });
    try {
      expect(() => loadModelSync(bare, { stream: "bring-in", memoryBudget: chunkedBudget(dir) })).toThrow(
        /no model.safetensors/,
      );
      const ids = [
        [1, 5, 9, 200, 3],
        [4, 4, 4, 4, 4],
      ];
      const ra = forward(a, ids);
      const rb = forward(b, ids);
      expect(rb.logits!.dataSync()).toEqual(ra.logits!.dataSync());
      ra.dispose();
      rb.dispose();
      expect(() => loadModelSync(bare, { stored })).toThrow(/only for a streamed model/);
    } finally {
      disposeModel(a);
      disposeModel(b);
      fs.rmSync(bare, { recursive: true, force: true });
    }
  });

  it("a streamed model keeps its budget, frees everything on dispose, and refuses whole-model operations", () => {
    const dir = "fixtures/models/stories260k";
    const before = tf.memory().numTensors;
    const m: LlamaModel = loadModelSync(dir, { stream: "bring-in", memoryBudget: budgetFor(dir, 2) });
    const src = m.source as StreamedWeights;
    expect(src.capacity).toBe(2);
    expect(backendCopies() * residentBytes(m.config)).toBeGreaterThan(budgetFor(dir, 2));
    forward(m, [[1, 2, 3]]).dispose();
    expect(src.stats.loads).toBe(m.config.numLayers);
    expect(() => weightRefs(m)).toThrow(/streamed/);
    disposeModel(m);
    expect(tf.memory().numTensors).toBe(before);
  });
});

describe.skipIf(!nativeStatus().ok)(
  `read in place by the native matmul${nativeStatus().ok ? "" : " (not run: the native matmul is not built here)"}`,
  () => {
    // both models on the native kernel, also in a suite run with PREFPROBE_BACKEND=wasm: a model read in place
    // exists only beside it
    let was = false;
    beforeAll(() => {
      was = nativeMatMulActive();
      useNativeKernels(true);
    });
    afterAll(() => useNativeKernels(was));
    const inPlace = (dir: string) => loadModelSync(dir, { stream: "in-place", memoryBudget: 1 }); // any budget streams it

    // Not bit for bit: on AVX-512 machines OpenBLAS 0.3.21 sends small products (M·N·K up to ~10^6) to
    // small-matrix kernels that sum a transposed B (the stored [out, in] layout) in another order than the
    // resident [in, out] one, which moved a logit of a 32-wide model by 9e-8 (seen on a SkylakeX build).
    it("every hook site, the logits and scored log-probs, to float32 rounding, on random configs, dtypes and shards, with no weight on the backend", () => {
      fc.assert(
        fc.property(arbCase, ({ cfg, seed, dtype, shards, rows }) => {
          const dir = writeModelFolder({ cfg, seed, dtype, shards }, randomWeights(cfg, seed));
          const before = tf.memory().numBytes;
          const resident = loadModelSync(dir);
          const held = tf.memory().numBytes;
          const stored = inPlace(dir);
          try {
            expect(stored.source).toBeInstanceOf(StoredWeights);
            forward(stored, [[0]]).dispose();
            // on the backend: the final norm and, once a layer is used, its norms and biases (no matrix)
            const small =
              4 * cfg.hidden * (1 + 2 * cfg.layers) +
              4 *
                cfg.layers *
                ((cfg.attnBias ? cfg.heads * cfg.headDim + 2 * cfg.kvHeads * cfg.headDim + cfg.hidden : 0) +
                  (cfg.mlpBias ? 2 * cfg.inter + cfg.hidden : 0));
            expect(tf.memory().numBytes - held).toBeLessThanOrEqual(small);
            const T = Math.max(...rows.map((r) => r.length));
            const ids = rows.map((r) => [...r, ...new Array(T - r.length).fill(0)]);
            const opts = { lengths: rows.map((r) => r.length), cache: hookNames(resident.config) };
            const a = forward(resident, ids, opts);
            const b = forward(stored, ids, opts);
            expectClose(b.logits!.dataSync(), a.logits!.dataSync(), "logits");
            for (const n of a.cache.names()) expectClose(b.cache.get(n).dataSync(), a.cache.get(n).dataSync(), n);
            const at = rows.flatMap((r, i) => r.map((_, t): [number, number] => [i, t]));
            const targets = at.map(([i, t]) => (ids[i]![t]! * 5 + t) % cfg.vocab);
            expectClose(
              Array.from(forward(stored, ids, { lengths: opts.lengths, logitsAt: at, targets }).logprobs!),
              Array.from(forward(resident, ids, { lengths: opts.lengths, logitsAt: at, targets }).logprobs!),
              "log-probs",
            );
            a.dispose();
            b.dispose();
            expect(() => weightRefs(stored)).toThrow(/streamed/);
          } finally {
            disposeModel(resident);
            disposeModel(stored);
            fs.rmSync(dir, { recursive: true, force: true });
          }
          expect(tf.memory().numBytes).toBe(before);
        }),
        { numRuns: 15, seed: 20261203 },
      );
    });

    it(`a head of more than ${STORED_HEAD_ROWS} rows in chunks, tied or not, gives the whole head's bits`, () => {
      for (const tied of [true, false]) {
        const cfg = {
          ...fc.sample(arbConfig, { numRuns: 1, seed: 7 })[0]!,
          vocab: STORED_HEAD_ROWS + 777,
          hidden: 8,
          tied,
        };
        const dir = writeModelFolder({ cfg, seed: 3, dtype: "BF16", shards: 2 }, randomWeights(cfg, 3));
        const resident = loadModelSync(dir);
        const stored = inPlace(dir);
        try {
          expect(stored.source!.headChunks).toBe(2);
          const ids = [[1, 8900, 5, 8500, 2]];
          expect(forward(stored, ids).logits!.dataSync()).toEqual(forward(resident, ids).logits!.dataSync());
          const at: Array<[number, number]> = [
            [0, 0],
            [0, 3],
            [0, 4],
          ];
          const targets = [8300, 12, STORED_HEAD_ROWS + 700];
          expect(Array.from(forward(stored, ids, { logitsAt: at, targets }).logprobs!)).toEqual(
            Array.from(forward(resident, ids, { logitsAt: at, targets }).logprobs!),
          );
        } finally {
          disposeModel(resident);
          disposeModel(stored);
          fs.rmSync(dir, { recursive: true, force: true });
        }
      }
    });

    it("the whole analysis on the demo pair read in place equals the resident one (to float32 rounding: its sweeps stack runs)", async () => {
      const base = "fixtures/models/stories260k";
      const pairs = loadPairs("fixtures/data/stories/test.jsonl", base, { limit: 3 });
      const settings = {
        sites: ["resid_post" as const, "mlp_out" as const],
        bootstrap: 100,
        stabilityReps: 2,
        heads: true,
      };
      const resident = [loadModelSync(base), loadModelSync("fixtures/models/stories260k-dpo")] as const;
      const stored = [inPlace(base), inPlace("fixtures/models/stories260k-dpo")] as const;
      const strip = (r: Awaited<ReturnType<typeof runAnalysis>>) => ({ ...r, timings_ms: {} });
      try {
        const a = strip(await runAnalysis(resident[0], resident[1], pairs, settings));
        expectSame(strip(await runAnalysis(stored[0], stored[1], pairs, settings)), a, "in-place analysis");
      } finally {
        for (const m of [...resident, ...stored]) disposeModel(m);
      }
    });
  },
);
