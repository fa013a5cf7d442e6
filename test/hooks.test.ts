// Hook names: the list a model exposes is pinned, the forward pass visits exactly those sites in that order,
// names are checked (at compile time for literal keys), and a forward result's cache is owned (and freed) by the
// caller. TransformerLens's inner sites (q/k/v, scores, pattern, the MLP's neurons) are checked by identities that
// do not go through the forward pass's own code, and asking for none of them changes no bit.
import * as tf from "@tensorflow/tfjs-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { BackendError, explainBackendError, noteBackendMessage } from "../src/model/backend.js";
import { loadModelSync } from "../src/io/model.js";
import {
  ActivationCache,
  BLOCK_SITES,
  hookName,
  hookNames,
  INNER_SITES,
  isHookName,
  type LayerSite,
} from "../src/model/hooks.js";
import { disposeModel, forward, type ForwardOptions, type Hooks, type LlamaModel } from "../src/model/llama.js";
import { withWeights } from "../src/model/weights.js";
import { DEMO, maxAbsDiff, useBackend } from "./helpers.js";

const processConsole = { warn: console.warn, error: console.error }; // before any backend starts
useBackend();

let model: LlamaModel;
beforeAll(() => (model = loadModelSync("fixtures/models/llama-tiny-b")));
afterAll(() => disposeModel(model));

describe("hook names", () => {
  it("hookNames lists every site of a 2-layer model, in forward order", () => {
    const layer0 = [
      "blocks.0.hook_resid_pre",
      "blocks.0.attn.hook_q",
      "blocks.0.attn.hook_k",
      "blocks.0.attn.hook_v",
      "blocks.0.attn.hook_rot_q",
      "blocks.0.attn.hook_rot_k",
      "blocks.0.attn.hook_attn_scores",
      "blocks.0.attn.hook_pattern",
      "blocks.0.attn.hook_z",
      "blocks.0.hook_attn_out",
      "blocks.0.hook_resid_mid",
      "blocks.0.mlp.hook_pre",
      "blocks.0.mlp.hook_pre_linear",
      "blocks.0.mlp.hook_post",
      "blocks.0.hook_mlp_out",
      "blocks.0.hook_resid_post",
    ];
    expect(hookNames({ numLayers: 2 })).toEqual([
      "hook_embed",
      ...layer0,
      ...layer0.map((n) => n.replace("blocks.0.", "blocks.1.")),
      "ln_final.hook_normalized",
    ]);
    expect(hookName("resid_post", 3)).toBe("blocks.3.hook_resid_post");
    expect(hookName("z", 0)).toBe("blocks.0.attn.hook_z");
    expect(hookName("pattern", 2)).toBe("blocks.2.attn.hook_pattern");
    expect(hookName("pre_linear", 1)).toBe("blocks.1.mlp.hook_pre_linear");
    expect(() => hookName("mlp_out", -1)).toThrow(/layer/);
    expect(isHookName("blocks.2.hook_mlp_out")).toBe(true);
    expect(isHookName("blocks.2.attn.hook_rot_k")).toBe(true);
    expect(isHookName("blocks.2.mlp.hook_post")).toBe(true);
    expect(isHookName("blocks.2.hook_mlp")).toBe(false);
    expect(isHookName("blocks.2.attn.hook_post")).toBe(false);
    expect(isHookName("blocks.2.attnXhook_q")).toBe(false); // the dots are literal
    // the patching sites are the six they were; the inner ones are listed apart, and together they are a layer's
    expect(BLOCK_SITES).toEqual(["resid_pre", "z", "attn_out", "resid_mid", "mlp_out", "resid_post"]);
    expect(new Set([...BLOCK_SITES, ...INNER_SITES].map((s) => hookName(s, 0)))).toEqual(new Set(layer0));
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
    const [typo, typo2]: string[] = ["blocks.0.hook_mlp", "blocks.0.attn.hook_patern"]; // names known at run time
    expect(() => forward(model, [[1, 2]], { hooks: { [typo!]: (v: tf.Tensor) => v } })).toThrow(
      /unknown hook site "blocks.0.hook_mlp"/,
    );
    expect(() => forward(model, [[1, 2]], { cache: [typo2!] })).toThrow(
      /unknown hook site "blocks.0.attn.hook_patern"/,
    );
    expect(() => forward(model, [[1, 2]], { hooks: { [hookName("mlp_out", L)]: (v) => v } })).toThrow(
      /unknown hook site/,
    );
    expect(() => forward(model, [[1, 2]], { cache: ["resid_post"] })).toThrow(/unknown hook site "resid_post"/);
  });

  it("a misspelt literal hook key does not compile (tsc checks these lines); a computed hookName key types its hook", () => {
    // @ts-expect-error: not a site
    const typo: Hooks = { "blocks.0.hook_mlp": (v: tf.Tensor) => v };
    // @ts-expect-error: TransformerLens spells it hook_pattern
    const typo2: Hooks = { "blocks.0.attn.hook_patern": (v: tf.Tensor) => v };
    const fine: Hooks = { [hookName("pattern", 0)]: (v) => v, "blocks.1.mlp.hook_post": (v) => tf.mul(v, 1) };
    expect([typo, typo2, fine].map((h) => Object.keys(h).length)).toEqual([1, 1, 2]);
  });
});

describe("TransformerLens's inner sites (q/k/v, scores, pattern, the MLP's neurons)", () => {
  // the demo model: grouped-query attention (8 query heads on 4 kv heads), no biases; a right-padded batch
  let gqa: LlamaModel;
  beforeAll(() => (gqa = loadModelSync(DEMO.base)));
  afterAll(() => disposeModel(gqa));
  const ids = [
    [1, 403, 22, 87, 9, 300, 41],
    [1, 55, 7, 0, 0, 0, 0],
  ];
  const lengths = [7, 3];
  const [B, T] = [ids.length, ids[0]!.length];
  const everyLayer = (sites: readonly LayerSite[]) =>
    Array.from({ length: gqa.config.numLayers }, (_, l) => sites.map((s) => hookName(s, l))).flat();
  const logitsOf = (opts: ForwardOptions) => {
    const r = forward(gqa, ids, { lengths, ...opts });
    const out = r.logits!.dataSync();
    r.dispose();
    return out;
  };

  it("have TransformerLens's shapes: q [B, T, heads, d], k and v per kv head, scores and pattern [B, heads, T, T], the MLP's [B, T, I]", () => {
    const { numHeads: nH, numKvHeads: nKv, headDim: d, intermediateSize: I } = gqa.config;
    expect(nKv).toBeLessThan(nH);
    const r = forward(gqa, ids, { lengths, cache: INNER_SITES.map((s) => hookName(s, 1)), logitsAt: "none" });
    const shapes = Object.fromEntries(INNER_SITES.map((s) => [s, r.cache.get(hookName(s, 1)).shape]));
    r.dispose();
    expect(shapes).toEqual({
      q: [B, T, nH, d],
      k: [B, T, nKv, d],
      v: [B, T, nKv, d],
      rot_q: [B, T, nH, d],
      rot_k: [B, T, nKv, d],
      attn_scores: [B, nH, T, T],
      pattern: [B, nH, T, T],
      pre: [B, T, I],
      pre_linear: [B, T, I],
      post: [B, T, I],
    });
  });

  it("a cached pattern's rows sum to 1; later keys and padding keys hold exactly 0 (scores there: the score − 1e9), on either attention path asked for", () => {
    for (const attention of ["grouped", "batched"] as const) {
      const [S, P] = [hookName("attn_scores", 2), hookName("pattern", 2)];
      const r = forward(gqa, ids, { lengths, attention, cache: [S, P], logitsAt: "none" });
      const [scores, pattern] = [S, P].map((n) => r.cache.get(n).arraySync() as number[][][][]);
      r.dispose();
      pattern!.forEach((row, b) =>
        row.forEach((head, h) => {
          for (let q = 0; q < lengths[b]!; q++) {
            const sum = head[q]!.reduce((a, p) => a + p, 0);
            expect(Math.abs(sum - 1), `${attention} row ${b} head ${h} query ${q}`).toBeLessThan(1e-6);
            for (let k = 0; k < T; k++) {
              const masked = k > q || k >= lengths[b]!;
              if (masked) expect(head[q]![k], `pattern [${b}, ${h}, ${q}, ${k}]`).toBe(0);
              else expect(head[q]![k]!).toBeGreaterThan(0);
              if (masked) expect(Math.abs(scores![b]![h]![q]![k]! + 1e9)).toBeLessThan(1e3);
              else expect(Math.abs(scores![b]![h]![q]![k]!)).toBeLessThan(1e3);
            }
          }
        }),
      );
    }
  });

  it("the identity pattern makes each head's z its kv head's v, and attn_out z·W_o (W_o multiplied here in float64)", () => {
    const l = 1;
    const { numHeads: nH, numKvHeads: nKv, headDim: d, hiddenSize: H } = gqa.config;
    const eye = tf.tidy(() => tf.tile(tf.reshape(tf.eye(T), [1, 1, T, T]), [B, nH, 1, 1]));
    const [V, Z, A] = [hookName("v", l), hookName("z", l), hookName("attn_out", l)];
    const r = forward(gqa, ids, { lengths, cache: [V, Z, A], hooks: { [hookName("pattern", l)]: () => eye } });
    const [v, z] = [V, Z].map((n) => r.cache.get(n).arraySync() as number[][][][]);
    const attnOut = r.cache.get(A).arraySync() as number[][][];
    r.dispose();
    eye.dispose();
    const wo = gqa.layers[l]!.o.arraySync(); // [heads·d, H]
    const g = nH / nKv;
    for (let b = 0; b < B; b++)
      for (let t = 0; t < T; t++) {
        for (let h = 0; h < nH; h++)
          expect(maxAbsDiff(z![b]![t]![h]!, v![b]![t]![Math.floor(h / g)]!), `z [${b}, ${t}, ${h}]`).toBe(0);
        const want = Array.from({ length: H }, (_, o) => {
          let s = 0;
          for (let i = 0; i < nH * d; i++) s += z![b]![t]![Math.floor(i / d)]![i % d]! * wo[i]![o]!;
          return s;
        });
        expect(maxAbsDiff(attnOut[b]![t]!, want), `attn_out [${b}, ${t}]`).toBeLessThan(1e-5);
      }
  });

  it("zeroing neuron j of mlp.hook_post gives the logits of the model whose down_proj has column j zeroed", () => {
    const [l, j] = [2, 17];
    const I = gqa.config.intermediateSize;
    const keep = tf.tidy(() => tf.sub(1, tf.reshape(tf.oneHot(tf.tensor1d([j], "int32"), I), [I])));
    const down = tf.tidy(() => tf.mul(gqa.layers[l]!.down, tf.reshape(keep, [I, 1]))); // [I, H]: HF's column j is row j here
    const edited = withWeights(gqa, new Map([[`model.layers.${l}.mlp.down_proj.weight`, down]]));
    const hooked = logitsOf({ hooks: { [hookName("post", l)]: (v) => tf.mul(v, keep) } });
    const r = forward(edited, ids, { lengths });
    const want = r.logits!.dataSync();
    r.dispose();
    tf.dispose([keep, down]);
    expect(maxAbsDiff(hooked, want)).toBeLessThan(1e-5);
    expect(maxAbsDiff(hooked, logitsOf({}))).toBeGreaterThan(1e-4); // the neuron matters at all
  });

  it("a replaced value is what the rest of the pass uses: identities at q/k/v, the scores and the MLP", () => {
    const l = 3;
    const zero = (v: tf.Tensor) => tf.zerosLike(v);
    const plain = logitsOf({});
    // softmax does not see a constant added to every score
    expect(maxAbsDiff(logitsOf({ hooks: { [hookName("attn_scores", l)]: (s) => tf.add(s, 3) } }), plain)).toBeLessThan(
      1e-5,
    );
    // rotated queries of zero: every score 0, so each query spreads evenly over the keys it may see
    const uniform = forward(gqa, ids, {
      lengths,
      hooks: { [hookName("rot_q", l)]: zero },
      cache: [hookName("pattern", l)],
    });
    const p = uniform.cache.get(hookName("pattern", l)).arraySync() as number[][][][];
    uniform.dispose();
    for (let b = 0; b < B; b++)
      for (let q = 0; q < lengths[b]!; q++)
        expect(maxAbsDiff(p[b]![5]![q]!.slice(0, q + 1), new Array(q + 1).fill(1 / (q + 1)))).toBeLessThan(1e-6);
    // no values → no attention output; no up projection → no MLP output (the model has no biases)
    const sites = [hookName("resid_pre", l), hookName("resid_mid", l), hookName("resid_post", l)];
    const noV = forward(gqa, ids, { lengths, hooks: { [hookName("v", l)]: zero }, cache: sites, logitsAt: "none" });
    expect(noV.cache.get(sites[1]!).dataSync()).toEqual(noV.cache.get(sites[0]!).dataSync());
    noV.dispose();
    const noUp = forward(gqa, ids, {
      lengths,
      hooks: { [hookName("pre_linear", l)]: zero },
      cache: sites,
      logitsAt: "none",
    });
    expect(noUp.cache.get(sites[2]!).dataSync()).toEqual(noUp.cache.get(sites[1]!).dataSync());
    noUp.dispose();
    // every inner site patched with its own cached value changes no bit; zeroed, it changes the logits
    for (const s of INNER_SITES) {
      const n = hookName(s, l);
      const own = forward(gqa, ids, { lengths, cache: [n], logitsAt: "none" });
      const same = logitsOf({ hooks: { [n]: () => own.cache.get(n) } });
      expect(same, n).toEqual(logitsOf({ attention: s === "attn_scores" || s === "pattern" ? "batched" : "auto" }));
      expect(maxAbsDiff(logitsOf({ hooks: { [n]: zero } }), plain), n).toBeGreaterThan(1e-3);
      own.dispose();
    }
  });

  it("asking for none of them leaves every bit as it was; watching q/k/v or the MLP's (or hooking them with the identity) changes none either", () => {
    const perPosition = INNER_SITES.filter((s) => s !== "attn_scores" && s !== "pattern");
    const identity = Object.fromEntries(everyLayer(perPosition).map((n) => [n, (v: tf.Tensor) => v]));
    for (const attention of ["auto", "grouped", "batched"] as const) {
      const plain = logitsOf({ attention }); // caches nothing
      expect(logitsOf({ attention, cache: everyLayer(BLOCK_SITES) }), attention).toEqual(plain);
      expect(logitsOf({ attention, cache: everyLayer(perPosition) }), attention).toEqual(plain);
      expect(logitsOf({ attention, hooks: identity }), attention).toEqual(plain);
    }
    // a watched score or pattern runs its layer batched: the batched path's bits, whatever was asked for
    const batched = logitsOf({ attention: "batched" });
    expect(logitsOf({ attention: "grouped", cache: everyLayer(["pattern"]) })).toEqual(batched);
    expect(
      logitsOf({
        attention: "grouped",
        hooks: { [hookName("attn_scores", 0)]: (s) => s, [hookName("pattern", 4)]: (p) => p },
      }),
    ).toEqual(batched);
  });

  it("leave no tensors behind, cached, hooked or failing", () => {
    const before = tf.memory().numTensors;
    const cache = everyLayer(INNER_SITES);
    const r = forward(gqa, ids, {
      lengths,
      cache,
      hooks: { [hookName("pattern", 1)]: (p) => tf.mul(p, 1), [hookName("post", 2)]: (v) => tf.relu(v) },
    });
    expect(tf.memory().numTensors).toBe(before + 1 + cache.length); // logits + the cached sites
    r.dispose();
    expect(tf.memory().numTensors).toBe(before);
    expect(() => forward(gqa, ids, { lengths, hooks: { [hookName("pattern", 1)]: () => tf.zeros([1]) } })).toThrow(
      /hook for blocks\.1\.attn\.hook_pattern returned shape \[1\], expected \[2,8,7,7\]/,
    );
    expect(tf.memory().numTensors).toBe(before);
  });

  it("with pairedPrompts, a pass that watches a score or pattern runs the pair's rows apart: the bits of the rows apart, even for a hook that treats the two prompts differently", () => {
    const pair = [
      [1, 403, 22, 87, 9],
      [1, 403, 22, 55, 0],
    ];
    const opts = { lengths: [5, 4], cache: [hookName("pattern", 2), hookName("q", 2)] };
    // the identity pattern in the rejected row only: a packed row could not hold it
    const oneRow = (p: tf.Tensor) =>
      tf.concat([tf.slice(p, [0], [1]), tf.tile(tf.reshape(tf.eye(5), [1, 1, 5, 5]), [1, p.shape[1]!, 1, 1])]);
    const hooks = { [hookName("pattern", 0)]: oneRow };
    const apart = forward(gqa, pair, { ...opts, hooks });
    const packed = forward(gqa, pair, { ...opts, hooks, pairedPrompts: [3] });
    expect(packed.logits!.dataSync()).toEqual(apart.logits!.dataSync());
    for (const n of opts.cache) expect(packed.cache.get(n).dataSync(), n).toEqual(apart.cache.get(n).dataSync());
    apart.dispose();
    packed.dispose();
    // the same hook at a per-position site stays packed, and is refused for what packing cannot run
    const zRow = (z: tf.Tensor) => tf.concat([tf.slice(z, [0], [1]), tf.zerosLike(tf.slice(z, [1], [1]))]);
    expect(() =>
      forward(gqa, pair, { lengths: [5, 4], pairedPrompts: [3], hooks: { [hookName("q", 0)]: zRow } }),
    ).toThrow(/the hook at blocks\.0\.attn\.hook_q gives a pair's chosen and rejected rows different prompt values/);
    // pairs whose rows differ in the prompt are refused as without the pattern
    expect(() => forward(gqa, pair, { ...opts, pairedPrompts: [4] })).toThrow(
      /pair 0: its two rows differ at prompt position 3/,
    );
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
