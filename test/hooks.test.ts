// Hook names: the list a model exposes is pinned, the forward pass visits exactly those sites in that order,
// names are checked, and a forward result's cache is owned (and freed) by the caller.
import * as tf from "@tensorflow/tfjs-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { BackendError, explainBackendError, noteBackendMessage } from "../src/model/backend.js";
import { loadModelSync } from "../src/io/model.js";
import { ActivationCache, hookName, hookNames, isHookName } from "../src/model/hooks.js";
import { disposeModel, forward, type LlamaModel } from "../src/model/llama.js";
import { useBackend } from "./helpers.js";

const processConsole = { warn: console.warn, error: console.error }; // before any backend starts
useBackend();

let model: LlamaModel;
beforeAll(() => (model = loadModelSync("fixtures/models/llama-tiny-b")));
afterAll(() => disposeModel(model));

describe("hook names", () => {
  it("hookNames lists every site of a 2-layer model, in forward order", () => {
    expect(hookNames({ numLayers: 2 })).toEqual([
      "hook_embed",
      "blocks.0.hook_resid_pre",
      "blocks.0.attn.hook_z",
      "blocks.0.hook_attn_out",
      "blocks.0.hook_resid_mid",
      "blocks.0.hook_mlp_out",
      "blocks.0.hook_resid_post",
      "blocks.1.hook_resid_pre",
      "blocks.1.attn.hook_z",
      "blocks.1.hook_attn_out",
      "blocks.1.hook_resid_mid",
      "blocks.1.hook_mlp_out",
      "blocks.1.hook_resid_post",
      "ln_final.hook_normalized",
    ]);
    expect(hookName("resid_post", 3)).toBe("blocks.3.hook_resid_post");
    expect(hookName("z", 0)).toBe("blocks.0.attn.hook_z");
    expect(() => hookName("mlp_out", -1)).toThrow(/layer/);
    expect(isHookName("blocks.2.hook_mlp_out")).toBe(true);
    expect(isHookName("blocks.2.hook_mlp")).toBe(false);
  });

  it("one forward pass visits exactly hookNames(config), in that order", () => {
    const seen: string[] = [];
    const hooks = Object.fromEntries(
      hookNames(model.config).map((n) => [n, (v: tf.Tensor, site: string) => (seen.push(site), v)]),
    );
    const r = forward(model, [[1, 2, 3]], { hooks });
    r.dispose();
    expect(seen).toEqual(hookNames(model.config));
  });

  it("a hook or cache name that is not a site of the model is an error, not a silent no-op", () => {
    const L = model.config.numLayers;
    expect(() => forward(model, [[1, 2]], { hooks: { "blocks.0.hook_mlp": (v) => v } })).toThrow(
      /unknown hook site "blocks.0.hook_mlp"/,
    );
    expect(() => forward(model, [[1, 2]], { hooks: { [hookName("mlp_out", L)]: (v) => v } })).toThrow(
      /unknown hook site/,
    );
    expect(() => forward(model, [[1, 2]], { cache: ["resid_post"] })).toThrow(/unknown hook site "resid_post"/);
  });
});

describe("the head at scored positions", () => {
  it("norms only the gathered positions unless ln_final is watched, with the same log-probs bit for bit; a hook there still acts", () => {
    const ids = [
      [5, 9, 2, 7, 1, 3],
      [4, 4, 8, 6, 2, 0],
    ];
    const logitsAt: Array<[number, number]> = [
      [0, 2],
      [0, 5],
      [1, 0],
      [1, 4],
    ];
    const targets = [3, 1, 7, 2];
    const run = (opts: Parameters<typeof forward>[2]) => {
      const r = forward(model, ids, { logitsAt, targets, ...opts });
      const lp = Array.from(r.logprobs!);
      r.dispose();
      return lp;
    };
    const plain = run({});
    expect(run({ cache: ["ln_final.hook_normalized"] })).toEqual(plain);
    expect(run({ hooks: { "ln_final.hook_normalized": (v) => v } })).toEqual(plain);
    expect(run({ hooks: { "ln_final.hook_normalized": (v) => tf.mul(v, 2) } })).not.toEqual(plain);
  });
});

describe("ownership of cached activations", () => {
  it("the caller owns logits and cache; dispose() frees every tensor the call made", () => {
    const before = tf.memory().numTensors;
    const r = forward(
      model,
      [
        [1, 2, 3],
        [4, 5, 6],
      ],
      { cache: (n) => n.endsWith("hook_resid_post") || n === "hook_embed" },
    );
    expect(r.cache.names()).toEqual([
      "hook_embed",
      ...Array.from({ length: model.config.numLayers }, (_, l) => hookName("resid_post", l)),
    ]);
    expect(r.cache.get("blocks.0.hook_resid_post").shape).toEqual([2, 3, model.config.hiddenSize]);
    expect(() => r.cache.get("blocks.0.hook_mlp_out")).toThrow(/not cached/);
    expect(tf.memory().numTensors).toBe(before + 1 + model.config.numLayers + 1); // logits + cached sites
    const kept = r.cache.take("hook_embed");
    r.dispose();
    expect(tf.memory().numTensors).toBe(before + 1);
    kept.dispose();
    expect(tf.memory().numTensors).toBe(before);
  });

  it("ActivationCache.set replaces (and frees) an older value under the same name", () => {
    const c = new ActivationCache();
    const a = tf.scalar(1);
    c.set("hook_embed", a);
    c.set("hook_embed", tf.scalar(2));
    expect(a.isDisposed).toBe(true);
    expect(c.size).toBe(1);
    c.dispose();
    expect(c.size).toBe(0);
  });
});

describe("backend failures", () => {
  it("an XNNPACK failure message (wasm's only signal of a failed matmul) makes the forward pass an error, not wrong numbers", () => {
    // as the wasm runtime prints it (its stderr printer is the filter it was made with)
    const print = noteBackendMessage(
      "XNN status for xnn_create_fully_connected_nc_f32 is not successful. Got status 6. Use -c dbg to see XNN logs.",
    );
    expect(print).toBe(false);
    const before = tf.memory().numTensors;
    expect(() => forward(model, [[1, 2, 3]])).toThrow(
      /the backend failed during a forward pass, so its numbers cannot be trusted \(XNN status .* status 6/,
    );
    expect(tf.memory().numTensors).toBe(before);
    const r = forward(model, [[1, 2, 3]]); // the fault is reported once
    expect(r.logits!.shape).toEqual([1, 3, model.config.vocabSize]);
    r.dispose();
  });

  it("starting a backend leaves the process's console as it was; only the runtime's own lines are filtered", () => {
    expect(console.warn).toBe(processConsole.warn);
    expect(console.error).toBe(processConsole.error);
    expect(noteBackendMessage("Aborted()")).toBe(false);
    expect(noteBackendMessage("Aborted(OOM)")).toBe(false);
    expect(noteBackendMessage("something else the runtime says")).toBe(true);
  });

  it("the wasm runtime's own out-of-heap errors become one sentence that says what ran out and what to lower", () => {
    for (const e of [
      new WebAssembly.RuntimeError("memory access out of bounds"),
      new Error("Aborted(). Build with -sASSERTIONS for more info."),
    ]) {
      const got = explainBackendError(e);
      expect(got).toBeInstanceOf(BackendError);
      expect((got as Error).message).toMatch(
        /^the wasm backend ran out of its 4 GiB heap.*: a smaller memoryBudget, batchPairs or maxTokens needs less/,
      );
      expect((got as Error).message).not.toContain("\n");
    }
    const other = new Error('tensor "x" has shape [2]');
    expect(explainBackendError(other)).toBe(other);
  });
});
