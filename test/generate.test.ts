// Greedy generation with hooks and steered generation (src/model/generate.ts, steeringHooks in
// src/analysis/steering.ts, `prefprobe generate --steer`): β = 0 is the unsteered continuation; every token a
// hooked generation picks is the argmax of a plain forward with the same hook on the sequence so far; the steering
// hook is the analysis's steering edit (the same margins); generation stops at a stop id; the CLI prints both
// continuations as the library makes them and refuses a subspace of another width with one line.
import * as fs from "node:fs";
import * as path from "node:path";
import * as tf from "@tensorflow/tfjs-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { steer, steeringHooks } from "../src/analysis/steering.js";
import { makeBatch, positionMask } from "../src/data/batch.js";
import type { Pair } from "../src/data/pairs.js";
import { margins, residAfter } from "../src/engine/margins.js";
import { runMargins } from "../src/engine/runs.js";
import { writeSafetensors } from "../src/io/safetensors.js";
import { loadTokenizer, type TextTokenizer } from "../src/io/tokenizer.js";
import { greedy } from "../src/model/generate.js";
import { hookName } from "../src/model/hooks.js";
import { forward, type Hooks, type LlamaModel } from "../src/model/llama.js";
import { seededRandom } from "../src/stats/stats.js";
import { DEMO, disposeDemo, expectSame, loadDemo, runCli, TEST_BACKEND, tmpDir, useBackend } from "./helpers.js";

useBackend();

let base: LlamaModel;
let tuned: LlamaModel;
let pairs: Pair[];
let tok: TextTokenizer;
let prompt: number[];
let direction: Float32Array; // a fixed direction of norm 2 in the residual stream
const LAYER = 2;
beforeAll(() => {
  ({ base, tuned, pairs } = loadDemo(3));
  tok = loadTokenizer(DEMO.base)!;
  prompt = tok.encode("Once upon a time");
  const rand = seededRandom(5);
  const g = Float32Array.from({ length: base.config.hiddenSize }, () => rand() - 0.5);
  const n = Math.hypot(...g);
  direction = g.map((x) => (2 * x) / n);
});
afterAll(() => disposeDemo({ base, tuned }));

const hooksAt = (beta: number, layer = LAYER): Hooks => steeringHooks(base.config, { layer, direction, beta });

/** The argmax of the last position's logits of a plain forward with hooks. */
function nextToken(model: LlamaModel, ids: number[], hooks?: Hooks): number {
  const r = forward(model, [ids], { hooks });
  const z = (r.logits!.arraySync() as number[][][])[0]!.at(-1)!;
  r.dispose();
  return z.indexOf(Math.max(...z));
}

describe("greedy with hooks", () => {
  it("steering at β = 0 is the unsteered continuation; at β = 4 it is another", () => {
    const plain = greedy(base, prompt, 24);
    expect(greedy(base, prompt, 24, { hooks: hooksAt(0) })).toEqual(plain);
    expect(greedy(base, prompt, 24, { hooks: hooksAt(4) })).not.toEqual(plain);
  });

  it("every token it picks is the argmax of a plain forward with the same hook on the sequence so far", () => {
    const hooks = hooksAt(4);
    const out = greedy(base, prompt, 12, { hooks });
    expect(out[0]).toBe(nextToken(base, prompt, hooks)); // the first one: one forward of the prompt
    out.forEach((t, k) => expect(t, `step ${k}`).toBe(nextToken(base, [...prompt, ...out.slice(0, k)], hooks)));
    // an arbitrary hook at another site, not only steering: zero-ablate an MLP
    const ablate = { [hookName("mlp_out", 1)]: (v: tf.Tensor) => tf.zerosLike(v) };
    const ab = greedy(base, prompt, 6, { hooks: ablate });
    ab.forEach((t, k) => expect(t).toBe(nextToken(base, [...prompt, ...ab.slice(0, k)], ablate)));
  });

  it("the steering hook is the analysis's steering edit: the same margins as a run entering above the layer", () => {
    const batch = makeBatch(pairs);
    const beta = 2;
    const hb = residAfter(base, batch, LAYER);
    const mask = positionMask(batch, "all");
    try {
      const run = { name: "steer", layer: LAYER + 1, resid: () => steer(direction, beta)(hb, hb, mask) };
      const engine = runMargins(base, batch, [run]).get("steer")!;
      expectSame(margins(base, pairs, { hooks: hooksAt(beta) }), engine, "hooked margins vs the steering edit");
      expect(Math.abs(engine[0]! - margins(base, pairs)[0]!)).toBeGreaterThan(1e-3);
    } finally {
      tf.dispose([hb, mask]);
    }
  });

  it("stops at a stop id (the token is not included), with options or the old positional list", () => {
    const plain = greedy(base, prompt, 30);
    const stop = plain[8]!;
    const before = plain.slice(0, plain.indexOf(stop));
    expect(greedy(base, prompt, 30, { stopAt: [stop] })).toEqual(before);
    expect(greedy(base, prompt, 30, [stop])).toEqual(before);
    expect(greedy(base, prompt, 0)).toEqual([]);
    expect(() => greedy(base, prompt, 2.5)).toThrow(/steps must be a non-negative integer/);
  });

  it("frees every tensor, also when a hook throws", () => {
    const before = tf.memory().numTensors;
    greedy(base, prompt, 5, { hooks: hooksAt(3) });
    expect(tf.memory().numTensors).toBe(before);
    const broken = {
      [hookName("resid_post", 1)]: () => {
        throw new Error("my hook broke");
      },
    };
    expect(() => greedy(base, prompt, 5, { hooks: broken })).toThrow("my hook broke");
    expect(tf.memory().numTensors).toBe(before);
  });

  it("steeringHooks refuses a direction of another width, a non-finite β and a layer outside the model", () => {
    const cfg = base.config;
    expect(() => steeringHooks(cfg, { layer: 1, direction: new Float32Array(32), beta: 1 })).toThrow(
      /the steering direction has 32 entries; the model's hidden size is 64/,
    );
    expect(() => steeringHooks(cfg, { layer: 1, direction, beta: NaN })).toThrow(/β must be a finite number/);
    expect(() => steeringHooks(cfg, { layer: 5, direction, beta: 1 })).toThrow(
      /layer 5 is outside the model's layers 0..4/,
    );
  });
});

describe("prefprobe generate --steer", () => {
  /** The compiled CLI (npm test builds it first), on the suite's backend. */
  const cli = (...args: string[]) => runCli(...args, "--backend", TEST_BACKEND);

  /** A subspace.safetensors as `prefprobe run` writes it: components [1, H], mean_diff [H], site and layer. */
  function subspaceFile(meanDiff: Float32Array, layer: number): string {
    const file = path.join(tmpDir(), "subspace.safetensors");
    writeSafetensors(
      file,
      {
        components: { dtype: "F32", shape: [1, meanDiff.length], data: meanDiff.map((x) => x / 2) },
        mean_diff: { dtype: "F32", shape: [meanDiff.length], data: meanDiff },
      },
      { producer: "prefprobe run", site: "resid_post", layer: String(layer), hidden_size: String(meanDiff.length) },
    );
    return file;
  }

  const decode = (out: number[]) => tok.decode([...prompt, ...out], { skipSpecialTokens: true });

  it("prints the unsteered and the steered continuation, labelled, and what steers them", () => {
    const file = subspaceFile(direction, LAYER);
    const r = cli(
      "generate",
      "--model",
      DEMO.base,
      "--text",
      "Once upon a time",
      "--steer",
      file,
      "--beta",
      "4",
      "--steps",
      "16",
    );
    expect(r.code, r.err).toBe(0);
    const [unsteered, steered] = [greedy(base, prompt, 16), greedy(base, prompt, 16, { hooks: hooksAt(4) })];
    expect(unsteered).not.toEqual(steered);
    expect(r.out).toContain(`unsteered:\n${decode(unsteered)}\n`);
    expect(r.out).toContain(`steered (layer ${LAYER}, β = 4):\n${decode(steered)}\n`);
    expect(r.out.split("\n")[0]).toBe(
      `steering: β = 4 × the mean difference h_tuned − h_base at layer ${LAYER} (norm 2.0000, from ${file}), added to blocks.${LAYER}.hook_resid_post at every position`,
    );
  });

  it("stops both continuations at the model's EOS", () => {
    const full = [greedy(base, prompt, 40), greedy(base, prompt, 40, { hooks: hooksAt(4) })];
    const eos = full[1]!.find((t) => full[0]!.includes(t))!; // a token both continuations reach
    expect(eos).toBeDefined();
    const dir = tmpDir();
    for (const f of ["model.safetensors", "tokenizer.json", "tokenizer_config.json"])
      fs.copyFileSync(path.join(DEMO.base, f), path.join(dir, f));
    const config = JSON.parse(fs.readFileSync(path.join(DEMO.base, "config.json"), "utf8"));
    fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify({ ...config, eos_token_id: eos }));
    const file = subspaceFile(direction, LAYER);
    const r = cli(
      "generate",
      "--model",
      dir,
      "--text",
      "Once upon a time",
      "--steer",
      file,
      "--beta",
      "4",
      "--steps",
      "40",
    );
    expect(r.code, r.err).toBe(0);
    const [u, s] = full.map((f) => decode(f.slice(0, f.indexOf(eos)))) as [string, string];
    expect(r.out).toContain(`unsteered:\n${u}\nsteered (layer ${LAYER}, β = 4):\n${s}\n`);
    expect(r.out.trimEnd().endsWith(s)).toBe(true); // nothing after the steered text: it stopped
  });

  it("refuses a subspace of another width, a missing file and a non-finite β, each with one line", () => {
    const cases: Array<[string[], RegExp]> = [
      [["--steer", subspaceFile(new Float32Array(32).fill(1), 1), "--beta", "4"], /is for hidden size 32; .* has 64$/],
      [
        ["--steer", "no/such/subspace.safetensors", "--beta", "4"],
        /--steer no\/such\/subspace.safetensors: no such file$/,
      ],
      [["--steer", subspaceFile(direction, LAYER), "--beta", "nan"], /--beta must be a finite number, got "nan"$/],
      [["--steer", subspaceFile(direction, LAYER)], /--steer needs --beta/],
      [["--beta", "2"], /--beta needs --steer/],
    ];
    for (const [args, message] of cases) {
      const r = cli("generate", "--model", DEMO.base, "--steps", "3", ...args);
      expect(r.code).toBe(1);
      const lines = r.err
        .trim()
        .split("\n")
        .filter((l) => !l.startsWith("backend:"));
      expect(lines).toHaveLength(1);
      expect(lines[0]).toMatch(message);
    }
  });
});
