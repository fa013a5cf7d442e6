// `prefprobe tune` as a user runs it: a loadable HF folder with its record, and clean errors.
import * as fs from "node:fs";
import * as path from "node:path";
import { runCli, tmpDir, useBackend } from "./helpers.js";
import { describe, expect, it } from "vitest";
import { loadConfig } from "../src/io/config.js";
import { readSafetensors } from "../src/io/safetensors.js";
import { loadModelSync } from "../src/io/model.js";
import { loadPairs } from "../src/io/pairs.js";
import { disposeModel } from "../src/model/llama.js";
import { evaluatePairs } from "../src/train/dpo.js";

useBackend();
const run = runCli;
const tmp = tmpDir;
const MODEL = "fixtures/models/stories260k";
const TRAIN = "fixtures/data/stories/train.jsonl";

describe("prefprobe tune", () => {
  it("writes an HF folder that prefprobe loads, with tokenizer, licence and tune.json", () => {
    const dir = tmp();
    const out = path.join(dir, "tuned");
    const evalFile = path.join(tmp(), "eval.jsonl"); // 12 held-out pairs: the CLI's numbers are checked against evaluatePairs below
    fs.writeFileSync(
      evalFile,
      fs.readFileSync("fixtures/data/stories/test.jsonl", "utf8").split("\n").slice(0, 12).join("\n") + "\n",
    );
    const r = run(
      "tune",
      "--model",
      MODEL,
      "--pairs",
      TRAIN,
      "--limit",
      "8",
      "--eval",
      evalFile,
      "--out",
      out,
      "--epochs",
      "1",
      "--batch",
      "4",
      "--train",
      "layers.1.mlp",
      "--rank",
      "2",
      "--lr",
      "0.01",
    );
    expect(r.code, r.err).toBe(0);
    expect(r.out).toMatch(/trained 3 weights \(rank-2 updates\) for 2 steps/);
    for (const f of [
      "config.json",
      "model.safetensors",
      "tokenizer.json",
      "tokenizer_config.json",
      "LICENSE",
      "tune.json",
    ])
      expect(fs.existsSync(path.join(out, f)), f).toBe(true);
    expect(loadConfig(out).numLayers).toBe(5);
    const a = readSafetensors(path.join(MODEL, "model.safetensors"));
    const b = readSafetensors(path.join(out, "model.safetensors"));
    for (const [name, t] of a) {
      const changed = (t.data as Float32Array).some((v, i) => v !== (b.get(name)!.data as Float32Array)[i]);
      expect(changed, name).toBe(/^model\.layers\.1\.mlp\./.test(name));
    }
    const rec = JSON.parse(fs.readFileSync(path.join(out, "tune.json"), "utf8"));
    expect(rec.history).toHaveLength(2);
    expect(rec.settings.rank).toBe(2);
    expect(rec.held_out.pairs).toBe(12);
    // the printed held-out line is what the library computes on the written folder
    const [base, tuned] = [loadModelSync(MODEL), loadModelSync(out)];
    const ev = evaluatePairs(base, tuned, loadPairs(evalFile, MODEL));
    disposeModel(base);
    disposeModel(tuned);
    expect(ev.meanMarginTuned).not.toBeCloseTo(ev.meanMarginBase, 2);
    const pct = (x: number) => (100 * x).toFixed(1);
    const noise = ev.atNoiseFloor ? ` (${ev.atNoiseFloor} pairs within float32 noise, not counted)` : "";
    expect(r.out).toContain(
      `held-out (12 pairs): mean margin ${ev.meanMarginBase.toFixed(3)} → ${ev.meanMarginTuned.toFixed(3)}; reward accuracy ${pct(ev.rewardAccuracy!)}%${noise}; prefers chosen ${pct(ev.basePrefersChosen)}% → ${pct(ev.tunedPrefersChosen)}%`,
    );
    const logits = run("logits", "--model", out, "--text", "Once upon a time");
    expect(logits.code).toBe(0);
    expect(fs.readdirSync(dir)).toEqual(["tuned"]); // no temporary folder left behind
  });

  const bad: Array<[string, (o: string) => string[], RegExp]> = [
    [
      "a pattern that matches nothing",
      (o) => ["--pairs", TRAIN, "--limit", "2", "--out", o, "--train", "layers.9.nothing"],
      /matches no weight/,
    ],
    [
      "an existing output folder",
      (o) => (fs.mkdirSync(o), ["--pairs", TRAIN, "--out", o]),
      /already exists \(use --force/,
    ],
    ["a bad learning rate", (o) => ["--pairs", TRAIN, "--out", o, "--lr", "-1"], /--lr must be positive/],
    [
      "a list with one pattern that matches nothing",
      (o) => [
        "--pairs",
        TRAIN,
        "--limit",
        "2",
        "--out",
        o,
        "--train",
        "model.layers.2.self_attn.?_proj.weight,nothing",
      ],
      /--train pattern "nothing" matches no weight/,
    ],
    [
      "a glob that is only part of a name",
      (o) => ["--pairs", TRAIN, "--limit", "2", "--out", o, "--train", "layers.*.mlp.down_proj"],
      /a glob must match a whole name/,
    ],
    [
      "a rank above a matrix's smaller side",
      (o) => ["--pairs", TRAIN, "--limit", "2", "--out", o, "--train", "layers.0.self_attn", "--rank", "33"],
      /--rank 33 is more than model.layers.0.self_attn.k_proj.weight can take/,
    ],
    [
      "--lora-alpha without --rank",
      (o) => ["--pairs", TRAIN, "--limit", "2", "--out", o, "--lora-alpha", "8"],
      /--lora-alpha scales a low-rank update: give --rank too/,
    ],
    ["an unknown schedule", (o) => ["--pairs", TRAIN, "--out", o, "--schedule", "step"], /argument 'step' is invalid/],
    ["a missing pairs file", (o) => ["--pairs", "/nonexistent.jsonl", "--out", o], /cannot read/],
  ];
  it.each(bad)("%s gives a one-line error and writes nothing", (_n, args, msg) => {
    const o = path.join(tmp(), "t");
    const existed = args(o);
    const r = run("tune", "--model", MODEL, ...existed);
    expect(r.code).not.toBe(0);
    const lines = r.err
      .trim()
      .split("\n")
      .filter((l) => l.startsWith("prefprobe: error:"));
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(msg);
    expect(r.err).not.toMatch(/\n\s+at /);
    expect(fs.existsSync(path.join(o, "model.safetensors"))).toBe(false);
  });
});
