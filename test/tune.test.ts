// `prefprobe tune`'s rules as tune --help and docs/tune.md state them: which weights a --train pattern selects
// (on the tricky names of a real model), every pattern of a list must select one, --rank bounded by the matrix,
// Adam's settings and the learning-rate schedule reaching the optimizer, and metrics at float32 noise reported as
// such rather than as a share.
import * as tf from "@tensorflow/tfjs-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadModelSync } from "../src/io/model.js";
import { loadPairs } from "../src/io/pairs.js";
import type { Pair } from "../src/data/pairs.js";
import { enableGradients } from "../src/model/gradients.js";
import { disposeModel, type LlamaModel } from "../src/model/llama.js";
import { DEFAULT_TUNE, learningRate, noiseFloor, selectWeights, tuneDPO, TuneError } from "../src/train/dpo.js";
import { useBackend } from "./helpers.js";

useBackend();
const MODEL = "fixtures/models/stories260k"; // 5 layers
let model: LlamaModel;
let pairs: Pair[];
beforeAll(async () => {
  await enableGradients();
  model = loadModelSync(MODEL);
  pairs = loadPairs("fixtures/data/stories/train.jsonl", MODEL, { limit: 8 });
});
afterAll(() => disposeModel(model));

const names = (patterns: string[]) => selectWeights(model, patterns).map((w) => w.name);
const L = 5;
const each = (suffix: string) => Array.from({ length: L }, (_, l) => `model.layers.${l}.${suffix}`);

describe("--train selection", () => {
  it("a plain pattern selects every weight whose name contains it", () => {
    expect(new Set(names(["norm"]))).toEqual(
      new Set([...each("input_layernorm.weight"), ...each("post_attention_layernorm.weight"), "model.norm.weight"]),
    );
    expect(new Set(names(["layernorm"]))).toEqual(
      new Set([...each("input_layernorm.weight"), ...each("post_attention_layernorm.weight")]),
    );
    expect(names(["mlp.down"])).toEqual(each("mlp.down_proj.weight"));
    expect(names(["ayers.1.mlp"])).toEqual(
      ["gate_proj", "up_proj", "down_proj"].map((p) => `model.layers.1.mlp.${p}.weight`),
    );
    expect(names(["layers.1.mlp"])).toEqual(names(["ayers.1.mlp"]));
  });

  it("a glob (*, ?, [..]) matches whole names", () => {
    expect(names(["model.layers.2.self_attn.?_proj.weight"])).toEqual(
      ["q", "k", "v", "o"].map((p) => `model.layers.2.self_attn.${p}_proj.weight`),
    );
    expect(new Set(names(["model.layers.*.self_attn.[qk]_proj.weight"]))).toEqual(
      new Set([...each("self_attn.q_proj.weight"), ...each("self_attn.k_proj.weight")]),
    );
    expect(names(["*"])).toHaveLength(2 + 9 * L); // embedding (tied: the head), final norm, 9 per layer
    expect(names(["*layers.*.mlp.down_proj*"])).toEqual(each("mlp.down_proj.weight"));
    // a glob is anchored: part of a name is not enough
    expect(() => names(["layers.*.mlp.down_proj"])).toThrow(
      /^train pattern "layers.\*.mlp.down_proj" matches no weight of the model \(a glob must match a whole name; names look like model.layers.0/,
    );
  });

  it("every pattern of a list must select a weight, else the list is refused naming the pattern", () => {
    expect(() => names(["model.layers.2.self_attn.?_proj.weight", "nothing"])).toThrow(TuneError);
    expect(() => names(["model.layers.2.self_attn.?_proj.weight", "nothing"])).toThrow(/"nothing" matches no weight/);
    expect(() => names([])).toThrow(/at least one pattern/);
  });
});

describe("tuneDPO", () => {
  const settings = (over: Partial<typeof DEFAULT_TUNE>) => ({ ...DEFAULT_TUNE, epochs: 1, batchPairs: 4, ...over });

  it("refuses a --rank above a selected matrix's smaller side, naming the matrix", async () => {
    // k_proj is [32, 64]: rank 33 is more than it holds; the 64-wide matrices would take it
    await expect(tuneDPO(model, pairs, settings({ train: ["layers.0.self_attn"], rank: 33 }))).rejects.toThrow(
      /^rank 33 is more than model.layers.0.self_attn.k_proj.weight can take: .*r ≤ 32/,
    );
    const ok = await tuneDPO(model, pairs.slice(0, 4), settings({ train: ["layers.0.self_attn.q_proj"], rank: 64 }));
    tf.dispose(ok.ownTensors);
  });

  it("reports the first step's reward accuracy as undefined (policy = reference: every h is float32 noise), later ones as a share", async () => {
    const res = await tuneDPO(model, pairs, settings({ train: ["*"], lr: 0.01, epochs: 3 }));
    tf.dispose(res.ownTensors);
    const [first, ...rest] = res.history;
    expect(first!.rewardAccuracy).toBeNull();
    expect(first!.atNoiseFloor).toBe(4);
    expect(Math.abs(first!.rewardMargin)).toBeLessThan(1e-4);
    expect(first!.loss).toBeCloseTo(Math.log(2), 5);
    const last = rest.at(-1)!;
    expect(last.atNoiseFloor).toBe(0);
    expect(last.rewardAccuracy).toBeGreaterThanOrEqual(0);
    // the noise floor is tiny beside a trained pair's reward
    expect(noiseFloor(-40, -60)).toBeLessThan(1e-4);
  });

  it("passes Adam's ε and the schedule to the optimizer: a huge ε makes the first update tiny", async () => {
    const delta = async (over: Partial<typeof DEFAULT_TUNE>) => {
      const res = await tuneDPO(
        model,
        pairs.slice(0, 8),
        settings({ train: ["model.norm.weight"], lr: 1e-2, epochs: 1, ...over }),
      );
      const after = res.model.finalNorm.dataSync();
      const before = model.finalNorm.dataSync();
      const d = Math.max(...Array.from(after, (v, i) => Math.abs(v - before[i]!)));
      tf.dispose(res.ownTensors);
      return { d, lrs: res.history.map((h) => h.lr) };
    };
    const plain = await delta({});
    const damped = await delta({ adamEpsilon: 1e3 });
    expect(plain.d).toBeGreaterThan(1e-3); // Adam's first steps move each weight by ~lr
    expect(damped.d).toBeLessThan(plain.d / 100);
    expect(plain.lrs).toEqual([1e-2, 1e-2]);
    const warm = await delta({ warmupSteps: 2 });
    expect(warm.lrs).toEqual([0, 5e-3]);
  });

  it("the learning rate follows transformers' warm-up, linear and cosine schedules", () => {
    const s = { lr: 1, warmupSteps: 2 };
    expect([1, 2, 3, 4, 5, 6].map((t) => learningRate({ ...s, schedule: "constant" }, t, 6))).toEqual([
      0, 0.5, 1, 1, 1, 1,
    ]);
    expect([1, 2, 3, 4, 5, 6].map((t) => learningRate({ ...s, schedule: "linear" }, t, 6))).toEqual([
      0, 0.5, 1, 0.75, 0.5, 0.25,
    ]);
    const cos = [3, 4, 5, 6].map((t) => learningRate({ ...s, schedule: "cosine" }, t, 6));
    [1, 0.5 * (1 + Math.cos(Math.PI / 4)), 0.5, 0.5 * (1 + Math.cos((3 * Math.PI) / 4))].forEach((v, i) =>
      expect(cos[i]).toBeCloseTo(v, 12),
    );
  });
});
