// The command line as a user runs it (the compiled dist/src/cli.js that `npm test` builds first).
import * as fs from "node:fs";
import * as path from "node:path";
import { describe, expect, it } from "vitest";
import { readSafetensors } from "../src/io/safetensors.js";
import { randomWeights, writeModelFolder } from "./random-model.js";
import { oracleForward, type OracleConfig } from "./oracle.js";
import { maxAbsDiff, runCli, TEST_BACKEND, tmpDir } from "./helpers.js";

const run = runCli;
const tmp = tmpDir;

/** A one-line error and a non-zero exit, no stack trace. */
function expectCleanError(r: ReturnType<typeof run>, msg: RegExp) {
  expect(r.code).not.toBe(0);
  const lines = r.err
    .trim()
    .split("\n")
    .filter((l) => !l.startsWith("backend:"));
  expect(lines).toHaveLength(1);
  expect(lines[0]).toMatch(/^prefprobe: error: /);
  expect(lines[0]).toMatch(msg);
  expect(r.err).not.toMatch(/\n\s+at /);
}

const small: OracleConfig = {
  hidden: 8,
  inter: 12,
  layers: 2,
  heads: 2,
  kvHeads: 1,
  headDim: 4,
  vocab: 20,
  eps: 1e-5,
  theta: 10000,
  rope: { kind: "default" },
  tied: false,
  attnBias: false,
  mlpBias: false,
};
const goodFolder = () => writeModelFolder({ cfg: small, seed: 1, dtype: "F32", shards: 1 }, randomWeights(small, 1));

describe("prefprobe logits", () => {
  it("shows sensible next tokens for stories260k", () => {
    const r = run("logits", "--model", "fixtures/models/stories260k", "--text", "Once upon a time");
    expect(r.code).toBe(0);
    expect(r.err).toMatch(new RegExp(`backend: ${TEST_BACKEND} `));
    expect(r.out).toMatch(/tokens \(5\): 1 /);
    const top = r.out.split("\n").find((l) => l.includes("%"))!;
    expect(top).toMatch(/","/); // "Once upon a time" → ","
    expect(Number(top.trim().split("%")[0])).toBeGreaterThan(50);
  });

  it("writes logits and resid that agree with the reference implementation (ids used as-is)", () => {
    const exp = readSafetensors("fixtures/models/llama-tiny-b/expected.safetensors");
    const ids = Array.from(exp.get("input_ids")!.data as Int32Array);
    const out = path.join(tmp(), "o.safetensors");
    const r = run("logits", "--model", "fixtures/models/llama-tiny-b", "--ids", ids.join(","), "--out", out, "--resid");
    expect(r.code).toBe(0);
    const got = readSafetensors(out);
    expect(Array.from(got.get("input_ids")!.data as Int32Array)).toEqual(ids);
    expect(got.get("resid")!.shape).toEqual(exp.get("resid")!.shape);
    expect(
      maxAbsDiff(got.get("logits")!.data as Float32Array, exp.get("logits")!.data as Float32Array),
    ).toBeLessThanOrEqual(1e-4);
    expect(
      maxAbsDiff(got.get("resid")!.data as Float32Array, exp.get("resid")!.data as Float32Array),
    ).toBeLessThanOrEqual(1e-4);
  });

  it("agrees with the float64 oracle on an unseen sharded BF16 llama3 folder past the original context", () => {
    const cfg: OracleConfig = {
      hidden: 24,
      inter: 40,
      layers: 3,
      heads: 6,
      kvHeads: 2,
      headDim: 6,
      vocab: 40,
      eps: 1e-5,
      theta: 500000,
      rope: { kind: "llama3", factor: 8, low: 1, high: 4, orig: 16 },
      tied: false,
      attnBias: false,
      mlpBias: false,
    };
    const w = randomWeights(cfg, 99);
    const dir = writeModelFolder({ cfg, seed: 99, dtype: "BF16", shards: 2 }, w);
    const ids = Array.from({ length: 48 }, (_, i) => (i * 11 + 5) % 40);
    const out = path.join(tmp(), "o.safetensors");
    const r = run("logits", "--model", dir, "--ids", ids.join(","), "--out", out, "--resid");
    expect(r.code, r.err).toBe(0);
    const got = readSafetensors(out);
    const ref = oracleForward(cfg, w, ids);
    expect(maxAbsDiff(got.get("logits")!.data as Float32Array, ref.logits.flat())).toBeLessThanOrEqual(1e-4);
    const resid = [
      "hook_embed",
      "blocks.0.hook_resid_post",
      "blocks.1.hook_resid_post",
      "blocks.2.hook_resid_post",
    ].flatMap((s) => ref.sites[s]!.flat());
    expect(maxAbsDiff(got.get("resid")!.data as Float32Array, resid)).toBeLessThanOrEqual(1e-4);
  });

  it("runs on the cpu backend when forced", () => {
    const r = run("logits", "--model", "fixtures/models/llama-tiny-b", "--ids", "1,2,3", "--backend", "cpu");
    expect(r.code).toBe(0);
    expect(r.err).toMatch(/backend: cpu/);
    expect(r.err + r.out).not.toMatch(/Hi, looks like/); // tfjs's own advice is silenced: we report the backend
  });
});

describe("bad input gives a one-line error and a non-zero exit", () => {
  const cases: Array<[string, () => string[], RegExp]> = [
    ["missing folder", () => ["logits", "--model", "/nonexistent/model", "--ids", "1"], /not a folder/],
    [
      "missing config",
      () => {
        const d = goodFolder();
        fs.rmSync(path.join(d, "config.json"));
        return ["logits", "--model", d, "--ids", "1"];
      },
      /no config.json/,
    ],
    [
      "missing weights",
      () => {
        const d = goodFolder();
        fs.rmSync(path.join(d, "model.safetensors"));
        return ["logits", "--model", d, "--ids", "1"];
      },
      /no model.safetensors/,
    ],
    [
      "wrong shapes",
      () => {
        const d = goodFolder();
        const c = JSON.parse(fs.readFileSync(path.join(d, "config.json"), "utf8"));
        c.intermediate_size = 13;
        fs.writeFileSync(path.join(d, "config.json"), JSON.stringify(c));
        return ["logits", "--model", d, "--ids", "1"];
      },
      /has shape .* config implies/,
    ],
    [
      "corrupt safetensors",
      () => {
        const d = goodFolder();
        const f = path.join(d, "model.safetensors");
        fs.truncateSync(f, fs.statSync(f).size - 10);
        return ["logits", "--model", d, "--ids", "1"];
      },
      /not a valid safetensors file/,
    ],
    [
      "unsupported rope type",
      () => {
        const d = goodFolder();
        const c = JSON.parse(fs.readFileSync(path.join(d, "config.json"), "utf8"));
        c.rope_scaling = { rope_type: "yarn", factor: 4 };
        fs.writeFileSync(path.join(d, "config.json"), JSON.stringify(c));
        return ["logits", "--model", d, "--ids", "1"];
      },
      /rope_scaling type "yarn" is not supported/,
    ],
    [
      "config not JSON",
      () => {
        const d = goodFolder();
        fs.writeFileSync(path.join(d, "config.json"), "{");
        return ["logits", "--model", d, "--ids", "1"];
      },
      /not valid JSON/,
    ],
    [
      "id outside vocabulary",
      () => ["logits", "--model", "fixtures/models/llama-tiny-b", "--ids", "1,99"],
      /outside the vocabulary/,
    ],
    ["ids not numbers", () => ["logits", "--model", "fixtures/models/llama-tiny-b", "--ids", "1,x"], /comma-separated/],
    [
      "text without tokenizer",
      () => ["logits", "--model", "fixtures/models/llama-tiny-b", "--text", "hi"],
      /no tokenizer.json/,
    ],
    [
      "both text and ids",
      () => ["logits", "--model", "fixtures/models/stories260k", "--text", "hi", "--ids", "1"],
      /exactly one of/,
    ],
    [
      "output folder missing",
      () => [
        "logits",
        "--model",
        "fixtures/models/stories260k",
        "--ids",
        "1",
        "--out",
        "/nonexistent/dir/o.safetensors",
      ],
      /does not exist/,
    ],
    [
      "backend not installed",
      () => ["logits", "--model", "fixtures/models/stories260k", "--ids", "1", "--backend", "tensorflow"],
      /not available: install @tensorflow\/tfjs-node/,
    ],
    [
      "too large for the wasm heap even streamed",
      () => {
        const d = goodFolder();
        const c = JSON.parse(fs.readFileSync(path.join(d, "config.json"), "utf8"));
        Object.assign(c, {
          hidden_size: 8192,
          intermediate_size: 28672,
          num_hidden_layers: 80,
          num_attention_heads: 64,
          num_key_value_heads: 8,
          head_dim: 128,
          vocab_size: 128256,
        });
        fs.writeFileSync(path.join(d, "config.json"), JSON.stringify(c));
        return ["logits", "--model", d, "--ids", "1", "--backend", "wasm"];
      },
      /a memory budget of 3\.00 GiB cannot hold one layer \(6\.38 GiB\) and a 128th of the head \(0\.06 GiB\) as float32 \(each counted 2x: the backend keeps a packed copy\)/,
    ],
    [
      "llama2c file truncated",
      () => {
        const d = tmp();
        const f = path.join(d, "m.bin");
        fs.writeFileSync(f, fs.readFileSync("fixtures/reference/stories260K/stories260K.bin").subarray(0, 5000));
        return ["convert-llama2c", f, "fixtures/reference/stories260K/tok512.bin", path.join(d, "out")];
      },
      /header implies/,
    ],
  ];
  it.each(cases)("%s", (_name, args, msg) => expectCleanError(run(...args()), msg));

  it("--debug shows the stack trace", () => {
    const r = run("--debug", "logits", "--model", "/nonexistent/model", "--ids", "1");
    expect(r.code).not.toBe(0);
    expect(r.err).toMatch(/\n\s+at /);
  });
});
