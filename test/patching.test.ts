// Generic activation patching from code (src/engine/patch.ts) against answers known without it: patching a
// whole entry residual reproduces the source run exactly, patching nothing reproduces the destination, the last
// layer's residual at the metric's position carries the source's metric there, a head's z patch is o_proj's slice
// of that head times the z difference added to attn_out (computed here from the weights on disk), a metric of the
// logits agrees with a plain forward and a float64 log-softmax written here, a sweep equals its single patches
// whatever else it sweeps, and a cross-model patch of whole layers equals the analysis engine's layer patch.
import * as path from "node:path";
import * as tf from "@tensorflow/tfjs-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { makeBatch } from "../src/data/batch.js";
import { margins, residAfter } from "../src/engine/margins.js";
import {
  logitDiff,
  pairMargin,
  patch,
  patchSweep,
  tokenLogprob,
  type Metric,
  type PatchSpec,
} from "../src/engine/patch.js";
import { runMargins } from "../src/engine/runs.js";
import { loadModelSync } from "../src/io/model.js";
import { readSafetensors } from "../src/io/safetensors.js";
import { loadTokenizer } from "../src/io/tokenizer.js";
import { hookName } from "../src/model/hooks.js";
import { disposeModel, forward, type Hooks, type LlamaModel } from "../src/model/llama.js";
import type { Pair } from "../src/data/pairs.js";
import { budgetFor, DEMO, disposeDemo, expectClose, expectNear, expectSame, loadDemo, useBackend } from "./helpers.js";

useBackend();

let base: LlamaModel;
let tuned: LlamaModel;
let pairs: Pair[];
let clean: number[]; // "... a little girl named Lily."
let corrupt: number[]; // "... a little boy named Lily." (the same length)
let SHE: number;
let HE: number;
beforeAll(() => {
  ({ base, tuned, pairs } = loadDemo(2));
  const tok = loadTokenizer(DEMO.base)!;
  clean = tok.encode("Once upon a time, there was a little girl named Lily.");
  corrupt = tok.encode("Once upon a time, there was a little boy named Lily.");
  [SHE, HE] = [tok.encode("She")[1]!, tok.encode("He")[1]!];
});
afterAll(() => disposeDemo({ base, tuned }));

const last = () => corrupt.length - 1;

/** log p(token) from logits through a float64 log-softmax. */
function logSoftmax64(z: ArrayLike<number>, token: number): number {
  let m = -Infinity;
  for (let i = 0; i < z.length; i++) m = Math.max(m, z[i]!);
  let s = 0;
  for (let i = 0; i < z.length; i++) s += Math.exp(z[i]! - m);
  return z[token]! - (m + Math.log(s));
}

/** The logits [T][V] of a plain forward of one row, with hooks. */
function fullLogits(model: LlamaModel, ids: number[], hooks?: Hooks): number[][] {
  const r = forward(model, [ids], { hooks });
  const z = (r.logits!.arraySync() as number[][][])[0]!;
  r.dispose();
  return z;
}

describe("patch()", () => {
  it("patching the embedding or layer 0's resid_pre at every position from the source is the source run, exactly", () => {
    const metric = logitDiff(SHE, HE, last());
    const sites = [{ hook: "hook_embed" }, { hook: hookName("resid_pre", 0) }];
    const r = patch(base, { source: clean, dest: corrupt, sites, metric });
    expect(Math.abs(r.source - r.dest)).toBeGreaterThan(0.1); // girl/boy moves the She/He logit difference
    expect(r.source).toBeGreaterThan(r.dest);
    for (const v of r.patched) expect(v).toBe(r.source);
    // a source given with its own cache patches the same values
    const run = forward(base, [clean], { cache: ["hook_embed", hookName("resid_pre", 0)], logitsAt: "none" });
    try {
      const again = patch(base, { source: { ids: clean, cache: run.cache }, dest: corrupt, sites, metric });
      expect(again).toEqual(r);
    } finally {
      run.dispose();
    }
  });

  it("patching nothing is the destination run, exactly; no sites gives no patched runs", () => {
    const metric = tokenLogprob(SHE, last());
    const r = patch(base, {
      source: clean,
      dest: corrupt,
      sites: [[], { hook: hookName("resid_post", 2), positions: [] }, { hook: hookName("z", 1), heads: [] }],
      metric,
    });
    for (const v of r.patched) expect(v).toBe(r.dest);
    expect(patch(base, { source: clean, dest: corrupt, sites: [], metric }).patched).toEqual([]);
  });

  it("the last layer's resid_post at the metric's position carries the source's metric; elsewhere it changes nothing", () => {
    const L = base.config.numLayers;
    const p = 13; // "named", after girl/boy: the metric reads the next-token distribution there
    for (const metric of [logitDiff(SHE, HE, p), tokenLogprob(SHE, p)]) {
      const hook = hookName("resid_post", L - 1);
      const r = patch(base, {
        source: clean,
        dest: corrupt,
        sites: [
          { hook, positions: [p] },
          { hook, positions: [0, 1, 2, p + 1, last()] },
          { hook: "ln_final.hook_normalized", positions: [p] },
        ],
        metric,
      });
      expect(r.patched[0]).toBe(r.source);
      expect(r.patched[1]).toBe(r.dest);
      expect(r.patched[2]).toBe(r.source);
    }
  });

  it("patching one head's z adds that head's o_proj slice times the z difference to attn_out", () => {
    const { numHeads: nH, headDim: d, hiddenSize: H } = base.config;
    const [layer, head] = [2, 3];
    const wo = readSafetensors(path.join(DEMO.base, "model.safetensors"), [
      `model.layers.${layer}.self_attn.o_proj.weight`,
    ])
      .values()
      .next().value!.data as Float32Array; // [H, nH·d]
    const [zSite, aSite] = [hookName("z", layer), hookName("attn_out", layer)];
    const rd = forward(base, [corrupt], { cache: [zSite, aSite], logitsAt: "none" });
    const rs = forward(base, [clean], { cache: [zSite], logitsAt: "none" });
    const zd = (rd.cache.get(zSite).arraySync() as number[][][][])[0]!;
    const zs = (rs.cache.get(zSite).arraySync() as number[][][][])[0]!;
    const attn = (rd.cache.get(aSite).arraySync() as number[][][])[0]!;
    rd.dispose();
    rs.dispose();
    const patched = attn.map((vec, t) =>
      vec.map((v, o) => {
        let s = v;
        for (let j = 0; j < d; j++) s += wo[o * nH * d + head * d + j]! * (zs[t]![head]![j]! - zd[t]![head]![j]!);
        return s;
      }),
    );
    const value = tf.tensor(patched.flat(), [1, corrupt.length, H]);
    const z = fullLogits(base, corrupt, { [aSite]: () => tf.clone(value) });
    value.dispose();
    const want = z[last()]![SHE]! - z[last()]![HE]!;
    const r = patch(base, {
      source: clean,
      dest: corrupt,
      sites: [{ hook: zSite, heads: [head] }],
      metric: logitDiff(SHE, HE, last()),
    });
    expectNear(r.patched[0]!, want, "head patch vs o_proj identity");
    expect(Math.abs(r.patched[0]! - r.dest)).toBeGreaterThan(1e-3); // the head matters here
  });

  it("a metric of the logits (a custom one, and tokenLogprob) equals a plain forward's through a float64 log-softmax", () => {
    const positions = [3, 7, last()];
    const tokens = [SHE, HE, 426];
    const custom: Metric = {
      at: positions,
      value: ({ logits }) => logits!.reduce((a, z, i) => a + logSoftmax64(z, tokens[i]!), 0),
    };
    const hook = hookName("mlp_out", 1);
    const r = patch(base, { source: clean, dest: corrupt, sites: [{ hook }], metric: custom });
    const src = fullLogits(base, clean);
    const dst = fullLogits(base, corrupt);
    const cached = forward(base, [clean], { cache: [hook], logitsAt: "none" });
    const mlp = cached.cache.take(hook);
    cached.dispose();
    const pat = fullLogits(base, corrupt, { [hook]: () => tf.clone(mlp) });
    mlp.dispose();
    const sum = (z: number[][]) => positions.reduce((a, p, i) => a + logSoftmax64(z[p]!, tokens[i]!), 0);
    expectNear(r.source, sum(src), "source");
    expectNear(r.dest, sum(dst), "dest");
    expectNear(r.patched[0]!, sum(pat), "patched");
    const one = patch(base, { source: clean, dest: corrupt, sites: [{ hook }], metric: tokenLogprob(SHE, last()) });
    expectNear(one.dest, logSoftmax64(dst[last()]!, SHE), "tokenLogprob");
    expectNear(one.patched[0]!, logSoftmax64(pat[last()]!, SHE), "tokenLogprob patched");
  });

  it("the finer sites compose as the block does: mlp.hook_post feeds mlp_out, pattern and v make z; pattern is by query", () => {
    const metric = logitDiff(SHE, HE, last());
    const l = 2;
    const at = (site: Parameters<typeof hookName>[0], positions?: number[]) => ({ hook: hookName(site, l), positions });
    const prefix = [...Array(10).keys()]; // before girl/boy, where the two prompts agree
    const r = patch(base, {
      source: clean,
      dest: corrupt,
      sites: [
        at("post"),
        at("mlp_out"),
        [at("pattern"), at("v")],
        at("z"),
        at("pattern", prefix),
        at("pattern", [12, 15]),
      ],
      metric,
    });
    expect(r.patched[0]).toBe(r.patched[1]); // down_proj of the source's neurons is the source's mlp_out
    expectNear(r.patched[2]!, r.patched[3]!, "pattern and v vs z"); // z = pattern · v, at every position
    expect(Math.abs(r.patched[3]! - r.dest)).toBeGreaterThan(1e-3);
    // a position of hook_pattern is a query row: the prefix's rows are the same in both runs, later ones are not
    expect(r.patched[4]).toBe(r.dest);
    expect(Math.abs(r.patched[5]! - r.dest)).toBeGreaterThan(1e-4);
  });

  it("a source of another length patches through positions and sourcePositions", () => {
    const L = base.config.numLayers;
    const longer = [1, ...clean.slice(1, 4), 376, ...clean.slice(4)]; // one more token in the middle
    const spec = { source: longer, dest: corrupt, metric: tokenLogprob(SHE, last()) };
    expect(() => patch(base, { ...spec, sites: [{ hook: hookName("resid_pre", 2) }] })).toThrow(/differ in length/);
    const hook = hookName("resid_post", L - 1);
    const r = patch(base, {
      ...spec,
      sites: [{ hook, positions: [last()], sourcePositions: [longer.length - 1] }],
      sourceMetric: tokenLogprob(SHE, longer.length - 1),
    });
    expect(r.patched[0]).toBe(r.source);
    expect(r.source).not.toBe(r.dest);
  });

  it("a cross-model patch of whole layers equals the analysis engine's layer patch, with margins as the metric", () => {
    const L = base.config.numLayers;
    const batch = makeBatch(pairs);
    for (const [i, pair] of pairs.entries()) {
      const rows = [
        batch.ids[2 * i]!.slice(0, batch.lengths[2 * i]),
        batch.ids[2 * i + 1]!.slice(0, batch.lengths[2 * i + 1]),
      ];
      const r = patch(base, {
        source: { ids: rows, model: tuned },
        dest: rows,
        sites: Array.from({ length: L }, (_, l) => ({ hook: hookName("resid_post", l) })),
        metric: pairMargin(pair),
      });
      expectNear(r.dest, margins(base, [pair])[0]!, "dest margin");
      expectNear(r.source, margins(tuned, [pair])[0]!, "source margin");
      const one = makeBatch([pair]);
      const runs = Array.from({ length: L }, (_, l) => ({
        name: `${l}`,
        layer: l + 1,
        resid: () => residAfter(tuned, one, l),
      }));
      const engine = runMargins(base, one, runs);
      r.patched.forEach((v, l) => expectNear(v, engine.get(`${l}`)![0]!, `layer ${l}`));
    }
  });
});

describe("patchSweep()", () => {
  const spec = (): Omit<PatchSpec, "sites"> => ({ source: clean, dest: corrupt, metric: logitDiff(SHE, HE, last()) });

  it("each entry of a sweep (by layer, by position, by head) equals the single patch", () => {
    const L = base.config.numLayers;
    const byLayer = patchSweep(base, { ...spec(), site: "resid_post" });
    expect(byLayer.layers).toEqual([...Array(L).keys()]);
    expect(byLayer.columns).toBeNull();
    byLayer.layers.forEach((l, i) => {
      const one = patch(base, { ...spec(), sites: [{ hook: hookName("resid_post", l) }] });
      expectSame(byLayer.values[i], one.patched, `layer ${l}`);
    });
    expect(patchSweep(base, { ...spec(), site: "resid_pre", layers: [1, 3] }).values.map((v) => v.length)).toEqual([
      1, 1,
    ]);
    const grid = patchSweep(base, { ...spec(), site: "resid_pre", layers: [1, 3], by: "position" });
    expect(grid.columns).toEqual([...corrupt.keys()]);
    grid.layers.forEach((l, i) =>
      grid.columns!.forEach((p, j) => {
        const one = patch(base, { ...spec(), sites: [{ hook: hookName("resid_pre", l), positions: [p] }] });
        expectSame(grid.values[i]![j], one.patched[0], `layer ${l} position ${p}`);
      }),
    );
    // girl/boy (positions 10-12) is where the difference enters: before it the two prompts agree, so a patch
    // there changes nothing, and at layer 1 one of its tokens moves the metric most
    const row = grid.values[0]!;
    for (let p = 0; p < 10; p++) expect(row[p]).toBe(grid.dest);
    expect([10, 11, 12]).toContain(row.indexOf(Math.max(...row)));
    const heads = patchSweep(base, { ...spec(), site: "z", layers: [2], by: "head" });
    expect(heads.columns).toEqual([...Array(base.config.numHeads).keys()]);
    heads.columns!.forEach((h) => {
      const one = patch(base, { ...spec(), sites: [{ hook: hookName("z", 2), heads: [h] }] });
      expectSame(heads.values[0]![h], one.patched[0], `head ${h}`);
    });
  });

  it("a layer's numbers do not depend on how many other layers the sweep covers (the engine stacks more runs)", () => {
    const all = patchSweep(base, { ...spec(), site: "resid_pre", by: "position" });
    const one = patchSweep(base, { ...spec(), site: "resid_pre", by: "position", layers: [2] });
    expectSame(one.values[0], all.values[2], "layer 2");
    expect(one.source).toBe(all.source);
    expect(one.dest).toBe(all.dest);
  });

  it("a streamed model (the engine's layer-major path) gives the resident model's table", () => {
    const streamed = loadModelSync(DEMO.base, { stream: "bring-in", memoryBudget: budgetFor(DEMO.base, 2) });
    try {
      expect(streamed.source).toBeDefined();
      const got = patchSweep(streamed, { ...spec(), site: "attn_out", by: "position", layers: [0, 4] });
      const want = patchSweep(base, { ...spec(), site: "attn_out", by: "position", layers: [0, 4] });
      expectClose(got, want, "streamed sweep");
    } finally {
      disposeModel(streamed);
    }
  });
});

describe("patch() refuses bad input with one line and leaves no tensor behind", () => {
  it("unknown sites, positions and heads out of range, metrics outside the rows", () => {
    const metric = tokenLogprob(SHE, last());
    const bad =
      (sites: PatchSpec["sites"], m: Metric = metric) =>
      () =>
        patch(base, { source: clean, dest: corrupt, sites, metric: m });
    expect(bad([{ hook: "blocks.9.hook_resid_post" }])).toThrow(/unknown hook site "blocks.9.hook_resid_post"/);
    expect(bad([{ hook: "blocks.1.hook_resid" }])).toThrow(/unknown hook site/);
    expect(bad([{ hook: hookName("resid_pre", 1), positions: [99] }])).toThrow(/position 99 is outside 0..15/);
    expect(bad([{ hook: hookName("resid_pre", 1), positions: [2, 2] }])).toThrow(/positions repeat/);
    expect(bad([{ hook: hookName("resid_pre", 1), heads: [0] }])).toThrow(/has no heads/);
    expect(bad([{ hook: hookName("z", 1), heads: [8] }])).toThrow(/head 8 is outside 0..7/);
    expect(bad([], tokenLogprob(SHE, 16))).toThrow(/reads position 16 of row 0, which has 16 tokens/);
    expect(bad([], { at: [[1, 0]], value: () => 0 })).toThrow(/reads row 1, but there are 1/);
    expect(() => patch(base, { source: [clean, clean], dest: corrupt, sites: [], metric })).toThrow(/2 rows/);
    expect(() => logitDiff(SHE, 9999, 3).value({ logits: [new Float32Array(512)], logprobs: null })).toThrow(
      /token 9999 is outside the vocabulary/,
    );
  });

  it("a failing metric, a failing cross-model patch and a missing cached site free every tensor", () => {
    const before = tf.memory().numTensors;
    const throwing: Metric = {
      at: [last()],
      value: () => {
        throw new Error("my metric broke");
      },
    };
    expect(() =>
      patch(base, { source: clean, dest: corrupt, sites: [{ hook: hookName("resid_pre", 1) }], metric: throwing }),
    ).toThrow("my metric broke");
    expect(tf.memory().numTensors).toBe(before);
    const small = loadModelSync("fixtures/models/llama-tiny-b"); // hidden 32, not 64
    const afterLoad = tf.memory().numTensors;
    try {
      const ids = clean.map((t) => t % small.config.vocabSize);
      expect(() =>
        patch(base, {
          source: { ids, model: small },
          dest: corrupt,
          sites: [{ hook: hookName("resid_post", 0) }],
          metric: tokenLogprob(SHE, last()),
          sourceMetric: tokenLogprob(3, last()),
        }),
      ).toThrow(/source's blocks.0.hook_resid_post is \[1,16,32\], which does not fit the destination's \[1,16,64\]/);
      expect(tf.memory().numTensors).toBe(afterLoad);
    } finally {
      disposeModel(small);
    }
    const run = forward(base, [clean], { cache: [hookName("resid_pre", 0)], logitsAt: "none" });
    expect(() =>
      patch(base, {
        source: { ids: clean, cache: run.cache },
        dest: corrupt,
        sites: [{ hook: hookName("resid_pre", 1) }],
        metric: tokenLogprob(SHE, last()),
      }),
    ).toThrow(/cache has no blocks.1.hook_resid_pre/);
    run.dispose();
    patch(base, {
      source: clean,
      dest: corrupt,
      sites: [{ hook: hookName("z", 0), heads: [1] }],
      metric: logitDiff(SHE, HE, 2),
    });
    patchSweep(base, { source: clean, dest: corrupt, site: "mlp_out", by: "position", metric: tokenLogprob(HE, 4) });
    expect(tf.memory().numTensors).toBe(before);
  });
});
