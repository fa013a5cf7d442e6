// `prefprobe run` end to end as a user runs it, and its input checks.
import * as fs from "node:fs";
import * as path from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { readSafetensors } from "../src/io/safetensors.js";
import { readResults } from "../src/io/results.js";
import { readPairs, splitHH } from "../src/io/pairs.js";
import { runCli, tmpDir } from "./helpers.js";

const CLI = path.resolve("dist/src/cli.js");
const run = runCli;
const tmp = tmpDir;
const MODEL = "fixtures/models/stories260k";

function writePairs(lines: unknown[]): string {
  const f = path.join(tmp(), "pairs.jsonl");
  fs.writeFileSync(f, lines.map((l) => (typeof l === "string" ? l : JSON.stringify(l))).join("\n") + "\n");
  return f;
}
const good = (i: number) => ({
  prompt: `Once upon a time, Tom saw a cat number ${i}.`,
  chosen: "Tom gave the cat some milk.",
  rejected: "Tom threw a rock at the cat <script>alert(1)</script>.",
});

describe("prefprobe run", () => {
  let out: string;
  let r: ReturnType<typeof run>;
  beforeAll(() => {
    out = path.join(tmp(), "out");
    const pairs = writePairs([
      ...Array.from({ length: 6 }, (_, i) => good(i)),
      { prompt_ids: [1, 403, 407], chosen_ids: [261, 378], rejected_ids: [432] },
    ]);
    r = run("run", "--base", MODEL, "--tuned", "fixtures/models/llama-tiny-a", "--pairs", pairs, "--out", out);
  });

  it("refuses models that differ in shape, naming the difference", () => {
    expect(r.code).not.toBe(0);
    expect(r.err.trim().split("\n").pop()).toMatch(
      /^prefprobe: error: base and tuned models differ in intermediateSize \(172 vs 96\)/,
    );
    expect(fs.existsSync(path.join(out, "results.json"))).toBe(false);
  });

  it("writes results.json, pairs.jsonl, activations.safetensors and a self-contained report", () => {
    const o = path.join(tmp(), "out");
    const pairs = writePairs([
      ...Array.from({ length: 6 }, (_, i) => good(i)),
      { prompt_ids: [1, 403, 407], chosen_ids: [261, 378], rejected_ids: [432] },
    ]);
    const res = run(
      "run",
      "--base",
      MODEL,
      "--tuned",
      MODEL,
      "--pairs",
      pairs,
      "--out",
      o,
      "--sites",
      "resid_post,mlp_out",
      "--direction",
      "both",
      "--bootstrap",
      "100",
      "--stability",
      "5",
    );
    expect(res.code, res.err).toBe(0);
    const results = JSON.parse(fs.readFileSync(path.join(o, "results.json"), "utf8"));
    expect(results.schema).toBe("prefprobe.results/1");
    expect(results.pairs).toHaveLength(7);
    expect(results.pairs.map((p: { index: number }) => p.index)).toEqual([0, 1, 2, 3, 4, 5, 6]);
    // identical models: every margin gap is zero and every gain is zero
    for (const p of results.pairs) expect(Math.abs(p.margin.tuned - p.margin.base)).toBeLessThan(1e-5);
    expect(results.patching).toHaveLength(2 * 2 * 5);
    for (const e of results.patching) {
      expect(e.gains).toHaveLength(7);
      for (const g of e.gains) expect(Math.abs(g)).toBeLessThan(1e-5);
      expect(Object.keys(e.controls)).toEqual(["random_direction", "mean_ablation"]);
    }
    expect(Object.keys(results.lasso)).toEqual(
      expect.arrayContaining(["X", "y", "alpha", "coef", "intercept", "path", "stability"]),
    );
    expect(results.probes).toHaveLength(10);
    expect(Object.keys(results.pca)).toEqual(
      expect.arrayContaining(["layer", "site", "explained_variance_ratio", "recovery"]),
    );
    expect(results.logit_lens.layers).toHaveLength(6);
    expect(results.settings.seed).toBe(0);
    expect(results.backend).toMatch(/wasm/);
    expect(results.fingerprints.base).toMatch(/^[0-9a-f]{64}$/);
    expect(results.versions["tfjs-core"]).toBeTruthy();
    expect(results.timings_ms.scoring_and_patching).toBeGreaterThan(0);
    const lines = fs.readFileSync(path.join(o, "pairs.jsonl"), "utf8").trim().split("\n");
    expect(lines).toHaveLength(7);
    expect(JSON.parse(lines[6]!).tokens).toEqual({ prompt: 3, chosen: 2, rejected: 1 });
    const act = readSafetensors(path.join(o, "activations.safetensors"));
    expect(act.get("distance")!.shape).toEqual([7, 5]);
    expect(act.get("gains.tuned_to_base.mlp_out")!.shape).toEqual([5, 7]);
    const html = fs.readFileSync(path.join(o, "report.html"), "utf8");
    expect((html.match(/<svg/g) ?? []).length).toBeGreaterThanOrEqual(7);
    expect(html).not.toMatch(/<script/i); // pair text is escaped, and the report needs no script
    expect(html).toContain("&lt;script&gt;alert(1)&lt;/script&gt;");
    expect(html).not.toMatch(/src="http|href="http/);
    expect(res.out).toMatch(/Findings:/);
    expect(res.out).toMatch(/report: .*report\.html/);
    // the typed reader gives the same file, findings included (the sentences the CLI printed)
    const typed = readResults(o);
    expect(typed.pairs).toEqual(results.pairs);
    expect(typed.findings.length).toBeGreaterThan(0);
    for (const f of typed.findings) expect(res.out).toContain(`  - ${f}`);
    expect(() => readResults(path.join(o, "pairs.jsonl"))).toThrow(/pairs\.jsonl: not valid JSON/);
    expect(() => readResults(path.join(o, "manifest.json"))).toThrow(
      /not a prefprobe results file \(schema "prefprobe\.manifest\/2"\)/,
    );
  });

  it("splits real HH-RLHF dialogues at the last Assistant turn and names malformed lines", () => {
    const { pairs, bad } = readPairs("fixtures/data/hh-rlhf/harmless-base-test.jsonl.gz", { skipBad: true });
    expect(pairs.length + bad.length).toBe(2312);
    expect(bad).toHaveLength(5);
    for (const p of pairs.slice(0, 50)) {
      expect(p.prompt!.endsWith("\n\nAssistant:")).toBe(true);
      expect(p.chosen!.includes("\n\nAssistant:")).toBe(false);
    }
    expect(() => readPairs("fixtures/data/hh-rlhf/harmless-base-test.jsonl.gz")).toThrow(
      new RegExp(`line ${bad[0]!.line}: chosen and rejected share no prefix`),
    );
    expect(splitHH("\n\nHuman: hi\n\nAssistant: yes", "\n\nHuman: hi\n\nAssistant: no")).toEqual({
      prompt: "\n\nHuman: hi\n\nAssistant:",
      chosen: " yes",
      rejected: " no",
    });
    expect(splitHH("\n\nHuman: a\n\nAssistant: yes", "\n\nHuman: b\n\nAssistant: no")).toBeNull();
  });

  const badCases: Array<[string, () => string[], RegExp]> = [
    ["malformed JSON line", () => ["--pairs", writePairs([good(0), "{oops"])], /pairs\.jsonl: line 2: not valid JSON/],
    [
      "a prompt that is not a string",
      () => ["--pairs", writePairs([{ ...good(0), prompt: 5 }])],
      /pairs\.jsonl: line 1: "prompt" must be a string, got a number$/,
    ],
    [
      "missing fields",
      () => ["--pairs", writePairs([good(0), { prompt: "x", chosen: "y" }])],
      /pairs\.jsonl: line 2: "rejected" is missing \(a pair needs strings "chosen" and "rejected", or prompt_ids\/chosen_ids\/rejected_ids\)$/,
    ],
    [
      "no shared prefix",
      () => ["--pairs", writePairs([{ chosen: "a", rejected: "b" }])],
      /line 1: chosen and rejected share no prefix/,
    ],
    [
      "ids outside the vocabulary",
      () => ["--pairs", writePairs([{ prompt_ids: [1], chosen_ids: [9999], rejected_ids: [3] }])],
      /: error: \S+\/pairs\.jsonl: line 1: token id 9999 is outside the vocabulary \(size 512\)$/, // the file, as every pair error
    ],
    [
      "empty response",
      () => ["--pairs", writePairs([{ prompt_ids: [1], chosen_ids: [], rejected_ids: [3] }])],
      /: error: \S+\/pairs\.jsonl: line 1: a response has no tokens$/,
    ],
    [
      "every pair too long",
      () => ["--pairs", writePairs([good(0)]), "--max-tokens", "5"],
      /no usable pairs .*1 longer than 5 tokens/,
    ],
    ["missing pairs file", () => ["--pairs", "/nonexistent.jsonl"], /cannot read/],
    ["unknown site", () => ["--pairs", writePairs([good(0)]), "--sites", "resid_post,foo"], /unknown site "foo"/],
    [
      "layer out of range",
      () => ["--pairs", writePairs([good(0)]), "--layers", "1,9"],
      /--layers has layer 9, outside 0..4/,
    ],
    ["bad number", () => ["--pairs", writePairs([good(0)]), "--folds", "x"], /--folds must be an integer/],
    ["out is a file", () => ["--pairs", writePairs([good(0)]), "--out", CLI], /exists and is not a folder/],
  ];
  it.each(badCases)("%s gives a one-line error and no outputs", (_n, args, msg) => {
    const o = path.join(tmp(), "o");
    const a = args();
    const res = run("run", "--base", MODEL, "--tuned", MODEL, "--out", o, ...a);
    expect(res.code).not.toBe(0);
    const errLines = res.err
      .trim()
      .split("\n")
      .filter((l) => l.startsWith("prefprobe: error:"));
    expect(errLines).toHaveLength(1);
    expect(errLines[0]).toMatch(msg);
    expect(res.err).not.toMatch(/\n\s+at /);
    if (!a.includes("--out")) expect(fs.existsSync(path.join(o, "results.json"))).toBe(false);
  });

  it("--skip-bad counts malformed lines and --max-tokens counts long pairs", () => {
    const o = path.join(tmp(), "o");
    const long = { prompt: "Once upon a time ".repeat(20), chosen: "yes", rejected: "no" };
    const res = run(
      "run",
      "--base",
      MODEL,
      "--tuned",
      MODEL,
      "--out",
      o,
      "--pairs",
      writePairs([good(0), "{bad", good(1), long, good(2)]),
      "--skip-bad",
      "--max-tokens",
      "70",
      "--bootstrap",
      "100",
      "--stability",
      "2",
    );
    expect(res.code, res.err).toBe(0);
    expect(res.err).toMatch(/pairs: 3 used, 1 skipped as longer than 70 tokens, 1 malformed/);
    const results = JSON.parse(fs.readFileSync(path.join(o, "results.json"), "utf8"));
    expect(results.skipped.too_long).toBe(1);
    expect(results.skipped.malformed[0].line).toBe(2);
    expect(results.pairs.map((p: { line: number }) => p.line)).toEqual([1, 3, 5]);
  });
});
