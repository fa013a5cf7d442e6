// The same numerical checks, small cases only, on the plain-JS cpu backend: the model code is backend-agnostic.
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import * as tf from "@tensorflow/tfjs-core";
import { loadModelSync } from "../src/io/model.js";
import { readSafetensors } from "../src/io/safetensors.js";
import { disposeModel } from "../src/model/llama.js";
import { logitsAndResid } from "../src/model/resid.js";
import { arbCase } from "./random-model.js";
import { checkAgainstOracle } from "./oracle-check.js";
import { maxAbsDiff, useBackend } from "./helpers.js";

useBackend("cpu");

describe("cpu backend", () => {
  it("runs on cpu", () => expect(tf.getBackend()).toBe("cpu"));

  it("matches the float64 oracle on random small configs", () => {
    fc.assert(
      fc.property(arbCase, ({ cfg, seed, dtype, shards, rows }) => checkAgainstOracle(cfg, seed, dtype, shards, rows)),
      { numRuns: 8, seed: 7 },
    );
  });

  it.each(["llama-tiny-a", "llama-tiny-b"])("matches the %s reference to 1e-4", (name) => {
    const dir = `fixtures/models/${name}`;
    const exp = readSafetensors(`${dir}/expected.safetensors`);
    const model = loadModelSync(dir);
    const { logits, resid } = logitsAndResid(model, Array.from(exp.get("input_ids")!.data as Int32Array), true);
    expect(maxAbsDiff(logits.dataSync(), exp.get("logits")!.data as Float32Array)).toBeLessThanOrEqual(1e-4);
    expect(maxAbsDiff(resid!.dataSync(), exp.get("resid")!.data as Float32Array)).toBeLessThanOrEqual(1e-4);
    tf.dispose([logits, resid!]);
    disposeModel(model);
  });
});
