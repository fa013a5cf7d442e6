// The intervention engine (src/engine/runs.ts) against full forward passes from the token ids: a run entering
// layer l with residual X and hooks is the whole model with blocks.l.hook_resid_pre replaced by X and the same
// hooks. Every strategy, tight and loose memory limits, a streamed model, errors and tensor ownership.
import * as tf from "@tensorflow/tfjs-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { makeBatch, type PairBatch } from "../src/data/batch.js";
import type { Pair } from "../src/data/pairs.js";
import { DEFAULT_LIMITS, layerActivationBytes } from "../src/engine/limits.js";
import { margins, marginsOfRun, residAfter, scored } from "../src/engine/margins.js";
import { runMargins, type Run, type Strategy } from "../src/engine/runs.js";
import { loadModelSync } from "../src/io/model.js";
import { margins as textMargins } from "../src/io/margins.js";
import { loadTokenizer } from "../src/io/tokenizer.js";
import { hookName } from "../src/model/hooks.js";
import { disposeModel, forward, type Hook, type LlamaModel } from "../src/model/llama.js";
import { budgetFor, DEMO, disposeDemo, expectClose, loadDemo, useBackend } from "./helpers.js";

useBackend();

let demo: { base: LlamaModel; tuned: LlamaModel; pairs: Pair[] };
let batch: PairBatch;
let tunedResid: tf.Tensor[]; // the tuned model's resid_post at each layer, the source of the patches
beforeAll(() => {
  demo = loadDemo(3);
  batch = makeBatch(demo.pairs);
  tunedResid = Array.from({ length: demo.base.config.numLayers }, (_, l) => residAfter(demo.tuned, batch, l));
});
afterAll(() => {
  tf.dispose(tunedResid);
  disposeDemo(demo);
});

/** A mix of runs: residual patches entering every layer (and the head), hooks below and above the entry. */
function someRuns(L: number): Run[] {
  const halve: Hook = (v) => tf.mul(v, 0.5);
  const shift: Hook = (v) => tf.add(v, 0.01);
  return [
    {
      name: "embed only",
      layer: 0,
      resid: () => tf.mul(tunedResid[0]!, 0.3),
      hooks: { [hookName("mlp_out", 1)]: halve },
    },
    ...Array.from({ length: L }, (_, l): Run => ({ name: `tuned resid ${l}`, layer: l + 1, resid: tunedResid[l]! })),
    {
      name: "z and resid_mid",
      layer: 1,
      resid: () => tf.mul(tunedResid[0]!, 1.1),
      hooks: { [hookName("z", 2)]: shift, [hookName("resid_mid", 3)]: halve },
    },
    { name: "attn at entry", layer: 2, resid: tunedResid[1]!, hooks: { [hookName("attn_out", 2)]: halve } },
    {
      name: "final norm",
      layer: L,
      resid: () => tf.mul(tunedResid[L - 1]!, 2),
      hooks: { "ln_final.hook_normalized": shift },
    },
  ];
}

/** The reference: a full forward from the ids with the run's entry as a resid_pre hook (resid_post of the last layer for the head). */
function reference(model: LlamaModel, run: Run): Float64Array {
  const L = model.config.numLayers;
  const X = typeof run.resid === "function" ? run.resid() : tf.clone(run.resid);
  const entry = run.layer < L ? hookName("resid_pre", run.layer) : hookName("resid_post", L - 1);
  try {
    const r = forward(model, batch.ids, { ...scored(batch), hooks: { ...run.hooks, [entry]: () => tf.clone(X) } });
    const m = marginsOfRun(r, batch);
    r.dispose();
    return m;
  } finally {
    X.dispose();
  }
}

describe("the intervention engine", () => {
  it("each named run's margins are a full forward's with its entry and hooks, for every strategy and limit", () => {
    const L = demo.base.config.numLayers;
    const runs = someRuns(L);
    const want = new Map(runs.map((r) => [r.name, reference(demo.base, r)]));
    // a run's margins move with what it patches (so agreement is not two copies of the unpatched margins)
    expect(Math.abs(want.get("tuned resid 0")![0]! - want.get(`tuned resid ${L - 1}`)![0]!)).toBeGreaterThan(1e-3);
    const one = layerActivationBytes(demo.base.config, batch.ids.length, batch.T);
    const limits = [DEFAULT_LIMITS, { ...DEFAULT_LIMITS, stackBytes: 1 }, { ...DEFAULT_LIMITS, stackBytes: 2 * one }];
    for (const strategy of ["auto", "per-run", "stacked", "layer-major"] as Strategy[]) {
      for (const lim of limits) {
        const before = tf.memory().numTensors;
        const got = runMargins(demo.base, batch, runs, { strategy, limits: lim });
        expect(tf.memory().numTensors, `${strategy}: every tensor the engine made is freed`).toBe(before);
        expect([...got.keys()].sort()).toEqual(runs.map((r) => r.name).sort());
        for (const r of runs) expectClose(got.get(r.name), want.get(r.name), `${strategy} ${lim.stackBytes} ${r.name}`);
      }
    }
    expect(tunedResid[0]!.isDisposed).toBe(false); // a tensor the caller gave stays the caller's
  });

  it("a streamed model goes layer-major by itself, with each layer brought in once per wave", () => {
    const L = demo.base.config.numLayers;
    const streamed = loadModelSync(DEMO.base, { stream: "bring-in", memoryBudget: budgetFor(DEMO.base, 2) });
    try {
      expect(streamed.source).toBeDefined();
      const runs = someRuns(L);
      const stats = (streamed.source as unknown as { stats: { loads: number } }).stats;
      const loads = stats.loads;
      const got = runMargins(streamed, batch, runs);
      expect(stats.loads - loads).toBeLessThanOrEqual(L + (streamed.source!.headChunks ?? 1));
      const resident = runMargins(demo.base, batch, runs, { strategy: "per-run" });
      for (const r of runs) expectClose(got.get(r.name), resident.get(r.name), r.name);
    } finally {
      disposeModel(streamed);
    }
  });

  it("margins() in one call equals scoring each pair alone, with or without hooks", () => {
    const hooks = { [hookName("mlp_out", 2)]: (v: tf.Tensor) => tf.zerosLike(v) };
    for (const h of [undefined, hooks]) {
      const all = margins(demo.base, demo.pairs, { hooks: h, batchPairs: 3 });
      demo.pairs.forEach((p, i) => expectClose(all[i], margins(demo.base, [p], { hooks: h })[0], `pair ${i}`));
    }
    expect(
      Math.abs(margins(demo.base, demo.pairs, { hooks })[0]! - margins(demo.base, demo.pairs)[0]!),
    ).toBeGreaterThan(1e-4);
    expect(() => margins(demo.base, demo.pairs, { batchPairs: 0 })).toThrow(/batchPairs/);
  });

  it("the package's margins() takes text pairs (with a tokenizer, or the model's own), a batch, or pairs alike", () => {
    const tok = loadTokenizer(DEMO.base)!;
    const text = demo.pairs.map((p) => ({ prompt: p.prompt!, chosen: p.chosen!, rejected: p.rejected! }));
    const want = margins(demo.base, demo.pairs);
    expect(textMargins(demo.base, text, { tokenizer: tok })).toEqual(want); // tokenized as loadPairs does
    expect(textMargins({ ...demo.base, tokenizer: tok } as LlamaModel, text)).toEqual(want);
    expect(textMargins(demo.base, batch)).toEqual(want);
    expect(textMargins(demo.base, demo.pairs)).toEqual(want);
    expect(() => textMargins({ ...demo.base, tokenizer: null } as LlamaModel, text)).toThrow(
      /text pairs need a tokenizer/,
    );
    expect(() => textMargins(demo.base, [{ ...text[0]!, chosen: "" }], { tokenizer: tok })).toThrow(
      /^pairs\[0\]: a response has no tokens/,
    );
  });

  it("refuses two runs of one name and an entry outside the model; a failing hook leaves no tensor behind", () => {
    const L = demo.base.config.numLayers;
    const r = (name: string, layer: number): Run => ({ name, layer, resid: tunedResid[0]! });
    expect(() => runMargins(demo.base, batch, [r("a", 1), r("a", 2)])).toThrow(/two runs are named "a"/);
    expect(() => runMargins(demo.base, batch, [r("a", L + 1)])).toThrow(/enters layer/);
    for (const strategy of ["per-run", "stacked", "layer-major"] as Strategy[]) {
      const before = tf.memory().numTensors;
      const bad: Run = {
        name: "bad",
        layer: 1,
        resid: tunedResid[0]!,
        hooks: { [hookName("mlp_out", 3)]: () => tf.zeros([1]) },
      };
      expect(() => runMargins(demo.base, batch, [r("ok", 1), bad, r("ok2", 2)], { strategy })).toThrow(
        /hook for blocks.3.hook_mlp_out (of run "bad" )?returned shape \[1\]/,
      );
      expect(tf.memory().numTensors, strategy).toBe(before);
    }
  });
});
