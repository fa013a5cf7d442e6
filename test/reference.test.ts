// Against the shared reference outputs of an independent float64 HF-equivalent implementation.
import { describe, expect, it } from "vitest";
import { loadModelSync } from "../src/io/model.js";
import { readSafetensors } from "../src/io/safetensors.js";
import { disposeModel } from "../src/model/llama.js";
import { logitsAndResid } from "../src/model/resid.js";
import { maxAbsDiff, useBackend } from "./helpers.js";

useBackend();

describe.each(["llama-tiny-a", "llama-tiny-b"])("%s reference outputs", (name) => {
  it("logits and resid agree to 1e-4", () => {
    const dir = `fixtures/models/${name}`;
    const exp = readSafetensors(`${dir}/expected.safetensors`);
    const ids = Array.from(exp.get("input_ids")!.data as Int32Array);
    const model = loadModelSync(dir);
    const { logits, resid } = logitsAndResid(model, ids, true);
    expect(logits.shape).toEqual(exp.get("logits")!.shape);
    expect(resid!.shape).toEqual(exp.get("resid")!.shape);
    expect(maxAbsDiff(logits.dataSync(), exp.get("logits")!.data as Float32Array)).toBeLessThanOrEqual(1e-4);
    expect(maxAbsDiff(resid!.dataSync(), exp.get("resid")!.data as Float32Array)).toBeLessThanOrEqual(1e-4);
    logits.dispose();
    resid!.dispose();
    disposeModel(model);
  });
});
