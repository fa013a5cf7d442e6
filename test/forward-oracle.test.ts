// The tfjs forward pass against the naive float64 oracle on random configurations and inputs, loaded from
// freshly written HF folders (F32/F16/BF16, single file or sharded), batched with right padding: logits and every
// hook site, TransformerLens's inner ones (q/k/v before and after RoPE, scores, pattern, the MLP's) included.
import * as tf from "@tensorflow/tfjs-core";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import type { OracleConfig } from "./oracle.js";
import { arbCase } from "./random-model.js";
import { checkAgainstOracle } from "./oracle-check.js";
import { useBackend } from "./helpers.js";

useBackend();

describe("forward pass vs float64 oracle", () => {
  it("agrees on logits and every site for random configs (grouped-query too), dtypes, shards and padded batches", () => {
    fc.assert(
      fc.property(arbCase, ({ cfg, seed, dtype, shards, rows }) => checkAgainstOracle(cfg, seed, dtype, shards, rows)),
      { numRuns: 40, seed: 20261125 },
    );
  });

  it("attention by one 2-D matmul per (row, kv head) agrees too, and so does the batched form (which holds the patterns)", () => {
    fc.assert(
      fc.property(
        arbCase,
        fc.constantFrom("grouped" as const, "batched" as const),
        ({ cfg, seed, dtype, shards, rows }, attention) =>
          checkAgainstOracle(cfg, seed, dtype, shards, rows, attention),
      ),
      { numRuns: 30, seed: 20261126 },
    );
  });

  it("grouped-query attention (6 query heads on 2 kv heads, biases on) on both paths, a short row padded far", () => {
    const cfg: OracleConfig = {
      hidden: 12,
      inter: 10,
      layers: 2,
      heads: 6,
      kvHeads: 2,
      headDim: 4,
      vocab: 20,
      eps: 1e-5,
      theta: 10000,
      rope: { kind: "default" },
      tied: false,
      attnBias: true,
      mlpBias: true,
    };
    const rows = [Array.from({ length: 11 }, (_, i) => (i * 3 + 1) % 20), [4, 9]];
    for (const attention of ["grouped", "batched"] as const) checkAgainstOracle(cfg, 11, "F32", 1, rows, attention);
  });

  it("agrees with llama3 RoPE scaling well past the original context (T = 70 > 16)", () => {
    const cfg: OracleConfig = {
      hidden: 16,
      inter: 24,
      layers: 2,
      heads: 4,
      kvHeads: 2,
      headDim: 6,
      vocab: 30,
      eps: 1e-5,
      theta: 500000,
      rope: { kind: "llama3", factor: 8, low: 1, high: 4, orig: 16 },
      tied: true,
      attnBias: false,
      mlpBias: false,
    };
    const ids = Array.from({ length: 70 }, (_, i) => (i * 7 + 3) % 30);
    checkAgainstOracle(cfg, 7, "BF16", 2, [ids, ids.slice(0, 41)]);
  });

  it("leaves no tensors behind", () => {
    const before = tf.memory().numTensors;
    const cfg: OracleConfig = {
      hidden: 8,
      inter: 8,
      layers: 2,
      heads: 2,
      kvHeads: 1,
      headDim: 4,
      vocab: 12,
      eps: 1e-5,
      theta: 10000,
      rope: { kind: "default" },
      tied: false,
      attnBias: true,
      mlpBias: true,
    };
    checkAgainstOracle(cfg, 3, "F32", 1, [[1, 2, 3], [4]]);
    expect(tf.memory().numTensors).toBe(before);
  });
});
